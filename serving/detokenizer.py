"""Incremental detokenization for streaming.

A byte-level tokenizer splits one multi-byte character over several tokens, so decoding each
new token on its own would emit broken characters. Text is released only once it no longer ends
in a partial character (U+FFFD), decoding a short window of earlier tokens for context.
"""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer


class IncrementalDetokenizer:
    """Feeds token ids, returns the text that became final."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens already turned into emitted text

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is left, partial characters included (called once, at the end)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        text = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=True)
        if not final and (text.endswith("\ufffd") or len(text) <= len(before)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]

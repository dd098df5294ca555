"""`SequenceState`: what the torch engine remembers about one request between calls.

Where the request's KV is follows from the KV pools' block tables (`KVTiers`); this holds what
the request has computed so far and how it samples its next token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engines.base import SamplingParams


@dataclass(slots=True)
class SequenceState:
    """One request's progress and sampling state (see the module docstring)."""

    kv_len: int
    """Tokens whose K/V are in the cache."""
    last_token: int | None
    """Sampled but not yet fed: the input of the next decode step. None while the prompt is
    prefilled in chunks and its last chunk has not run: the request cannot decode yet."""
    sampling: SamplingParams
    generator: torch.Generator | None
    """Seeded sampling state, on the decode device; it stays here while the KV moves, so
    prefilling elsewhere or offloading changes no token."""
    prompt_len: int
    """Tokens in the prompt; a chunked prefill is complete when kv_len reaches it."""
    tokens: list[int] = field(default_factory=list)
    """The prompt and every token sampled since, kept where the sampling shapes the logits
    (penalties, min_tokens, bad words: `SamplingParams.shapes_logits`); empty otherwise."""

    def history(self) -> tuple[list[int], int] | None:
        """(tokens so far, prompt length) for `sampler.sample`, where the sampling needs them."""
        return (self.tokens, self.prompt_len) if self.sampling.shapes_logits else None

    def record(self, token: int) -> None:
        """A token was sampled for this request."""
        self.last_token = token
        if self.sampling.shapes_logits:
            self.tokens.append(token)

"""The peer benchmark's prompts: windows of real text cut to exact token lengths, fixed by a seed.

The text is the Python language reference and library topics that every CPython ships
(`pydoc_data.topics`, ~465,000 characters of English prose and examples), so the prompts are
real text on any machine without a download. Each prompt is a window of it starting at a
seeded random token, cut so that the engine's tokenizer (the one both servers use) makes exactly
the asked length of it. Lengths are spread evenly over the requests in a seeded order.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request of the workload."""

    text: str
    tokens: int
    """Its length in the engine tokenizer's tokens (special tokens included, as a server counts)."""


def corpus() -> str:
    """The real text the prompts are cut from (the same on every CPython of one version)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def make_prompts(tokenizer: Tokenizer, lengths: list[int], count: int, seed: int,
                 text: str | None = None) -> list[Prompt]:
    """`count` prompts whose lengths cycle through `lengths` (as evenly as count allows) in a
    seeded order, each a window of `text` (default: `corpus()`) at a seeded offset."""
    if count < 1:
        raise ValueError(f"count: {count}; ask for at least one prompt")
    if not lengths or min(lengths) < 2:
        raise ValueError(f"lengths: {lengths}; each prompt needs at least 2 tokens")
    text = corpus() if text is None else text
    enc = tokenizer.encode(text, add_special_tokens=False)
    if max(lengths) + 64 > len(enc.ids):
        raise ValueError(f"lengths: {max(lengths)} tokens asked for, the text has {len(enc.ids)}")
    rng = random.Random(seed)
    plan = [lengths[i % len(lengths)] for i in range(count)]
    rng.shuffle(plan)
    return [_window(tokenizer, text, enc.offsets, n, rng.randrange(len(enc.ids) - n - 32)) for n in plan]


def _window(tokenizer: Tokenizer, text: str, offsets, n: int, start: int) -> Prompt:
    """The text from token `start` on (or a token or two later) that tokenizes to exactly n
    tokens: cut at a token's end near n tokens on (re-tokenizing a cut can merge or split
    tokens at its edges, so the cuts around it are tried too)."""
    for first in range(start, start + 8):
        begin = offsets[first][0]
        for end in sorted(range(first + n - 4, first + n + 5), key=lambda e: abs(e - first - n)):
            piece = text[begin:offsets[end - 1][1]]
            if len(tokenizer.encode(piece).ids) == n:
                return Prompt(piece, n)
    raise ValueError(f"no window of exactly {n} tokens near token {start}")


def write_jsonl(prompts: list[Prompt], path: Path, output_len: int) -> str:
    """The prompts as `vllm bench serve --dataset-name custom` reads them; returns the file's
    sha256 (recorded with the results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p.text, "output_tokens": output_len, "prompt_tokens": p.tokens},
                        ensure_ascii=False) for p in prompts]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()

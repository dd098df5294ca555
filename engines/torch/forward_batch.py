"""The tensors one model forward needs: tokens, positions, and where their KV lives.

Prefill and decode are the same shape to the model: B sequences of T tokens (right-padded),
each token at a known position, attending to every earlier token of its own sequence through
that sequence's block table. Prefill has T = longest prompt; decode has T = 1; a chunked-prefill
step mixes both, each sequence a run of tokens starting where its cached KV ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from engines.torch.kv_cache import PagedKVCache


@dataclass(slots=True)
class ForwardBatch:
    """Inputs of one forward over B sequences of T tokens."""

    tokens: torch.Tensor
    """[B, T] token ids; pads are 0."""
    positions: torch.Tensor
    """[B, T] position of each token in its sequence; pads get 0 (their outputs are dropped)."""
    real: torch.Tensor | None
    """Flat indices into B*T of the real (non-pad) tokens; None when every token is real."""
    slots: torch.Tensor
    """[N] KV slot (block * block_size + offset) of each real token, in `real` order."""
    block_tables: torch.Tensor
    """[B, max_blocks] each sequence's blocks, right-padded with block 0."""
    last: torch.Tensor
    """[B] index along T of each sequence's last real token (whose logits predict the next)."""
    block_size: int
    """Tokens per KV block of the cache the block tables point into."""

    @property
    def key_mask(self) -> torch.Tensor:
        """[B, T, L] True where a query may attend to key position l: l <= its own position.

        Causality also hides every key at or beyond a sequence's KV length, since no real query
        sits past its sequence's end; pads (position 0) see key 0 and stay finite.
        """
        L = self.block_tables.shape[1] * self.block_size
        keys = torch.arange(L, device=self.positions.device)
        return keys <= self.positions[..., None]


def _slots(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_tables.gather(1, positions // block_size) * block_size + positions % block_size


def prefill_batch(cache: PagedKVCache, request_ids: Sequence[str], prompts: Sequence[Sequence[int]],
                  device: torch.device) -> ForwardBatch:
    """Batch of whole prompts at positions 0..len-1; blocks must already be reserved."""
    return chunk_batch(cache, request_ids, prompts, [0] * len(prompts), device)


def chunk_batch(cache: PagedKVCache, request_ids: Sequence[str], runs: Sequence[Sequence[int]],
                starts: Sequence[int], device: torch.device) -> ForwardBatch:
    """Batch of token runs, run i at positions starts[i]..starts[i]+len-1: a prompt chunk that
    continues the KV already cached for its request, or a decode token (a run of one at the KV
    length). Blocks up to each run's end must already be reserved.

    The key mask (keys <= position) lets each run attend to its request's cached KV and to its
    own earlier tokens, which the forward writes into the cache before it reads it back.
    """
    lengths = torch.tensor([len(r) for r in runs], device=device)
    T = int(lengths.max())
    tokens = torch.zeros((len(runs), T), dtype=torch.long)
    for i, r in enumerate(runs):
        tokens[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    steps = torch.arange(T, device=device)
    is_real = steps < lengths[:, None]
    offsets = torch.tensor(list(starts), dtype=torch.long, device=device)[:, None]
    positions = torch.where(is_real, offsets + steps, 0)
    tables = cache.block_tables(list(request_ids), device)
    real = is_real.flatten().nonzero().squeeze(1)
    slots = _slots(tables, positions, cache.block_size).flatten()[real]
    return ForwardBatch(tokens.to(device), positions, real, slots, tables, lengths - 1, cache.block_size)


def decode_batch(cache: PagedKVCache, request_ids: Sequence[str], last_tokens: Sequence[int],
                 kv_lens: Sequence[int], device: torch.device) -> ForwardBatch:
    """Batch of one new token per sequence at position = its current KV length; the block
    holding that position must already be reserved."""
    tokens = torch.tensor(last_tokens, dtype=torch.long, device=device)[:, None]
    positions = torch.tensor(kv_lens, dtype=torch.long, device=device)[:, None]
    tables = cache.block_tables(list(request_ids), device)
    slots = _slots(tables, positions, cache.block_size).flatten()
    last = torch.zeros(len(request_ids), dtype=torch.long, device=device)
    return ForwardBatch(tokens, positions, None, slots, tables, last, cache.block_size)

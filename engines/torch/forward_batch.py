"""The tensors one model forward needs: tokens, positions, where their KV goes, and the
attention plan that reads it back.

A forward computes one run of new tokens per sequence, run i at positions starts[i] ..
starts[i] + len - 1: a whole prompt (start 0), a prompt chunk that continues the KV already cached
for its request, or one decode token at the KV length. Every layer sees the runs as rows of one
2-D tensor [rows, hidden]; how the runs become rows, and how attention reads the cache, is the
attention path (attention.py): "varlen" packs the real tokens only, "paged" too with decode
attention through the CPU kernel (cpu_kernels.py), "padded" right-pads every run to the longest.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch

from engines.torch.attention import (
    ATTENTION_PATHS, AttentionPlan, DecodeGroup, PaddedPlan, RunAttention, VarlenPlan, decode_groups,
)
from engines.torch.cpu_kernels import kernels as cpu_kernels
from engines.torch.cpu_kernels import unavailable as cpu_kernels_unavailable
from engines.torch.kv_cache import PagedKVCache


@dataclass(slots=True)
class ForwardBatch:
    """Inputs of one forward over B runs of tokens laid out as rows."""

    tokens: torch.Tensor
    """[rows] token ids; pad rows (padded path only) hold 0."""
    positions: torch.Tensor
    """[rows] position of each token in its sequence; pad rows get 0 (their outputs are dropped)."""
    real: torch.Tensor | None
    """Rows that hold real tokens, in `slots` order; None when every row is real."""
    slots: torch.Tensor
    """[real tokens] KV slot (block * block_size + offset) of each real token."""
    last: torch.Tensor
    """[B] row of each run's last token (whose logits predict the next), in call order."""
    first: list[int]
    """First row of each run, in call order."""
    lengths: list[int]
    """Tokens of each run, in call order."""
    attention: AttentionPlan

    def per_run(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [rows, ...] regrouped per run as [B, longest run, ...], right-padded with zeros
        (e.g. every position's logits, for the tests)."""
        out = x.new_zeros((len(self.lengths), max(self.lengths)) + tuple(x.shape[1:]))
        for i, (f, n) in enumerate(zip(self.first, self.lengths)):
            out[i, :n] = x[f:f + n]
        return out


def build_batch(cache: PagedKVCache, request_ids: Sequence[str], runs: Sequence[Sequence[int]],
                starts: Sequence[int], device: torch.device, path: str, q_per_kv: int) -> ForwardBatch:
    """The batch of these runs on the given attention path (a prompt is a run starting at 0, a
    decode token a run of one at its KV length). Blocks up to each run's end must already be
    reserved. q_per_kv: query heads per KV head (the padded path's mask is laid out for them)."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention path {path!r}: use one of {ATTENTION_PATHS}")
    lengths = [len(r) for r in runs]
    tables = cache.block_tables(list(request_ids), torch.device("cpu"))
    if path == "padded":
        batch = _padded(tables, runs, list(starts), lengths, cache.block_size, q_per_kv)
    else:
        batch = _varlen(tables, runs, list(starts), lengths, cache.block_size, paged=path == "paged")
    return _to(batch, device) if device.type != "cpu" else batch


def _varlen(tables: torch.Tensor, runs, starts: list[int], lengths: list[int], block_size: int,
            paged: bool = False) -> ForwardBatch:
    """Real tokens only: the one-token runs first, in decode groups of similar KV length (paged:
    one group, longest first, for the kernel), then the longer runs in call order (module
    docstring of attention.py)."""
    ends = [s + n for s, n in zip(starts, lengths)]
    singles = [i for i, n in enumerate(lengths) if n == 1]
    if paged:  # the kernel reads each row's own length: no grouping; longest first balances its tasks
        groups = [sorted(singles, key=lambda i: -ends[i])] if singles else []
    else:
        groups = [[singles[m] for m in g] for g in decode_groups([ends[i] for i in singles])]
    order = [i for g in groups for i in g] + [i for i, n in enumerate(lengths) if n > 1]
    first = [0] * len(runs)
    row = 0
    for i in order:
        first[i], row = row, row + lengths[i]

    plan_groups, plan_runs = [], []
    for g in groups:
        kv = [ends[i] for i in g]
        longest = max(kv)
        mask = None
        if not paged and min(kv) != longest:
            mask = (torch.arange(longest) < torch.tensor(kv)[:, None])[:, None, None, :]
        plan_groups.append(DecodeGroup(first[g[0]], first[g[0]] + len(g), tables[g, :-(-longest // block_size)],
                                       longest, mask, torch.tensor(kv, dtype=torch.long)))
    for i in order[len(singles):]:
        if starts[i] == 0:  # a whole prompt: causal over its own fresh keys
            plan_runs.append(RunAttention(first[i], first[i] + lengths[i], None, None))
            continue
        mask = torch.arange(ends[i])[None, :] <= torch.arange(starts[i], ends[i])[:, None]
        plan_runs.append(RunAttention(first[i], first[i] + lengths[i], tables[i, :-(-ends[i] // block_size)],
                                      mask[None, None]))

    lens = torch.tensor([lengths[i] for i in order])
    seq = torch.repeat_interleave(torch.tensor(order), lens)
    row_first = torch.repeat_interleave(torch.tensor([first[i] for i in order]), lens)
    positions = torch.repeat_interleave(torch.tensor([starts[i] for i in order]), lens) \
        + torch.arange(len(seq)) - row_first
    tokens = torch.tensor(list(chain.from_iterable(runs[i] for i in order)), dtype=torch.long)
    last = torch.tensor([f + n - 1 for f, n in zip(first, lengths)])
    return ForwardBatch(tokens, positions, None, _slots(tables, seq, positions, block_size), last, first,
                        lengths, VarlenPlan(plan_groups, plan_runs, *(_paged_kernels() if paged else (None, None))))


def _paged_kernels():
    """The "paged" path's kernels: decode attention, and prefill attention where the CPU has AMX-BF16 or AVX512-BF16
    (else None: prompts take SDPA)."""
    module = cpu_kernels()
    if module is None:
        raise ValueError(f"attention path 'paged': the CPU kernels could not be built ({cpu_kernels_unavailable()})")
    return module.paged_decode, module.prefill_attention if module.prefill_attention_available() else None


def _padded(tables: torch.Tensor, runs, starts: list[int], lengths: list[int], block_size: int,
            q_per_kv: int) -> ForwardBatch:
    """B x T rows, each run right-padded to the longest (the layout before issue 15)."""
    B, T = len(runs), max(lengths)
    tokens = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(runs):
        tokens[i, :lengths[i]] = torch.as_tensor(r, dtype=torch.long)
    steps = torch.arange(T)
    is_real = steps < torch.tensor(lengths)[:, None]
    positions = torch.where(is_real, torch.tensor(starts)[:, None] + steps, 0)
    real = is_real.flatten().nonzero().squeeze(1)
    seq = torch.arange(B).repeat_interleave(T)[real]
    slots = _slots(tables, seq, positions.flatten()[real], block_size)
    # Causality also hides every key at or beyond a sequence's KV length, since no real query
    # sits past its sequence's end; pads (position 0) see key 0 and stay finite.
    L = tables.shape[1] * block_size
    mask = torch.arange(L) <= positions[..., None]  # [B, T, L]
    # [B, T, L] -> [B, 1, G*T, L]: one row per (query head in group, token), as the plan lays q out.
    mask = mask[:, None, None].expand(B, 1, q_per_kv, T, L).reshape(B, 1, q_per_kv * T, L)
    first = [i * T for i in range(B)]
    last = torch.tensor([f + n - 1 for f, n in zip(first, lengths)])
    return ForwardBatch(tokens.flatten(), positions.flatten(), real, slots, last, first, lengths,
                        PaddedPlan(B, T, tables, mask))


def _slots(tables: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV slot of each token: its sequence's block holding the position, times block size, plus offset."""
    return tables[seq, positions // block_size] * block_size + positions % block_size


def _to(batch: ForwardBatch, device: torch.device) -> ForwardBatch:
    """The batch with every tensor (the plan's included) on `device`."""
    def move(t):
        return None if t is None else t.to(device, non_blocking=True)

    plan = batch.attention
    if isinstance(plan, VarlenPlan):
        plan = VarlenPlan([DecodeGroup(g.start, g.end, move(g.block_tables), g.kv_len, move(g.mask), move(g.kv_lens))
                           for g in plan.groups],
                          [RunAttention(r.start, r.end, move(r.block_table), move(r.mask)) for r in plan.runs], plan.kernel, plan.prefill)
    else:
        plan = PaddedPlan(plan.batch, plan.width, move(plan.block_tables), move(plan.mask))
    return ForwardBatch(move(batch.tokens), move(batch.positions), move(batch.real), move(batch.slots),
                        move(batch.last), batch.first, batch.lengths, plan)

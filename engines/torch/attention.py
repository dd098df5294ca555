"""How one forward's attention reads the paged KV cache: the torch engine's attention paths.

A forward computes runs of new tokens, one run per sequence: a prompt (from position 0), a chunk
of a prompt that continues cached KV, or one decode token. Each token attends to every earlier
token of its own sequence. A path is a plan, built once per forward from the runs' lengths and
block tables (`forward_batch.build_batch`), that every layer then runs on its own q, k, v and
KV blocks (`attend`):

- `VarlenPlan` ("varlen", and "paged"): the work follows the real tokens. The rows are the runs concatenated
  (no pad rows, so no weight matmul computes a pad). A prompt attends causally to its own fresh
  keys, without reading the cache back; a chunk reads its sequence's cached KV up to its end.
  Decode tokens are batched by KV length (`decode_groups`): one SDPA call per group of similar
  lengths, each over its own longest KV, so a step costs about the sum of the KV lengths plus a
  small overhead per group, not batch x longest. On the "paged" path (CPU) all decode rows are
  one group, longest first, attended by a compiled kernel (`cpu_kernels.py`) that reads each
  row's KV straight from its blocks: no gather, no padding; and on a CPU with AMX-BF16 or
  AVX512-BF16 the prompts and chunks of a bfloat16 model attend through the prefill kernel, not SDPA.
- `PaddedPlan` ("padded"): B x T rows, each run right-padded to the longest, and every
  sequence's KV gathered and padded to the longest KV of the batch: cost B x longest in the
  matmuls and in attention. The engine's layout before issue 15: kept as a selectable fallback
  and as the baseline of the benchmarks (bench/attention_paths.py).

Apart from the paged kernel, a sequence's KV is read by gathering its blocks (a paged cache has
no contiguous view of it); every path writes this step's K/V into the cache before any layer
reads it back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

ATTENTION_PATHS = ("paged", "varlen", "padded")
"""The attention paths `TorchEngine(attention=...)` accepts (besides "auto")."""

GROUP_OVERHEAD_TOKENS = 256
"""What one more SDPA call costs, in KV tokens of attention work: the decode grouping adds a group
only where it saves more padding than this. Measured on the 2-core CPU of issue 15 with SmolLM2
shapes (bench/attention_paths.py): ~30 us per call against ~0.1 us per KV token and layer."""
GROUP_MAX_TOKENS = 16384
"""Largest padded KV (members x longest KV) of one decode group: a larger batch is split, because
past this the gathered K/V of one call no longer stays in the CPU's caches and the SDPA call gets
slower per token than two halves (measured: bench/attention_paths.py)."""


def gather_blocks(kv_blocks: torch.Tensor, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [n, blocks * block_size, kv_heads, head_dim] of n block tables [n, blocks]: one
    index_select along the first dimension each (a row copy per block; with advanced indexing a
    decode step of 32 mixed sequences took 170 ms against ~110 in bfloat16: docs/benchmarks.md)."""
    n, nb = block_tables.shape
    _, _, bs, kvh, hd = kv_blocks.shape
    flat = block_tables.reshape(-1)
    return tuple(kv_blocks[i].index_select(0, flat).view(n, nb * bs, kvh, hd) for i in (0, 1))


class AttentionPlan(Protocol):
    """One forward's attention, built once and run by every layer."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_blocks: torch.Tensor) -> torch.Tensor:
        """Attention output [rows, heads * head_dim] of q [rows, heads, head_dim], given this
        step's keys and values k, v [rows, kv_heads, head_dim] (already written into the cache)
        and one layer's K and V blocks [2, num_blocks, block_size, kv_heads, head_dim]."""


@dataclass(slots=True)
class DecodeGroup:
    """One-token runs in rows [start, end) attending together, each to its own KV."""

    start: int
    end: int
    block_tables: torch.Tensor
    """[members, blocks of the longest KV]."""
    kv_len: int
    """Longest KV length among the members."""
    mask: torch.Tensor | None
    """[members, 1, 1, kv_len] True for a member's real keys; None when every member has kv_len
    (and on the paged path, whose kernel reads `kv_lens`)."""
    kv_lens: torch.Tensor
    """[members] int64: each member's KV length (what the paged kernel reads)."""


@dataclass(slots=True)
class RunAttention:
    """A run of several tokens in rows [start, end): a prompt, or a chunk continuing cached KV."""

    start: int
    end: int
    block_table: torch.Tensor | None
    """The sequence's blocks up to the run's end; None for a whole prompt, which attends to its
    own fresh keys only."""
    mask: torch.Tensor | None
    """[1, 1, T, kv_len] causal mask of a chunk (token t sees keys up to its position)."""


@dataclass(slots=True)
class VarlenPlan:
    """The "varlen" path (module docstring): rows are real tokens only, decode rows first."""

    groups: list[DecodeGroup]
    runs: list[RunAttention]
    kernel: Callable | None = None
    """The "paged" path: decode groups attend through this kernel (cpu_kernels.py) straight from
    the cache blocks; None: gather the blocks, then SDPA."""
    prefill: Callable | None = None
    """The "paged" path on a CPU with AMX-BF16 or AVX512-BF16: prompts and chunks of bfloat16 models with head size
    64 or 128 attend through this kernel (cpu_kernels.py, `prefill_attention`) instead of SDPA."""

    def attend(self, q, k, v, kv_blocks):
        rows, heads, hd = q.shape
        kvh = k.shape[1]
        out = torch.empty_like(q)
        for g in self.groups:
            if self.kernel is not None:
                o = self.kernel(q[g.start:g.end], kv_blocks, g.block_tables, g.kv_lens, hd ** -0.5)
                if g.end - g.start == rows:  # a decode step: the kernel's output is the whole output
                    return o.view(rows, heads * hd)
                out[g.start:g.end] = o
                continue
            n = g.end - g.start
            keys, values = (x[:, :g.kv_len].transpose(1, 2) for x in gather_blocks(kv_blocks, g.block_tables))
            # The heads sharing a KV head are that head's query rows: no K/V repeat, no GQA flag.
            qg = q[g.start:g.end].view(n, kvh, heads // kvh, hd)
            out[g.start:g.end] = F.scaled_dot_product_attention(qg, keys, values, attn_mask=g.mask).reshape(n, heads, hd)
        prefill = self.prefill if q.dtype == torch.bfloat16 and hd in (64, 128) else None
        for r in self.runs:
            if r.block_table is None:
                keys, values = k[r.start:r.end], v[r.start:r.end]
            else:
                keys, values = (x[0, :r.mask.shape[-1]] for x in gather_blocks(kv_blocks, r.block_table[None]))
            if prefill is not None:  # causal: the run's last row sees every key (keys end at the run's end)
                prefill(q[r.start:r.end], keys, values, out[r.start:r.end], hd ** -0.5)
                continue
            qr = q[r.start:r.end].transpose(0, 1)[None]  # [1, heads, T, hd]: SDPA's fused kernels need 4-D
            o = F.scaled_dot_product_attention(qr, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                               attn_mask=r.mask, is_causal=r.block_table is None, enable_gqa=True)
            out[r.start:r.end] = o[0].transpose(0, 1)
        return out.view(rows, heads * hd)


@dataclass(slots=True)
class PaddedPlan:
    """The "padded" path (module docstring): rows are B x T, runs right-padded."""

    batch: int
    width: int
    """T: the longest run."""
    block_tables: torch.Tensor
    """[B, blocks of the longest KV], right-padded with block 0 (masked out)."""
    mask: torch.Tensor
    """[B, 1, G * T, L] True where query row (head in group, token) may see key l."""

    def attend(self, q, k, v, kv_blocks):
        B, T = self.batch, self.width
        _, heads, hd = q.shape
        kvh = k.shape[1]
        G = heads // kvh
        keys, values = (x.transpose(1, 2) for x in gather_blocks(kv_blocks, self.block_tables))  # [B, kvh, L, hd]
        # GQA without repeating K/V: the G query heads sharing a KV head become G*T query rows.
        q = q.view(B, T, kvh, G, hd).permute(0, 2, 3, 1, 4).reshape(B, kvh, G * T, hd)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask)
        return out.view(B, kvh, G, T, hd).permute(0, 3, 1, 2, 4).reshape(B * T, heads * hd)


def decode_groups(kv_lens: Sequence[int], overhead: int | None = None,
                  max_tokens: int | None = None) -> list[list[int]]:
    """Split one-token runs into groups that attend together: indices into kv_lens, each group
    of similar lengths, in ascending length order.

    A group costs `overhead` plus members x its longest KV (the padding inside it included); the
    split minimises the sum (dynamic programming over the lengths sorted), with no group above
    `max_tokens` unless one sequence alone is longer. Both default to the module's constants
    (GROUP_OVERHEAD_TOKENS, GROUP_MAX_TOKENS), read at each call."""
    overhead = GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    max_tokens = GROUP_MAX_TOKENS if max_tokens is None else max_tokens
    order = sorted(range(len(kv_lens)), key=kv_lens.__getitem__)
    lens = [kv_lens[i] for i in order]
    n = len(lens)
    best = [0] * (n + 1)  # best[j]: cost of grouping the j shortest
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lens[j - 1]
        best[j], cut[j] = best[j - 1] + overhead + longest, j - 1  # alone
        for i in range(j - 2, -1, -1):  # members i..j-1
            size = (j - i) * longest
            if size > max_tokens:
                break
            cost = best[i] + overhead + size
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]

"""Decode attention on the CPU: the candidates for a step whose cost follows the sum of KV lengths.

    python -m bench.attention_paths [--dtype bfloat16 float32] [--batch 1 8 32] [--repeats 7] [--flex]

One decode step's attention over a paged KV cache (gather each sequence's blocks, then attend),
on SmolLM2-135M's shapes (30 layers, 3 KV heads, 9 query heads, head_dim 64, 16-token blocks),
each layer its own KV (so the step reads as many bytes as the model's would). Weight matmuls are
not included: they are the same for every candidate. Candidates:

- padded: the engine's "padded" plan (every sequence gathered and padded to the longest KV);
- varlen: the engine's "varlen" plan (decode groups of similar KV length, attention.py);
- paged: the engine's "paged" plan (the compiled kernel reads each row's KV from its blocks,
  engines/torch/kernels/paged_decode.cpp; built on first use, not timed): in bfloat16 on a CPU
  with AMX-BF16 the scores on AMX tiles (paged_decode_amx.cpp), else the AVX-512 loops;
- paged-avx512: the same plan with the kernel's AVX-512 loops forced (the AMX kernel's baseline);
- per-seq: one SDPA call per sequence over its own gathered blocks;
- bucket-1.5: fixed buckets (a new bucket when a length passes 1.5x the bucket's shortest);
- segment: one flat gather of every real key, scores and a segment softmax by scatter ops;
- flex (--flex): torch.nn.attention.flex_attention compiled by inductor, keys concatenated and a
  document mask (first call compiles, ~20 s, not timed).

Batches: uniform KV lengths (64, 512, 1500), mixed (64, 64, 512, 1500 repeated: the policy
benchmark's mix) and one-long (B-1 of 64 and one of 1500). Each case is timed `repeats` times,
the candidates in turn within each repeat so that machine noise falls on all alike; the table
gives the median milliseconds per step (30 layers) and each candidate's largest difference from
padded's output. A sweep of the varlen group constants follows (--sweep). JSON under
bench/results/attention_paths.json, markdown on stdout.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from engines.torch import attention as attention_module
from engines.torch.forward_batch import build_batch
from engines.torch.kv_cache import PagedKVCache

LAYERS, KV_HEADS, GROUP, HEAD_DIM, BLOCK = 30, 3, 3, 64, 16
"""SmolLM2-135M: 30 layers, 3 KV heads of 64, 3 query heads per KV head; the engine's 16-token blocks."""
RESULTS = Path(__file__).resolve().parent / "results"

CASES = {
    "uniform-64": lambda b: [64] * b,
    "uniform-512": lambda b: [512] * b,
    "uniform-1500": lambda b: [1500] * b,
    "mixed": lambda b: [(64, 64, 512, 1500)[i % 4] for i in range(b)] if b > 1 else [1500],
    "one-long": lambda b: [64] * (b - 1) + [1500],
}


class Setup:
    """A paged cache holding sequences of the given KV lengths (blocks handed out round-robin, so
    a sequence's blocks are scattered as they are after decoding side by side), and one step's
    queries."""

    def __init__(self, lens: list[int], dtype: torch.dtype):
        self.lens = lens
        blocks = sum(-(-n // BLOCK) for n in lens)
        self.cache = PagedKVCache(num_layers=LAYERS, num_blocks=blocks, block_size=BLOCK, num_kv_heads=KV_HEADS,
                                  head_dim=HEAD_DIM, dtype=dtype, device=torch.device("cpu"), tier="cpu")
        self.cache.kv.normal_()
        self.ids = [f"s{i}" for i in range(len(lens))]
        for step in range(1, max(lens) + 1, BLOCK):  # grow every sequence one block at a time
            for rid, n in zip(self.ids, lens):
                self.cache.reserve(rid, min(step, n))
        g = torch.Generator().manual_seed(0)
        self.q = torch.randn(len(lens), KV_HEADS * GROUP, HEAD_DIM, generator=g).to(dtype)
        self.tables = [self.cache.tables[i] for i in self.ids]

    def layers(self):
        """Each layer's K and V blocks."""
        return [self.cache.layer(i) for i in range(LAYERS)]

    def kv_layers(self):
        """Each layer's [2, blocks, block_size, kv_heads, head_dim], as the engine's plans read it."""
        return [self.cache.kv[i] for i in range(LAYERS)]


def engine_plan(path: str, impl: str | None = None):
    """The engine's plan of `path`; impl: the paged decode kernel's implementation, forced."""
    def make(s: Setup):
        batch = build_batch(s.cache, s.ids, [[0]] * len(s.lens), [n - 1 for n in s.lens], torch.device("cpu"),
                            path, GROUP)
        if impl is not None:
            batch.attention.kernel = functools.partial(batch.attention.kernel, impl=impl)
        q = s.q.index_select(0, torch.argsort(batch.last))  # rows in the plan's order
        k = torch.zeros(len(s.lens), KV_HEADS, HEAD_DIM, dtype=s.q.dtype)  # unread by decode plans
        layers = s.kv_layers()

        def step():
            for kv in layers:
                out = batch.attention.attend(q, k, k, kv)
            return out.view(len(s.lens), -1, HEAD_DIM)[batch.last]
        return step
    return make


def per_seq(s: Setup):
    tables = [torch.tensor(t) for t in s.tables]
    layers = s.layers()

    def step():
        for kb, vb in layers:
            outs = []
            for i, (t, n) in enumerate(zip(tables, s.lens)):
                k = kb.index_select(0, t).flatten(0, 1)[:n].transpose(0, 1)[None]
                v = vb.index_select(0, t).flatten(0, 1)[:n].transpose(0, 1)[None]
                outs.append(F.scaled_dot_product_attention(s.q[i].view(1, KV_HEADS, GROUP, HEAD_DIM), k, v))
            out = torch.cat(outs)
        return out.reshape(len(s.lens), -1, HEAD_DIM)
    return step


def buckets(ratio: float):
    def make(s: Setup):
        order = sorted(range(len(s.lens)), key=s.lens.__getitem__)
        groups, cur = [], []
        for i in order:
            if cur and s.lens[i] > ratio * s.lens[cur[0]]:
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        plans = []
        for g in groups:
            width = max(len(s.tables[i]) for i in g)
            tables = torch.tensor([s.tables[i] + [0] * (width - len(s.tables[i])) for i in g])
            mask = (torch.arange(width * BLOCK) < torch.tensor([s.lens[i] for i in g])[:, None])[:, None, None]
            plans.append((torch.tensor(g), tables, mask))
        layers = s.layers()

        def step():
            for kb, vb in layers:
                out = torch.empty_like(s.q)
                for idx, tables, mask in plans:
                    k = kb[tables].flatten(1, 2).transpose(1, 2)
                    v = vb[tables].flatten(1, 2).transpose(1, 2)
                    q = s.q[idx].view(len(idx), KV_HEADS, GROUP, HEAD_DIM)
                    out[idx] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(len(idx), -1, HEAD_DIM)
            return out
        return step
    return make


def segment(s: Setup):
    slots = torch.cat([(torch.tensor(t)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n]
                       for t, n in zip(s.tables, s.lens)])
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(s.lens)])
    B, scale = len(s.lens), 1 / math.sqrt(HEAD_DIM)
    q = s.q.view(B, KV_HEADS, GROUP, HEAD_DIM)
    layers = s.layers()

    def step():
        for kb, vb in layers:
            k = kb.view(-1, KV_HEADS, HEAD_DIM).index_select(0, slots)
            v = vb.view(-1, KV_HEADS, HEAD_DIM).index_select(0, slots)
            scores = torch.einsum("nhd,nhgd->nhg", k, q[seg]).float() * scale
            top = torch.full((B, KV_HEADS, GROUP), -math.inf).scatter_reduce(
                0, seg[:, None, None].expand_as(scores), scores, "amax")
            p = (scores - top[seg]).exp()
            den = torch.zeros(B, KV_HEADS, GROUP).index_add_(0, seg, p)
            out = torch.zeros(B, KV_HEADS, GROUP, HEAD_DIM).index_add_(0, seg, p[..., None] * v[:, :, None].float())
            out = (out / den[..., None]).to(s.q.dtype)
        return out.reshape(B, -1, HEAD_DIM)
    return step


def flex(s: Setup):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    slots = torch.cat([(torch.tensor(t)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n]
                       for t, n in zip(s.tables, s.lens)])
    seq_of_key = torch.cat([torch.full((n,), i) for i, n in enumerate(s.lens)])
    B, N = len(s.lens), len(slots)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: seq_of_key[kv_idx] == q_idx, 1, None, B, N, device="cpu")
    attend = torch.compile(flex_attention, dynamic=False)
    q = s.q.view(B, KV_HEADS * GROUP, HEAD_DIM).transpose(0, 1)[None]  # [1, heads, B, hd]
    layers = s.layers()

    def step():
        for kb, vb in layers:
            k = kb.view(-1, KV_HEADS, HEAD_DIM).index_select(0, slots).transpose(0, 1)[None]
            v = vb.view(-1, KV_HEADS, HEAD_DIM).index_select(0, slots).transpose(0, 1)[None]
            out = attend(q, k, v, block_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1)
    step()  # compiles
    return step


CANDIDATES = {"padded": engine_plan("padded"), "varlen": engine_plan("varlen"), "paged": engine_plan("paged"),
              "paged-avx512": engine_plan("paged", "avx512"), "per-seq": per_seq,
              "bucket-1.5": buckets(1.5), "segment": segment}


def time_case(lens: list[int], dtype: torch.dtype, candidates: dict, repeats: int) -> dict:
    setup = Setup(lens, dtype)
    steps = {name: make(setup) for name, make in candidates.items()}
    ref = steps["padded"]().float()
    err = {name: (fn().float() - ref).abs().max().item() for name, fn in steps.items()}
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_err": err[name]}
            for name, t in times.items()}


def sweep(dtype: torch.dtype, repeats: int) -> list[dict]:
    """The varlen group constants: step time of the engine's varlen plan at batch 32 under each
    (overhead, max tokens) pair, on the mixed and uniform cases."""
    rows = []
    for case in ("uniform-64", "uniform-512", "uniform-1500", "mixed", "one-long"):
        setup = Setup(CASES[case](32), dtype)
        for overhead in (0, 64, 256, 1024):
            for cap in (4096, 16384, 65536):
                attention_module.GROUP_OVERHEAD_TOKENS, attention_module.GROUP_MAX_TOKENS = overhead, cap
                step = engine_plan("varlen")(setup)
                step()
                t = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    step()
                    t.append(time.perf_counter() - t0)
                rows.append({"case": case, "overhead": overhead, "max_tokens": cap, "ms": 1e3 * statistics.median(t)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--flex", action="store_true", help="also time flex_attention (compiles first: ~20 s per case)")
    p.add_argument("--sweep", action="store_true", help="also sweep the varlen group constants at batch 32")
    p.add_argument("--out", type=Path, default=RESULTS / "attention_paths.json")
    a = p.parse_args(argv)
    candidates = {**CANDIDATES, **({"flex": flex} if a.flex else {})}
    load = [os.getloadavg()[0]]
    rows, sweeps = [], {}
    for dtype_name in a.dtype:
        dtype = getattr(torch, dtype_name)
        for case in a.cases:
            for b in a.batch:
                lens = CASES[case](b)
                with torch.inference_mode():
                    result = time_case(lens, dtype, candidates, a.repeats)
                rows.append({"dtype": dtype_name, "case": case, "batch": b, "sum_kv": sum(lens),
                             "batch_x_max_kv": b * max(lens), "candidates": result})
                print(f"{dtype_name} {case} B={b}: " + ", ".join(f"{n} {r['ms']:.1f}" for n, r in result.items()),
                      file=sys.stderr, flush=True)
        if a.sweep:
            with torch.inference_mode():
                sweeps[dtype_name] = sweep(dtype, a.repeats)
    load.append(os.getloadavg()[0])
    result = {"command": "python -m bench.attention_paths " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                         f"torch {torch.__version__}",
              "load_avg_before_after": [round(x, 2) for x in load], "rows": rows, "sweep": sweeps}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    names = list(candidates)
    print("| dtype | KV lengths | B | sum KV | B x max KV | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        c = r["candidates"]
        print(f"| {r['dtype']} | {r['case']} | {r['batch']} | {r['sum_kv']} | {r['batch_x_max_kv']} | "
              + " | ".join(f"{c[n]['ms']:.1f}" for n in names) + " |")
    for dtype_name, sw in sweeps.items():
        print(f"\nvarlen group constants, {dtype_name}, batch 32 (ms per step):\n")
        print("| case | overhead | max tokens | ms |\n|---|---|---|---|")
        for s in sw:
            print(f"| {s['case']} | {s['overhead']} | {s['max_tokens']} | {s['ms']:.1f} |")
    print(f"\nwritten to {a.out}; load average {load[0]:.2f} -> {load[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

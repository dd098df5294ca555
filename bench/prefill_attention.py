"""Prefill attention on the CPU: this project's kernel against torch's CPU flash attention (SDPA).

    python -m bench.prefill_attention [--lengths 64 512 1500] [--repeats 7] [--out bench/results/prefill_attention.json]

One prompt's causal attention over its own keys, on SmolLM2-135M's shapes (9 query heads, 3 KV
heads, head size 64), bfloat16, 30 layers (each layer its own q, k, v), as the engine's "paged"
path calls each candidate (attention.py, `VarlenPlan.attend`):

- sdpa: `F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)` on [1, heads, T,
  64] views of the rows (the engine's call without the kernel);
- sdpa-contiguous: the same with q, k, v made contiguous first (not timed);
- amx, avx512: `prefill_attention` (engines/torch/kernels/prefill_attention.cpp) writing into the
  rows, on AMX tiles where the CPU has AMX-BF16 (and then also with AVX512-BF16 dot products,
  which every AMX CPU has), else with AVX512-BF16 dot products (AMD Zen 4, say).

The candidates alternate within each repeat; the table gives the median milliseconds for 30
layers, the ratio to sdpa, each one's largest difference from float64, and each one's rate
(GFLOP/s) beside the rate of a bfloat16 matmul of the prefill's linear layers on the same rows.
On a CPU without AVX512-BF16 only SDPA runs (the engine's prefill attention there).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.cpu_record import write_record
from engines.torch.cpu_kernels import kernels

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64
RESULTS = Path(__file__).resolve().parent / "results"


def reference(q, k, v):
    """float64 causal attention of one prompt, [T, heads, hd]."""
    kk, vv = (x.double().repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1) for x in (k, v))
    s = q.double().transpose(0, 1) @ kk.transpose(1, 2) * HEAD_DIM ** -0.5
    T = q.shape[0]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return (torch.softmax(s, dim=-1) @ vv).transpose(0, 1)


def causal_flops(T: int) -> float:
    """Multiply-adds x 2 of one layer's causal attention: QK^T and PV over the T(T+1)/2 pairs."""
    return 2 * 2 * HEADS * HEAD_DIM * T * (T + 1) / 2


def matmul_gflop_s(T: int, repeats: int) -> float:
    """GFLOP/s of a bfloat16 matmul of T rows by SmolLM2's MLP up-projection (576 x 1536), as the
    prefill's linear layers run it: what attention's rate compares with on this CPU."""
    x = torch.randn(T, 576).to(torch.bfloat16)
    w = torch.randn(1536, 576).to(torch.bfloat16)
    F.linear(x, w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(LAYERS):
            F.linear(x, w)
        times.append(time.perf_counter() - t0)
    return LAYERS * 2 * T * 576 * 1536 / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 1500])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS / "prefill_attention.json")
    a = p.parse_args(argv)
    ops = kernels()
    impls = ({"amx": ["amx", "avx512"], "avx512": ["avx512"]}.get(ops.prefill_attention_impl(), [])
             if ops is not None else [])
    if not impls:
        print("no prefill kernel on this CPU (no AVX512-BF16): timing torch's SDPA alone", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    rows = []
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for T in a.lengths:
            layers = [tuple(torch.randn(T, h, HEAD_DIM, generator=g).to(torch.bfloat16) for h in (HEADS, KV_HEADS, KV_HEADS))
                      for _ in range(LAYERS)]
            out = torch.empty(T, HEADS, HEAD_DIM, dtype=torch.bfloat16)

            def sdpa(q, k, v):
                return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                      v.transpose(0, 1)[None], is_causal=True,
                                                      enable_gqa=True)[0].transpose(0, 1)

            def sdpa_contiguous(q, k, v):
                q, k, v = (x.transpose(0, 1).contiguous()[None] for x in (q, k, v))
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1)

            def kernel(impl):
                def run(q, k, v):
                    ops.prefill_attention(q, k, v, out, HEAD_DIM ** -0.5, impl)
                    return out
                return run

            candidates = {"sdpa": sdpa, "sdpa-contiguous": sdpa_contiguous, **{i: kernel(i) for i in impls}}
            want = reference(*layers[0])
            err = {n: (f(*layers[0]).double() - want).abs().max().item() for n, f in candidates.items()}
            times = {n: [] for n in candidates}
            for _ in range(a.repeats):
                for n, f in candidates.items():
                    t0 = time.perf_counter()
                    for q, k, v in layers:
                        f(q, k, v)
                    times[n].append(time.perf_counter() - t0)
            ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
            rows.append({"prompt_tokens": T, "ms": ms, "max_err_vs_float64": err,
                         "gflop_s": {n: LAYERS * causal_flops(T) / v / 1e6 for n, v in ms.items()},
                         "matmul_gflop_s": matmul_gflop_s(T, a.repeats)})
            print(f"T={T}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in ms.items()), file=sys.stderr, flush=True)
    names = ["sdpa", "sdpa-contiguous", *impls]
    print("| prompt tokens | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"sdpa / {i}" for i in impls) + " | max error vs float64 ("
          + ", ".join(["sdpa", *impls]) + ") | " + " | ".join(f"{n} GFLOP/s" for n in ["sdpa", *impls])
          + " | a linear layer's matmul GFLOP/s |")
    print("|---:|" + "---:|" * len(names) + "---:|" * len(impls) + "---|" + "---:|" * (len(impls) + 2))
    for r in rows:
        m, e, g = r["ms"], r["max_err_vs_float64"], r["gflop_s"]
        print(f"| {r['prompt_tokens']} | " + " | ".join(f"{m[n]:.1f}" for n in names) + " | "
              + "".join(f"{m['sdpa'] / m[i]:.2f}x | " for i in impls)
              + ", ".join(f"{e[n]:.1e}" for n in ["sdpa", *impls]) + " | "
              + " | ".join(f"{g[n]:.0f}" for n in ["sdpa", *impls]) + f" | {r['matmul_gflop_s']:.0f} |")
    write_record(a.out, "bench.prefill_attention", argv, load_before, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

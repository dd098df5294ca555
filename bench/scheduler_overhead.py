"""Time of one density-first scheduling decision over pools of 1k, 10k and 100k requests.

    python -m bench.scheduler_overhead --pools 1000 10000 100000 --decisions 300

Pool KV lengths come from the Azure LLM conversation trace (../shared/workloads, CC-BY 4.0):
each request's length is its ContextTokens plus a uniform share of its GeneratedTokens (it is
somewhere in its decode), resampled with replacement to the pool size. Index range [1, 65536]
(8 levels), 16-token blocks, Kmin 36, Bmax = 40% of a decode GPU's KV blocks, taking Llama-3-8B
on an 80 GB GPU with 50 GiB for KV: 128 KiB per token -> 409,600 tokens = 25,600 blocks ->
Bmax 10,240 blocks. One decision = what a batch switch does: the chosen batch leaves the pool,
as many spilled requests (fresh draws) enter it, and the next batch is searched. Reports p50/p99.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from tqdm import tqdm

from orchestrator.length_index import LengthIndex

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO.parent / "shared" / "workloads" / "azure_llm_2023_conv.csv"
MAX_LEN, BLOCK, KMIN, BMAX = 65536, 16, 36, 10_240


def trace_lengths(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return (np.array([int(r["ContextTokens"]) for r in rows]), np.array([int(r["GeneratedTokens"]) for r in rows]))


def draw(rng, ctx, gen, n):
    i = rng.integers(0, ctx.size, n)
    lengths = ctx[i] + (rng.random(n) * gen[i]).astype(np.int64)
    return np.clip(lengths, 1, MAX_LEN)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pools", nargs="+", type=int, default=[1000, 10_000, 100_000])
    p.add_argument("--decisions", type=int, default=300)
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "scheduler_overhead.json")
    a = p.parse_args(argv)
    ctx, gen = trace_lengths(a.trace)
    rng = np.random.default_rng(a.seed)
    rows = []
    for n in a.pools:
        idx = LengthIndex(MAX_LEN, BLOCK)
        for i, length in enumerate(draw(rng, ctx, gen, n)):
            idx.insert(f"r{i}", int(length))
        next_id = n
        times, sizes, spans = [], [], []
        for _ in tqdm(range(a.decisions), desc=f"pool {n}", unit="decision"):
            t0 = time.perf_counter()
            window = idx.densest(KMIN, BMAX, kmax=256)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            sizes.append(len(window.request_ids))
            spans.append(window.span)
            for rid in window.request_ids:  # the batch leaves; as many spilled requests return
                idx.remove(rid)
            for length in draw(rng, ctx, gen, len(window.request_ids)):
                idx.insert(f"r{next_id}", int(length))
                next_id += 1
        ms = np.array(times) * 1e3
        rows.append({"pool": n, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                     "batch_size_median": statistics.median(sizes), "span_median": statistics.median(spans)})
    result = {"command": "python -m bench.scheduler_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": date.today().isoformat(), "machine": platform.machine(), "kmin": KMIN, "bmax_blocks": BMAX,
              "block_size": BLOCK, "max_len": MAX_LEN, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| pooled requests | p50 ms | p99 ms | batch size (median) | KV-length span (median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pool']:,} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['batch_size_median']:.0f} | "
              f"{r['span_median']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

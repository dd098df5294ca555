"""Time of one density-first scheduling decision over pools of 1k, 10k and 100k requests.

    python -m bench.scheduler_overhead --pools 1000 10000 100000 --decisions 300

Pool KV lengths come from the Azure LLM conversation trace (bench/traces, CC-BY 4.0):
each request's length is its ContextTokens plus a uniform share of its GeneratedTokens (it is
somewhere in its decode), resampled with replacement to the pool size. Index range [1, 65536]
(8 levels), 16-token blocks, Kmin 36, Bmax = 40% of a decode GPU's KV blocks, taking Llama-3-8B
on an 80 GB GPU with 50 GiB for KV: 128 KiB per token -> 409,600 tokens = 25,600 blocks ->
Bmax 10,240 blocks. Two measurements, p50/p99 each:
- search: the density-first search alone, after the chosen batch left the pool and as many spilled
  requests (fresh draws) entered it;
- decision: one whole `AlignedPolicy.schedule()` (switch, starvation guard, refill, admission,
  staging) on a `Draft` of a pool of that many parked requests, and the plan applied to the pool
  and the ledger (what the run loop times as `schedule_seconds`), with a running batch of 64 of
  which 4 finish per iteration, and 4 arrivals per iteration. The moves it plans are settled at
  once between decisions (no engine: this times the policy only).
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

from engines.base import HOST, Capabilities, DeviceInfo, EngineInfo, ModelInfo
from orchestrator.config import ServeConfig
from orchestrator.core import Request, RequestState
from orchestrator.draft import Draft
from orchestrator.kv_ledger import KVLedger
from orchestrator.length_index import LengthIndex
from orchestrator.policies.aligned import AlignedPolicy
from orchestrator.pool import RequestPool
from orchestrator.run_loop import apply_plan

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "bench" / "traces" / "azure_llm_2023_conv.csv"
MAX_LEN, BLOCK, KMIN, BMAX = 65536, 16, 36, 10_240


def trace_lengths(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return (np.array([int(r["ContextTokens"]) for r in rows]), np.array([int(r["GeneratedTokens"]) for r in rows]))


def draw(rng, ctx, gen, n):
    i = rng.integers(0, ctx.size, n)
    lengths = ctx[i] + (rng.random(n) * gen[i]).astype(np.int64)
    return np.clip(lengths, 1, MAX_LEN)


def time_search(rng, ctx, gen, n: int, decisions: int) -> dict:
    idx = LengthIndex(MAX_LEN, BLOCK)
    for i, length in enumerate(draw(rng, ctx, gen, n)):
        idx.insert(f"r{i}", int(length))
    next_id = n
    times, sizes, spans = [], [], []
    for _ in tqdm(range(decisions), desc=f"search, pool {n}", unit="decision"):
        t0 = time.perf_counter()
        window = idx.densest(KMIN, BMAX, kmax=256)
        times.append(time.perf_counter() - t0)
        sizes.append(len(window.request_ids))
        spans.append(window.span)
        for rid in window.request_ids:  # the batch leaves; as many spilled requests return
            idx.remove(rid)
        for length in draw(rng, ctx, gen, len(window.request_ids)):
            idx.insert(f"r{next_id}", int(length))
            next_id += 1
    ms = np.array(times) * 1e3
    return {"pool": n, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "batch_size_median": statistics.median(sizes), "span_median": statistics.median(spans)}


def request(rid: str, length: int, now: float) -> Request:
    # range() stands in for the prompt's token ids: the policy reads only its length.
    r = Request(rid, range(max(length - 1, 1)), max_tokens=2)
    r.arrival_time = now
    return r


def time_decision(rng, ctx, gen, n: int, decisions: int) -> dict:
    """p50/p99 of AlignedPolicy.schedule() and the plan's application over n parked requests
    (see the module docstring)."""
    model = ModelInfo("LlamaForCausalLM", 128_256, MAX_LEN, 32, 8, 128, "bfloat16", 8_000_000_000)
    info = EngineInfo("bench", model, (DeviceInfo("cuda:0", "cuda", 25_600),), BLOCK, 131_072 * BLOCK,
                      host_blocks=10**9, capabilities=Capabilities(can_offload=True))
    ledger = KVLedger({"cuda:0": 25_600, HOST: 10**9})
    clock = [0.0]
    policy = AlignedPolicy(info, ServeConfig(max_batch_size=64, max_wait_s=1e9))
    pool = RequestPool(MAX_LEN, BLOCK)
    ids = iter(range(10**9))
    for length in draw(rng, ctx, gen, n):
        r = request(f"r{next(ids)}", int(length), 0.0)
        pool.add(r)
        pool.waiting.remove(r)
        ledger.reserve(r.id, HOST, info.blocks_for(r.kv_len))
        r.state = RequestState.PARKED
        pool.on_host(r)
    times = []
    for _ in tqdm(range(decisions), desc=f"decision, pool {n}", unit="decision"):
        clock[0] += 1.0
        for r in list(pool.running[:4]):  # four members finish
            pool.remove(r)
            ledger.release(r.id)
        for length in draw(rng, ctx, gen, 4):
            pool.add(request(f"r{next(ids)}", int(length), clock[0]))
        t0 = time.perf_counter()
        plan = policy.schedule(Draft(pool, ledger, clock[0]))
        apply_plan(plan, pool, ledger, clock[0], info.decode_device)
        times.append(time.perf_counter() - t0)
        settle(plan, pool, ledger, info)
    ms = np.array(times) * 1e3
    return {"pool": n, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def settle(plan, pool: RequestPool, ledger: KVLedger, info: EngineInfo) -> None:
    """What the run loop and the engine would do with the plan, done at once."""
    for r in plan.prefill:
        pool.start(r)
        if r in plan.park:
            pool.to_host(r, 0.0)
            r.moving = False
            ledger.release(r.id, info.decode_device)
            pool.on_host(r)
    for r in plan.offload:
        r.moving = False
        ledger.release(r.id, info.decode_device)
        pool.on_host(r)
    for r in plan.load:
        r.moving = False
        ledger.release(r.id, HOST)


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
    rows = [time_search(rng, ctx, gen, n, a.decisions) for n in a.pools]
    decisions = [time_decision(rng, ctx, gen, n, a.decisions) for n in a.pools]
    result = {"command": "python -m bench.scheduler_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": date.today().isoformat(), "machine": platform.machine(), "kmin": KMIN, "bmax_blocks": BMAX,
              "block_size": BLOCK, "max_len": MAX_LEN, "rows": rows, "decisions": decisions}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| pooled requests | p50 ms | p99 ms | batch size (median) | KV-length span (median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pool']:,} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['batch_size_median']:.0f} | "
              f"{r['span_median']:.0f} |")
    print("\n| pooled requests | whole decision p50 ms | p99 ms |")
    print("|---|---|---|")
    for r in decisions:
        print(f"| {r['pool']:,} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

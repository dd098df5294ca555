"""The peer benchmark's workload through the orchestrator in this process: policies side by side.

    python -m bench.peer.inprocess [--engine-dir engines_built/smollm2] [--policy fcfs adaptive aligned]
        [--device cpu] [--attention auto|paged|varlen|padded] [--requests 32] [--concurrency 0] [--repeats 1]
        [--output-len 128] [--out bench/results/inprocess.json]

The same prompts as `python -m bench.peer` (real text, 64/512/1,500 tokens, seeded; 128 output
tokens, EOS ignored, greedy), submitted all at once (or as a closed loop of --concurrency
clients) to a fresh `Orchestrator` per run on one engine, stepped from this thread until every
request finishes: no Triton, no HTTP, no client. Policies take turns, their order reversed every
round (--repeats); ratios are to the first policy in the same round. Prints, per policy, the
output tok/s, TPOT and TTFT percentiles, the token-weighted alignment of the decode batches
(sum KV / (B x max KV)), the seconds spent in prefill and decode calls, and how often the
policy made each kind of decision. Beside the served figures of `bench.peer` (same commit, same
machine) the difference is what serving and the benchmark client cost on the same cores.

--attention picks the torch engine's path: "paged" (this CPU's default, a step costs its real
KV) or "padded" (a step costs batch x longest KV): the second is where grouping by length pays,
and where the adaptive policy's share is measured (docs/benchmarks.md, issue 16).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from bench.cpu_record import write_record
from bench.peer.prompts import make_prompts
from engines.base import Engine
from engines.manifest import read_manifest
from engines.torch.attention import ATTENTION_PATHS
from engines.torch.engine import TorchEngine
from orchestrator.config import UNBOUNDED, ServeConfig
from orchestrator.service import Orchestrator


def run(engine: Engine, prompts: list[list[int]], policy: str, output_len: int, concurrency: int = 0) -> dict:
    """Serve every prompt through a fresh orchestrator on `engine`: all at once (concurrency 0),
    or as a closed loop keeping `concurrency` requests in flight (a client sends the next prompt
    when one finishes), stepped from this thread until every request has finished."""
    orch = Orchestrator(engine, ServeConfig(policy=policy, max_queue=max(1024, len(prompts)),
                                            max_queue_tokens=UNBOUNDED))
    metrics = orch.loop.metrics
    metrics.history, metrics.timings = collections.deque(), collections.deque()  # keep every record
    limit = concurrency or len(prompts)
    t0 = time.perf_counter()
    requests, sent = [], {}
    while len(requests) < len(prompts) or not all(r.finished for r in requests):
        while len(requests) < len(prompts) and sum(not r.finished for r in requests) < limit:
            r = orch.submit(prompts[len(requests)], max_tokens=output_len)
            sent[r.id] = time.monotonic()
            requests.append(r)
        orch.step()
    wall = time.perf_counter() - t0
    calls = list(metrics.timings)
    seconds = collections.Counter()
    for c in calls:
        seconds[c.op] += c.seconds
    full = [c for c in calls if c.op == "decode" and c.num_seqs == min(limit, len(prompts))]
    ttft = [r.first_token_time - sent[r.id] for r in requests]
    tpot = [(r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1) for r in requests if len(r.token_times) > 1]
    decodes = [it for it in metrics.history if it.batch_size]
    kv_weighted = sum(it.batch_size * it.alignment for it in decodes) / max(sum(it.batch_size for it in decodes), 1)
    predicted = [it.predicted_seconds / it.decode_seconds for it in decodes if it.predicted_seconds and it.decode_seconds]
    return {
        "policy": policy, "wall_s": wall, "output_tok_s": sum(len(r.output_ids) for r in requests) / wall,
        "seconds_by_call": dict(seconds),
        "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot),
        "alignment": kv_weighted, "decode_steps": len(decodes),
        "mean_batch": statistics.fmean(it.batch_size for it in decodes) if decodes else 0.0,
        "decisions": dict(collections.Counter(it.decision.kind for it in decodes if it.decision)),
        "predicted_over_measured_p50": statistics.median(predicted) if predicted else None,
        "full_batch_decode_step_ms": statistics.median(c.seconds for c in full) * 1e3 if full else None,
        "full_batch_kv_tokens": statistics.median(c.kv_tokens for c in full) if full else None,
    }


def _percentiles(xs: list[float]) -> dict:
    return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)), "mean": statistics.fmean(xs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", type=Path, default=Path("engines_built/smollm2"))
    p.add_argument("--policy", nargs="+", default=["fcfs", "adaptive", "aligned"],
                   help="policies to run; the first is the baseline of the ratios")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--attention", default=None, choices=["auto", *ATTENTION_PATHS],
                   help="the torch engine's attention path (default: the engine directory's)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=0, help="requests in flight (0: all at once)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every policy, alternating their order")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512, 1500])
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-gib", type=int, default=2, help="device KV in GiB, as bench.peer gives the server")
    p.add_argument("--out", type=Path, default=None, help="JSON record (default: none)")
    a = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    tokenizer = Tokenizer.from_file(str(a.engine_dir / "tokenizer.json"))
    prompts = [tokenizer.encode(x.text).ids for x in make_prompts(tokenizer, a.prompt_lengths, a.requests, a.seed)]
    manifest = read_manifest(a.engine_dir)
    # As bench.peer's server loads it: the manifest's dtype and host pool, kv_gib of device blocks.
    engine = TorchEngine.from_engine_dir(a.engine_dir, manifest, device=a.device, attention=a.attention,
                                         kv_blocks=a.kv_gib * 2**30 // manifest.bytes_per_block)
    info = engine.describe()
    cost = info.step_costs[0] if info.step_costs else None
    print(f"{len(prompts)} prompts, {sum(map(len, prompts)):,} tokens; {info.model.dtype}, attention "
          f"{engine.attention}, {torch.get_num_threads()} threads, concurrency {a.concurrency or 'all at once'}; "
          f"step cost: {cost if cost is None else f'{cost.attention} fixed {cost.fixed * 1e3:.1f} ms, padded {cost.padded_kv:.2e} s/token'}")
    runs: list[dict] = []
    for rep in range(a.repeats):
        for policy in (a.policy if rep % 2 == 0 else a.policy[::-1]):
            r = run(engine, prompts, policy, a.output_len, a.concurrency)
            r["repeat"] = rep
            runs.append(r)
            print(f"  round {rep}: {policy} {r['output_tok_s']:.1f} tok/s, TPOT p99 {r['tpot_s']['p99'] * 1e3:.0f} ms",
                  flush=True)
    base = a.policy[0]
    print(f"\n| policy | output tok/s | / {base} (median, min-max) | TPOT p50 / p99 ms | TTFT p50 / p99 s | "
          "alignment | mean batch | prefill s | decode s | decisions |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    summary = {}
    for policy in a.policy:
        mine = [r for r in runs if r["policy"] == policy]
        ratios = [r["output_tok_s"] / b["output_tok_s"] for r in mine for b in runs
                  if b["policy"] == base and b["repeat"] == r["repeat"]]
        tpot99 = [r["tpot_s"]["p99"] / b["tpot_s"]["p99"] for r in mine for b in runs
                  if b["policy"] == base and b["repeat"] == r["repeat"]]
        med = lambda k, q: statistics.median(r[k][q] for r in mine)  # noqa: E731
        by = collections.Counter()
        for r in mine:
            by.update(r["seconds_by_call"])
        summary[policy] = {"output_tok_s": statistics.median(r["output_tok_s"] for r in mine),
                           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                           "tpot_p99_ratio_median": statistics.median(tpot99),
                           "tpot_p99_ratio_max": max(tpot99)}
        decisions = collections.Counter()
        for r in mine:
            decisions.update(r["decisions"])
        print(f"| {policy} | {summary[policy]['output_tok_s']:.1f} | {statistics.median(ratios):.3f}x "
              f"({min(ratios):.3f}-{max(ratios):.3f}) | {med('tpot_s', 'p50') * 1e3:.0f} / {med('tpot_s', 'p99') * 1e3:.0f} | "
              f"{med('ttft_s', 'p50'):.2f} / {med('ttft_s', 'p99'):.2f} | "
              f"{statistics.median(r['alignment'] for r in mine):.2f} | {statistics.median(r['mean_batch'] for r in mine):.1f} | "
              f"{by.get('prefill', 0) / len(mine):.2f} | {(by.get('decode', 0) + by.get('mixed', 0)) / len(mine):.2f} | "
              f"{', '.join(f'{k} {v}' for k, v in decisions.most_common())} |")
    if a.out:
        write_record(a.out, "bench.peer.inprocess", argv, load_before, attention=engine.attention,
                     step_cost=None if cost is None else {"attention": cost.attention, "fixed": cost.fixed,
                                                          "per_seq": cost.per_seq, "padded_kv": cost.padded_kv,
                                                          "kv": cost.kv},
                     summary=summary, runs=runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

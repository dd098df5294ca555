"""The default policy's throughput / TPOT frontier at one simulated point: fixed chunk budgets and TPOT targets.

    python -m bench.chunk_frontier [--model OPT-6.7B] [--workload azure-code] [--dispatch greedy]
        [--load 1.2] [--chunks 256 512 768 1024 2048] [--targets 0.025 0.1]

One (model, workload, load) point of `bench.simulate`'s paper matrix (the same requests, rate,
8 GPUs and settings): fcfs, DistServe-like, and `adaptive` on single GPUs with chunks forced on
at each fixed budget (`chunk_tokens`) and at each TPOT target (`tpot_slo_s`). Prints output
tok/s against fcfs's, TPOT p99 and p50, TTFT p50 and the mean decode batch, as markdown.
"""
from __future__ import annotations

import argparse
import sys

from bench import simulate as sim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="OPT-6.7B")
    p.add_argument("--workload", default="azure-code")
    p.add_argument("--dispatch", default="greedy")
    p.add_argument("--load", type=float, default=1.2)
    p.add_argument("--chunks", nargs="*", type=int, default=[256, 512, 768, 1024, 2048])
    p.add_argument("--targets", nargs="*", type=float, default=[0.025, 0.1], help="TPOT targets, seconds")
    p.add_argument("--requests", type=int, default=sim.MATRICES["paper"].requests)
    a = p.parse_args(argv)
    args = dict(hardware="H100-SXM", gpus=8, host_share=0.9, dispatch=a.dispatch, slo_ttft=2.0, slo_tpot=0.1, seed=0,
                dashboard=None)
    args, base, cap = sim.prepare(args, a.model, a.workload, a.requests)
    workload = sim.with_load(base, a.load * cap, 0)
    variants = [sim.VARIANTS[sim.BASELINE], sim.VARIANTS["disagg-fcfs (DistServe-like)"]]
    variants += [sim.Variant(f"adaptive, {c} tokens a step", "adaptive", 1, dict(adaptive_chunks="on", chunk_tokens=c))
                 for c in a.chunks]
    variants += [sim.Variant(f"adaptive, TPOT target {t * 1e3:g} ms", "adaptive", 1,
                             dict(adaptive_chunks="on", tpot_slo_s=t)) for t in a.targets]
    print(f"{a.model}, {a.workload}, load {a.load}, dispatch {a.dispatch}, {len(workload)} requests, 8 GPUs\n")
    print("| variant | output tok/s / fcfs | TPOT p99 (ms) | TPOT p50 (ms) | TTFT p50 (s) | mean decode batch |")
    print("|---|---|---|---|---|---|")
    fcfs = None
    for v in variants:  # a variant's settings override bench.simulate's BASE_CONFIG
        m = sim.run_variant(args, v, workload)
        fcfs = fcfs or m["output_tok_s"]
        print(f"| {v.label} | {m['output_tok_s'] / fcfs:.3f}x | {m['tpot_s']['p99'] * 1e3:.1f} | "
              f"{m['tpot_s']['p50'] * 1e3:.1f} | {m['ttft_s']['p50']:.2f} | {m['mean_batch']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

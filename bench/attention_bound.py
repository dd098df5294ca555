"""Where a deployment's decode time goes, and the most any batch order or grouping could gain on it.

    python -m bench.attention_bound [--dispatch waves] [--variant "disagg-fcfs (DistServe-like)"]
        [--models OPT-13B ...] [--workloads azure-conv ...] [--loads 0.5 ...] [--results FILE]

Serves the variant on the simulator exactly as `bench.simulate` does (the paper matrix's
requests, rates and GPUs) and, over every decode step of its decode GPUs, splits the step into
its linear part (overhead + max(weight read, matmul), priced by the cost model from the batch
size) and its attention (the rest of the step's time), then prices that attention again at its
bytes roofline: every KV byte read at full HBM bandwidth, no wave left half empty, no order
effect. Reordering or regrouping the same sequences cannot make attention cheaper than that, so

    bound = decode seconds / (decode seconds - attention + roofline attention)

bounds what a scheduler gains in decode tok/s per decode GPU over this variant by order or
grouping alone, at this variant's batches. The bound is not tight: a batch whose units fill one
wave and a few SMs of the next pays a whole second wave in any order (the in-order kernel's
quantization), which only a different batch size removes. (A scheduler that decodes larger
batches gains more from the weight read; one that decodes the same requests has batches set by
the arrivals and its own step time.) With `--results` (a bench.simulate results.json of the same dispatch) each
row shows what the default policy deployed the same way reached.

Prints markdown. Ratios of the roofline cost model, not GPU measurements.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench import simulate as sim
from bench.default_policy import DEFAULT_DISAGG, DISAGG
from engines.sim.cost_model import CostConstants, CostModel
from engines.sim.profiles import hardware_profile, model_profile


def decode_split(iterations, cost: CostModel) -> tuple[float, float, float]:
    """(decode seconds, attention seconds in them, the same attention at its bytes roofline) over
    the decode steps of these iterations (pure decode steps: a disaggregated decode GPU's)."""
    m, hw = cost.model, cost.hardware
    per_token = m.layers * m.kv_heads * 2 * m.head_dim * m.bytes_per_param / (
        hw.hbm_bandwidth * cost.constants.kv_bandwidth_efficiency)
    total = attention = roofline = 0.0
    for it in iterations:
        if not it.batch_size:
            continue
        t = cost.decode_breakdown([1] * it.batch_size)
        linear = t["overhead"] + max(t["weights"], t["matmul"])
        total += it.decode_seconds
        attention += it.decode_seconds - linear
        roofline += per_token * it.kv_mean * it.batch_size
    return total, attention, roofline


def point(job: dict) -> list[dict]:
    """One (model, workload) at every load: the variant's decode split, pooled over its replicas."""
    args, base, cap = sim.prepare(job["args"], job["model"], job["workload"], job["requests"])
    variant = sim.VARIANTS[job["variant"]]
    cost = CostModel(hardware_profile(args["hardware"]), model_profile(args["model"]), CostConstants(),
                     dispatch=sim.dispatch_of(args))
    out = []
    for load in job["loads"]:
        sums = [0.0, 0.0, 0.0]
        for part in sim.run_replicas(args, variant, sim.with_load(base, load * cap, args["seed"])):
            for i, x in enumerate(decode_split(part["iterations"], cost)):
                sums[i] += x
        total, attention, roofline = sums
        out.append({"model": job["model"], "workload": job["workload"], "load": load, "decode_s": total,
                    "attention_s": attention, "roofline_s": roofline,
                    "bound": total / (total - attention + roofline) if total else None})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    m = sim.MATRICES["paper"]
    p.add_argument("--dispatch", default="waves")
    p.add_argument("--variant", default=DISAGG, choices=sorted(sim.VARIANTS))
    p.add_argument("--models", nargs="+", default=list(m.models))
    p.add_argument("--workloads", nargs="+", default=list(m.workloads))
    p.add_argument("--loads", nargs="+", type=float, default=list(m.loads))
    p.add_argument("--requests", type=int, default=m.requests)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--hardware", default="H100-SXM")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--results", type=Path, default=None,
                   help="a bench.simulate results.json of the same dispatch: show the default policy's ratio beside")
    a = p.parse_args(argv)
    args = dict(hardware=a.hardware, gpus=a.gpus, host_share=0.9, dispatch=a.dispatch, slo_ttft=2.0, slo_tpot=0.1,
                seed=0, dashboard=None)
    jobs = [dict(args=args, model=mo, workload=w, requests=a.requests, loads=a.loads, variant=a.variant)
            for mo in a.models for w in a.workloads]
    with ProcessPoolExecutor(max(1, min(a.jobs, len(jobs)))) as pool:
        rows = [r for part in pool.map(point, jobs) for r in part]
    ours = {}
    if a.results:
        runs = {(r["model"], r["workload"], r.get("load"), r["variant"]): r for r in json.loads(a.results.read_text())}
        for (mo, w, load, v), r in runs.items():
            other = runs.get((mo, w, load, a.variant))
            if v == DEFAULT_DISAGG and other:
                ours[(mo, w, load)] = r["metrics"]["decode_tok_s"] / other["metrics"]["decode_tok_s"]
    print(f"| model | workload | load | attention share of {a.variant}'s decode time | attention / its roofline "
          f"| bound on what order or grouping can gain | {DEFAULT_DISAGG} reached |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        got = ours.get((r["model"], r["workload"], r["load"]))
        print(f"| {r['model']} | {r['workload']} | {r['load']} | {r['attention_s'] / r['decode_s']:.0%} | "
              f"{r['attention_s'] / r['roofline_s']:.2f}x | {r['bound']:.3f}x | {'-' if got is None else f'{got:.3f}x'} |")
    reach = sum(r["bound"] >= 1.15 for r in rows)
    print(f"\n{reach} of {len(rows)} points have a bound of 1.15x or more (dispatch {a.dispatch}, {a.variant}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

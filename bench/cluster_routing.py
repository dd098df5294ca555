"""Length-aware vs KV-aware vs round-robin routing over N decode replicas, in virtual time.

    python -m bench.cluster_routing [--quick] [--replicas 8] [--requests 1200] [--jobs N]
        [--workloads azure-conv ...] [--dispatch waves longest-first greedy split] [--loads 0.5 0.8 1.0 1.2]
        [--modes length kv round-robin] [--seed 0] [--out bench/results/cluster-routing-sim]

The cluster half of issue 19's Deliver 4: `serving/cluster/routing.py`'s `Router` (the same
`choose` the length router calls) in front of `--replicas` data-parallel replicas, each the
production orchestrator with the default policy (`adaptive (default)` of bench/simulate.py's
VARIANTS, its BASE_CONFIG) over its own `SimEngine` (bench/simulate.py `_engine`), OPT-13B on the
H100-SXM profile as bench/simulate.py's paper matrix runs it.

**Joint virtual time.** Each replica's engine has its own clock. For each arrival in turn, every
replica whose clock is behind it steps (one orchestrator iteration; a replica with nothing to run
jumps to the arrival, as `drive_virtual` does); once all have reached the arrival, `router.loads`
is rebuilt from the replicas' live requests (expected length prompt + max_tokens, tokens their
KV length now, the prompt for one still waiting as `choose` counts it, and the prompt tokens not
yet prefilled of those without a first token: exact, nothing to keep in step) and
`Router.choose` picks the replica. A replica may stand up to one step past the arrival
(a step is not cut): the router sees it as it will be at the end of its current step, as a real
router sees a step in flight. Replicas share nothing, so under round-robin this gives exactly
bench/simulate.py's figures for independent replicas (tests/bench/test_cluster_routing.py).
Latencies count from the scheduled arrival (`bench.run_metrics.summarize`). Prefix overlap is 0
for every replica: the traces carry lengths, not token contents, so the KV-overlap term of
Dynamo's cost is the same everywhere and `kv` is its load terms alone (pending prefill and
decode blocks).

The sim's requests run to their max_tokens (engines/sim/engine.py), so the router's expected
length is the true one: length-aware routing is measured with a perfect length predictor, an
upper bound on what a real deployment, whose max_tokens overstates the output, gets from it.

**Matrix.** The paper matrix's workloads (azure-conv, azure-code, sharegpt, longbench,
synthetic-80-short) and loads (0.5, 0.8, 1.0, 1.2 x capacity, where capacity is the fcfs
deployment's all-at-once request throughput on the same replicas and requests, measured in the
same run by bench/simulate.py's `capacity`, per dispatch model), under every decode attention
dispatch model (engines/sim/dispatch.py: `waves` in launch order without split, `longest-first`,
`greedy` as FlashAttention-2 varlen, calibrated on an H100, and `split`, split-KV), each mode on
the same requests and arrivals (same seed). 1200 requests per run (not the paper matrix's 2000):
5 workloads x 4 dispatches x 4 loads x 3 modes = 240 runs and 20 capacity probes took 771 s
(13 minutes) with --jobs 2 on the project's 2-core machine.
`--quick`: azure-conv at load 1.0, 500 requests, every dispatch (~30 s).

**Report** per (workload, dispatch, load, mode): output tok/s, TTFT p50/p99, TPOT p50/p99, the
ratios against round-robin in the same (workload, dispatch, load), requests per replica (min /
max), and `padding`: the share of the in-flight expected KV that padding to each replica's
longest would add (per replica sum(n * max - sum expected) / sum(n * max), sampled at every
arrival before routing, averaged): what length-aware routing lowers. Writes `<out>/results.json`
and `<out>/report.md` (with the command, machine and date).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from tqdm import tqdm

from bench.run_metrics import Hardware, Slo, summarize
from bench.simulate import (
    BASE_CONFIG, MATRICES, RESULTS, SERIES_POINTS, VARIANTS, _engine, dispatch_of, prepare, with_load,
)
from bench.workloads.workload import BOS_ID, Workload
from engines.sim.dispatch import DISPATCH_MODELS, kernel_for
from engines.sim.engine import SimEngine
from engines.sim.profiles import hardware_profile, model_profile
from orchestrator.config import UNBOUNDED, ServeConfig
from orchestrator.core import Request
from orchestrator.service import Orchestrator
from serving.cluster.routing import MODES, Router, WorkerLoad

MODEL = "OPT-13B"
HARDWARE = "H100-SXM"
VARIANT = VARIANTS["adaptive (default)"]
BASELINE_MODE = "round-robin"
PAPER = MATRICES["paper"]
REQUESTS = 1200
QUICK = dict(workloads=("azure-conv",), loads=(1.0,), requests=500)
OUT = RESULTS / "cluster-routing-sim"


@dataclass
class Replica:
    """One decode replica: an orchestrator over its own sim engine, and what it was sent."""

    orch: Orchestrator
    engine: SimEngine
    sent: list[tuple[int, Request]] = field(default_factory=list)
    """(index in the workload, request) of every request sent here, in order."""
    live: list[tuple[int, Request]] = field(default_factory=list)
    """Those of `sent` not finished at the last look."""
    finishes: Counter = field(default_factory=Counter)
    """Request id -> times the orchestrator reported it finished (once, if all is well)."""

    @classmethod
    def build(cls, args: dict, replicas: int, requests: int) -> "Replica":
        """The default policy's replica as bench/simulate.py's `run_replica` builds it."""
        engine = _engine(args, VARIANT, replicas)
        config = ServeConfig(policy=VARIANT.policy, max_queue=max(requests, 1024), max_queue_tokens=UNBOUNDED,
                             **{**BASE_CONFIG, **VARIANT.config})
        orch = Orchestrator(engine, config, clock=engine.clock)
        metrics = orch.loop.metrics
        metrics.history, metrics.timings, metrics.transfers = deque(), deque(), deque()
        replica = cls(orch, engine)
        orch.add_finish_listener(lambda r: replica.finishes.update([r.id]))
        return replica

    def advance_to(self, t: float) -> None:
        """Step until this replica's clock reaches `t` (jumping there when nothing is runnable)."""
        clock = self.engine.clock
        while clock() < t:
            if not self.orch.step():
                clock.advance_to(t)

    def submit(self, index: int, prompt_len: int, max_tokens: int) -> None:
        request = self.orch.submit((BOS_ID,) + (5,) * (prompt_len - 1), max_tokens=max_tokens)
        self.sent.append((index, request))
        self.live.append((index, request))

    def load(self, worker: int) -> WorkerLoad:
        """The router's view of this replica now, as the length router keeps it: its live requests'
        expected KV, their KV (`kv_len` counts a prompt from when it is sent, as the router does), and
        the prompt tokens still to prefill of those without a first token."""
        self.live = [(i, r) for i, r in self.live if not r.finished]
        return WorkerLoad(worker, expected={str(i): r.prompt_len + r.max_tokens for i, r in self.live},
                          tokens={str(i): r.kv_len for i, r in self.live},
                          prefill={str(i): r.prompt_len - r.prefilled for i, r in self.live if not r.output_ids})


def padding(loads: list[WorkerLoad]) -> float | None:
    """Share of the in-flight expected KV that padding each replica's requests to its longest adds."""
    padded = sum(len(w.expected) * max(w.expected.values()) for w in loads if w.expected)
    real = sum(sum(w.expected.values()) for w in loads)
    return (padded - real) / padded if padded else None


def run_cluster(args: dict, workload: Workload, mode: str, replicas: int) -> tuple[list[Replica], list[float]]:
    """Serve `workload` on `replicas` replicas behind a `mode` router in one virtual time (module
    docstring); the replicas, drained, and the padding share seen at each arrival."""
    cluster = [Replica.build(args, replicas, len(workload)) for _ in range(replicas)]
    router = Router(cluster[0].engine.block_size, mode)
    workers = list(range(replicas))
    seen = []
    for i in sorted(range(len(workload)), key=lambda i: workload.requests[i].arrival_s):
        req = workload.requests[i]
        for rep in cluster:
            rep.advance_to(req.arrival_s)
        router.loads = {w: rep.load(w) for w, rep in zip(workers, cluster)}
        seen.append(padding(list(router.loads.values())))
        w = router.choose(workers, str(i), req.prompt_len, req.prompt_len + req.output_len)
        cluster[w].submit(i, req.prompt_len, req.output_len)
    for rep in cluster:
        while rep.orch.step():
            pass
    return cluster, [s for s in seen if s is not None]


def measure(args: dict, workload: Workload, mode: str, replicas: int) -> dict:
    """One run (`run_cluster`), its metrics pooled over the replicas as bench/simulate.py's
    `run_variant` pools them, and the books the test checks."""
    wall = time.perf_counter()
    cluster, seen = run_cluster(args, workload, mode, replicas)
    wall = time.perf_counter() - wall
    sent = [(i, r) for rep in cluster for i, r in rep.sent]
    hw, model = hardware_profile(args["hardware"]), model_profile(args["model"])
    metrics = summarize(
        [r for _, r in sent], [workload.requests[i].arrival_s for i, _ in sent],
        [it for rep in cluster for it in rep.orch.loop.metrics.history],
        [t for rep in cluster for t in rep.orch.loop.metrics.transfers], slo=Slo(args["slo_ttft"], args["slo_tpot"]),
        calls=[c for rep in cluster for c in rep.orch.loop.metrics.timings], hardware=Hardware.of(hw, model),
        link_bandwidth=hw.pcie_bandwidth * replicas, series_points=SERIES_POINTS)
    del metrics["series"]
    finishes = [n for rep in cluster for n in rep.finishes.values()]
    metrics.update(
        wall_s=wall, virtual_s=max(rep.engine.clock() for rep in cluster), replicas=replicas,
        per_replica=[len(rep.sent) for rep in cluster],
        sent_indices=sorted(i for i, _ in sent), finished_once=finishes.count(1),
        finished_more=sum(n > 1 for n in finishes), padding=sum(seen) / len(seen) if seen else None)
    return metrics


# ---- the matrix -------------------------------------------------------------------------------

def settings(a: dict, dispatch: str) -> dict:
    """bench/simulate.py's per-run args for one dispatch model, one GPU per replica."""
    return dict(hardware=HARDWARE, gpus=a["replicas"], host_share=0.9, dispatch=dispatch,
                slo_ttft=a["slo_ttft"], slo_tpot=a["slo_tpot"], seed=a["seed"])


def probe(job: dict) -> float:
    """The fcfs deployment's all-at-once request throughput on this job's requests (`capacity`)."""
    _, _, cap = prepare(job["args"], MODEL, job["workload"], job["requests"])
    return cap


def run_one(job: dict) -> dict:
    """One (workload, dispatch, load, mode) at the measured capacity: its result record."""
    args, base, _ = prepare(job["args"], MODEL, job["workload"], job["requests"], probe=False)
    rate = job["load"] * job["capacity"]
    metrics = measure(args, with_load(base, rate, args["seed"]), job["mode"], job["args"]["gpus"])
    del metrics["sent_indices"]
    kernel = kernel_for(hardware_profile(args["hardware"]), dispatch_of(args))
    return {"model": MODEL, "hardware": args["hardware"], "workload": job["workload"], "dispatch": kernel.model,
            "kernel": kernel.kernel, "load": job["load"], "rate": round(rate, 4), "capacity_req_s": job["capacity"],
            "mode": job["mode"], "policy": VARIANT.policy, "requests": len(base), "seed": args["seed"],
            "metrics": metrics}


def run_matrix(a: dict) -> list[dict]:
    """Every capacity probe, then every run, in `a["jobs"]` processes; the run records in matrix order."""
    points = list(itertools.product(a["workloads"], a["dispatch"]))
    bar = tqdm(total=len(points) * (1 + len(a["loads"]) * len(a["modes"])), desc="cluster routing", unit="run")
    pool = ProcessPoolExecutor(a["jobs"]) if a["jobs"] > 1 else None
    try:
        caps = {}
        for job, cap in _each(pool, probe, [dict(args=settings(a, d), workload=w, requests=a["requests"])
                                            for w, d in points]):
            caps[job["workload"], job["args"]["dispatch"]] = cap
            bar.update()
        runs = [dict(args=settings(a, d), workload=w, requests=a["requests"], load=load, mode=mode,
                     capacity=caps[w, d]) for w, d in points for load in a["loads"] for mode in a["modes"]]
        results = []
        for _, r in _each(pool, run_one, runs):
            results.append(r)
            bar.update()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    order = {k: n for n, k in enumerate(itertools.product(a["workloads"], a["dispatch"], a["loads"], a["modes"]))}
    return sorted(results, key=lambda r: order[r["workload"], r["dispatch"], r["load"], r["mode"]])


def _each(pool: ProcessPoolExecutor | None, fn, jobs: list[dict]):
    """(job, fn(job)) for every job: as they finish in `pool`, or one after the other without one."""
    if pool is None:
        yield from ((j, fn(j)) for j in jobs)
        return
    futures = {pool.submit(fn, j): j for j in jobs}
    for f in as_completed(futures):
        yield futures[f], f.result()


# ---- the report -------------------------------------------------------------------------------

def with_ratios(results: list[dict]) -> list[dict]:
    """Each record with `vs_rr`: its figures over round-robin's in the same (workload, dispatch, load)."""
    rr = {(r["workload"], r["dispatch"], r["load"]): r["metrics"] for r in results if r["mode"] == BASELINE_MODE}
    for r in results:
        base, m = rr.get((r["workload"], r["dispatch"], r["load"])), r["metrics"]
        if base is None:
            continue
        r["vs_rr"] = {"output_tok_s": _ratio(m["output_tok_s"], base["output_tok_s"]),
                      **{f"{k}_{p}": _ratio(m[k][p], base[k][p]) for k in ("ttft_s", "tpot_s") for p in ("p50", "p99")}}
    return results


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _f(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def tables(results: list[dict]) -> tuple[str, str]:
    """(summary of ratios to round-robin, the full table) in Markdown."""
    by = {(r["workload"], r["dispatch"], r["load"], r["mode"]): r for r in results}
    keys = list(dict.fromkeys((r["workload"], r["dispatch"], r["load"]) for r in results))
    others = [m for m in MODES if m != BASELINE_MODE and any(k[3] == m for k in by)]
    head = "| workload | dispatch | load | " + " | ".join(
        f"{m}/rr {x}" for m in others for x in ("tok/s", "TTFT p99", "TPOT p99")) + " |"
    summary = [head, "|---|---|---:|" + "---:|" * 3 * len(others)]
    for k in keys:
        cells = []
        for m in others:
            v = by.get((*k, m), {}).get("vs_rr", {})
            cells += [_f(v.get("output_tok_s"), digits=3), _f(v.get("ttft_s_p99"), digits=3),
                      _f(v.get("tpot_s_p99"), digits=3)]
        summary.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    full = ["| workload | dispatch | load | rate req/s | mode | output tok/s | TTFT ms p50 / p99 | TPOT ms p50 / p99 "
            "| x rr: tok/s, TTFT p99, TPOT p99 | padding | req / replica min-max | wall s |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m, v = r["metrics"], r.get("vs_rr", {})
        full.append(
            f"| {r['workload']} | {r['dispatch']} | {r['load']} | {r['rate']:.2f} | {r['mode']} | "
            f"{_f(m['output_tok_s'])} | {_f(m['ttft_s']['p50'], 1e3)} / {_f(m['ttft_s']['p99'], 1e3)} | "
            f"{_f(m['tpot_s']['p50'], 1e3)} / {_f(m['tpot_s']['p99'], 1e3)} | "
            f"{_f(v.get('output_tok_s'), digits=3)}, {_f(v.get('ttft_s_p99'), digits=3)}, "
            f"{_f(v.get('tpot_s_p99'), digits=3)} | {_f(m['padding'], 100)}% | "
            f"{min(m['per_replica'])}-{max(m['per_replica'])} | {m['wall_s']:.1f} |")
    return "\n".join(summary), "\n".join(full)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['workloads'][0]} at load {QUICK['loads'][0]}, {QUICK['requests']} requests (~1 min)")
    p.add_argument("--replicas", type=int, default=8, help="decode replicas, one GPU each")
    p.add_argument("--requests", type=int, default=None, help=f"requests per run (default {REQUESTS})")
    p.add_argument("--workloads", nargs="+", default=None, help=f"default: {' '.join(PAPER.workloads)}")
    p.add_argument("--dispatch", nargs="+", default=list(DISPATCH_MODELS), choices=DISPATCH_MODELS)
    p.add_argument("--loads", nargs="+", type=float, default=None, help="multiples of the fcfs capacity")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on TTFT, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="goodput SLO on TPOT, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel processes")
    p.add_argument("--out", type=Path, default=OUT)
    a = vars(p.parse_args(argv))
    quick = QUICK if a["quick"] else {}
    a["workloads"] = a["workloads"] or quick.get("workloads", PAPER.workloads)
    a["loads"] = a["loads"] or quick.get("loads", PAPER.loads)
    a["requests"] = a["requests"] or quick.get("requests", REQUESTS)
    if BASELINE_MODE not in a["modes"]:
        a["modes"].append(BASELINE_MODE)
    if a["replicas"] < 1:
        p.error(f"--replicas must be >= 1, got {a['replicas']}")
    command = " ".join(["python -m bench.cluster_routing", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    results = with_ratios(run_matrix(a))
    elapsed = time.perf_counter() - started
    notes = (f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}; {date.today().isoformat()}; {elapsed:.0f} s wall in all (--jobs "
             f"{a['jobs']}). Virtual time: {a['replicas']} decode replicas of {MODEL} on the {HARDWARE} profile, "
             f"one GPU each, policy `{VARIANT.policy}` ({VARIANT.label}) with bench/simulate.py's BASE_CONFIG; "
             f"{a['requests']} requests per run, seed {a['seed']}; every mode of a (workload, dispatch, load) on "
             f"the same requests and arrivals. Load = multiple of the fcfs deployment's all-at-once request "
             f"throughput on the same replicas and dispatch (capacity_req_s in results.json). Router: "
             f"serving/cluster/routing.py, block size 16, default weights (overlap 1, length 1); its view rebuilt "
             f"from the replicas' live requests at every arrival. **Prefix overlap is 0 everywhere: the traces "
             f"carry lengths, not token contents**, so `kv` is Dynamo's load term alone. The sim's requests run "
             f"to max_tokens, so the expected length the router uses is exact (a perfect length predictor). "
             f"`padding`: share of in-flight expected KV that padding each replica's requests to its longest "
             f"adds, averaged over arrivals (module docstring).")
    summary, full = tables(results)
    out: Path = a["out"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"notes": notes, "runs": results}, indent=1))
    (out / "report.md").write_text(
        f"# Simulated cluster routing: length vs kv vs round-robin\n\n{notes}\n\n"
        f"## Ratios to round-robin (output tok/s: higher is better; TTFT, TPOT p99: lower is better)\n\n"
        f"{summary}\n\n## Every run\n\n{full}\n")
    print(summary)
    print(f"wrote {out / 'report.md'} and {out / 'results.json'} ({len(results)} runs, {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

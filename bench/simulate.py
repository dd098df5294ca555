"""The policy comparison at the paper's scale, in virtual time (`make simulate`).

    python -m bench.simulate [--matrix quick|paper|scale] [--out bench/results/sim-<matrix>]
        [--jobs N] [--requests N] [--gpus 8] [--hardware H100-SXM] [--models OPT-13B ...]
        [--workloads azure-conv ...] [--variants aligned fcfs ...] [--loads 0.5 1.0] [--seed 0]
        [--dispatch greedy waves longest-first split]

The production orchestrator (its run loop and policies, unchanged) runs on `engines.sim`, whose
clock advances by the cost model (engines/sim/cost_model.py) instead of running a model, so
8xH100 with 13B models and tens of thousands of requests takes minutes on a laptop. Scheduler
decision time is wall time and reported apart (`schedule_s`).

**Deployment: every variant gets the same GPUs** (`--gpus`, 8 as in the paper), split as it
would use them, and requests are dealt to its replicas round-robin in arrival order (a load
balancer in front of data-parallel replicas):
- vLLM-like `fcfs`, FastGen/Sarathi-like `chunked-prefill` and the default `adaptive`: one
  replica per GPU, prefill and decode on the same GPU;
- `adaptive, disaggregated`: the default policy as DistServe deploys: one replica per pair, a
  prefill GPU and a decode GPU;
- DistServe-like `disagg-fcfs`: one replica per pair of GPUs, a prefill GPU and a decode GPU;
- AlignedServe `aligned` and its ablations: one replica per pair, a decode GPU and a prefill GPU
  that also relays the next batch's KV from the host (GPU-Prefetch-For-GPU), with
  `--host-share` of the node's host memory as each replica's host KV pool.
Replicas are independent (no request moves between them), so each is simulated on its own and
their requests and iterations are pooled: output tok/s is the whole deployment's; decode tok/s is
per decode GPU (decode tokens / decode-GPU seconds summed over replicas).

**Load.** Rates are `--loads` times a capacity measured in the same run: the request
throughput of the `fcfs` deployment when every request arrives at once (a probe run on the same
requests). So load 1.0 is what the vLLM-like baseline can just sustain, whatever the model,
workload and hardware; nothing is tuned per experiment. Trace workloads keep their own arrival
pattern, rescaled to the rate (`bench.workloads`); generated ones get Poisson arrivals.

**Dispatch** (`--dispatch`, engines/sim/dispatch.py): how the decode attention kernel deals its
(sequence, KV head) units to the SMs: `waves` (in launch order, no split: vLLM paged_attention v1),
`longest-first` (the same, batch sorted longest first), `greedy` (list scheduling as the GPU's
block scheduler does it: FlashAttention-2 varlen, constants fitted on an H100), `split` (split-KV:
FlashDecoding, FlashInfer, TensorRT-LLM XQA multi-block; the bytes roofline); a kernel name of
`dispatch.KERNELS` works too. The default is `greedy`: it is the one dispatch model calibrated on a
GPU (the H100 probe of 2026-12-05, `bench/results/decode_bubble-h100.json`, rms error 8%), and
FlashAttention-2 without split is what a plain CUDA PyTorch runs; the others are roofline
bounds, not measurements. Each result carries its `dispatch` and `kernel`; with one dispatch the
report goes to `<out>`, with several each goes to `<out>/<NAME>/` (ratios are always
against the baseline under the same dispatch). `--split-kv` is `--dispatch split`.

**Variants** (`VARIANTS`): the default policy (adaptive) on single GPUs and disaggregated, the
default policy on single GPUs with its TPOT target set to the goodput SLO (`--slo-tpot`: each
step carries the prompt tokens that keep it under the SLO), aligned, aligned without peer
prefetch (`prefetch_route=direct`), aligned without prefetch and without alignment
(`fcfs-offload`, direct): the paper's two ablations, each removing one more mechanism; fcfs;
disagg-fcfs; chunked-prefill.

Settings every variant shares unless it sets its own (`BASE_CONFIG`): max_batch_size 256
(vLLM's max_num_seqs), max_prefill_tokens 8192, Kmin 36 and Bmax 40% (the paper's), the default
starvation guard (max_wait_s 10 s), 512-token steps for chunked prefill (Sarathi-Serve). Goodput counts
requests within `--slo-ttft` and `--slo-tpot` (DistServe's chatbot SLO for OPT-13B is TTFT 0.25 s
and TPOT 0.1 s; the default here, 2 s and 0.1 s, leaves queueing room at the loads run).

Writes `<out>/report.md`, `<out>/results.json` and plots (bench/report.py), and
`<out>/paper_comparison.md`: the paper's headline figures beside ours (bench/paper_comparison.py).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.paper_comparison import paper_table
from bench.dashboard import watch
from bench.report import write_report
from bench.run_metrics import Hardware, Slo, summarize
from bench.workloads import make_workload
from bench.workloads.arrivals import schedule
from bench.workloads.workload import BOS_ID, Workload
from engines.sim.cost_model import CostConstants, CostModel
from engines.sim.dispatch import DISPATCH_MODELS, KERNELS, kernel_for
from engines.sim.engine import SimEngine
from engines.sim.profiles import hardware_profile, model_profile
from orchestrator.config import UNBOUNDED, ServeConfig
from orchestrator.service import Orchestrator

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOAD_ARGS = {"longbench": dict(max_context=16_384)}
"""LongBench's prompts reach ~70k tokens, more than one GPU's KV holds for the 13B model (56k on
an H100); LongBench's own evaluation (pred.py) truncates each prompt in the middle to the
model's window, and we cut at 16k, the window of its 16k-context models. Fixed before any run."""
SERIES_POINTS = 300
"""Points kept per plotted distribution and run (CDFs and spreads keep their shape)."""
DEFAULT_DISPATCH = "greedy"
"""The decode attention dispatch model when --dispatch is not given (module docstring)."""
BASE_CONFIG = dict(max_batch_size=256, max_prefill_tokens=8192, kmin=36, bmax_fraction=0.4, chunk_tokens=512)


@dataclass(frozen=True)
class Variant:
    """One way to serve: a policy, its settings, and how many GPUs one replica takes."""

    label: str
    policy: str
    gpus_per_replica: int
    config: dict = field(default_factory=dict)

    @property
    def helpers(self) -> int:
        return self.gpus_per_replica - 1


_PAIR = dict(helper_devices="cuda:1", prefill_device="cuda:1")
SLO_TPOT = "--slo-tpot"
"""A config value run_replica replaces with the run's goodput TPOT SLO (`--slo-tpot`)."""
VARIANTS = {v.label: v for v in (
    Variant("adaptive (default)", "adaptive", 1),
    Variant("adaptive, TPOT target = SLO", "adaptive", 1, dict(tpot_slo_s=SLO_TPOT)),
    Variant("adaptive, disaggregated", "adaptive", 2, dict(_PAIR)),
    Variant("aligned", "aligned", 2, dict(_PAIR, prefetch_route="auto")),
    Variant("aligned, no peer prefetch", "aligned", 2, dict(_PAIR, prefetch_route="direct")),
    Variant("aligned, no prefetch, no alignment", "fcfs-offload", 2, dict(_PAIR, prefetch_route="direct")),
    Variant("fcfs (vLLM-like)", "fcfs", 1),
    Variant("disagg-fcfs (DistServe-like)", "disagg-fcfs", 2, dict(_PAIR)),
    Variant("chunked-prefill (FastGen/Sarathi-like)", "chunked-prefill", 1),
)}
BASELINE = "fcfs (vLLM-like)"


@dataclass(frozen=True)
class Matrix:
    """A named set of experiments: models x workloads x variants x loads."""

    models: tuple[str, ...]
    workloads: tuple[str, ...]
    variants: tuple[str, ...]
    loads: tuple[float | None, ...]
    """Multiples of the fcfs capacity; None: the workload's own arrival times (traces)."""
    requests: int | None
    """Requests per run (None: a trace's every request)."""
    note: str = ""


MATRICES = {
    "quick": Matrix(("OPT-13B",), ("azure-conv",), tuple(VARIANTS), (0.8,), 400,
                    "a smoke run: one model, one trace, every variant, one load"),
    "paper": Matrix(("OPT-6.7B", "OPT-13B"),
                    ("azure-conv", "azure-code", "sharegpt", "longbench", "synthetic-80-short"),
                    tuple(VARIANTS), (0.5, 0.8, 1.0, 1.2), 2000,
                    "the paper's models that fit one H100 with room for KV, its workloads, every variant"),
    "scale": Matrix(("OPT-13B",), ("azure-conv",), ("aligned", BASELINE), (1.0,), None,
                    "the whole Azure conversation trace (19,366 requests), its arrival pattern rescaled "
                    "to the fcfs capacity (at its own timestamps, ~5.4 requests/s, the 8 GPUs would idle "
                    "most of the hour: a sixth of the ~29 requests/s they serve)"),
}


# ---- one replica ------------------------------------------------------------------------------

def _engine(args: dict, variant: Variant, replicas: int) -> SimEngine:
    hw, model = hardware_profile(args["hardware"]), model_profile(args["model"])
    cost = CostModel(hw, model, CostConstants(), dispatch=dispatch_of(args))
    host = hw.host_memory_bytes * args["host_share"] / replicas if variant.policy in ("aligned", "fcfs-offload") else 0
    return SimEngine(cost, helper_devices=variant.helpers, host_kv_bytes=host, max_seq_len=args["max_seq_len"])


def dispatch_of(args: dict) -> str:
    """The run's dispatch model or kernel name: args["dispatch"], or "split" for the older
    args["split_kv"] = True, else DEFAULT_DISPATCH."""
    return args.get("dispatch") or ("split" if args.get("split_kv") else DEFAULT_DISPATCH)


def run_replica(args: dict, variant: Variant, replicas: int, lengths: list[tuple[int, int]],
                arrivals: list[float]) -> dict:
    """Serve these (prompt_len, output_len) requests arriving at these virtual times on one
    replica; returns what the metrics need."""
    engine = _engine(args, variant, replicas)
    settings = {k: args["slo_tpot"] if v == SLO_TPOT else v for k, v in variant.config.items()}
    config = ServeConfig(policy=variant.policy, max_queue=max(len(lengths), 1024), max_queue_tokens=UNBOUNDED,
                         **{**BASE_CONFIG, **settings})
    return drive_virtual(engine, config, lengths, arrivals, variant.label, dashboard=args.get("dashboard"))


def drive_virtual(engine: SimEngine, config: ServeConfig, lengths: list[tuple[int, int]], arrivals: list[float],
                  label: str = "", dashboard: int | None = None) -> dict:
    """The orchestrator with `config` on a sim engine: each request submitted once the virtual
    clock reaches its arrival, the run loop stepped until every request has finished (the clock
    jumps to the next arrival when nothing is runnable)."""
    orch = Orchestrator(engine, config, clock=engine.clock)
    metrics = orch.loop.metrics
    metrics.history, metrics.timings, metrics.transfers = deque(), deque(), deque()
    clock = engine.clock
    submitted = []
    i, n = 0, len(lengths)
    with watch(orch, dashboard):
        while True:
            while i < n and arrivals[i] <= clock():
                plen, out = lengths[i]
                submitted.append(orch.submit((BOS_ID,) + (5,) * (plen - 1), max_tokens=out))
                i += 1
            if orch.step():
                continue
            if i < n:
                clock.advance_to(arrivals[i])
                continue
            break
    stuck = [r.id for r in submitted if not r.finished]
    if stuck:
        raise RuntimeError(f"{label}: {len(stuck)} requests unfinished with nothing to run: {stuck[:5]}")
    return {"requests": submitted, "scheduled": arrivals, "iterations": list(metrics.history),
            "calls": list(metrics.timings), "transfers": list(metrics.transfers),
            "busy": dict(engine.busy_seconds), "virtual_s": clock()}


def run_replicas(args: dict, variant: Variant, workload: Workload) -> list[dict]:
    """One deployment on one workload: requests dealt to its replicas round-robin in arrival
    order, each replica served on its own; what each replica's run returned (`run_replica`)."""
    replicas = max(1, args["gpus"] // variant.gpus_per_replica)
    lengths = [(r.prompt_len, r.output_len) for r in workload.requests]
    arrivals = [r.arrival_s for r in workload.requests]
    return [run_replica(args, variant, replicas, lengths[k::replicas], arrivals[k::replicas]) for k in range(replicas)]


def run_variant(args: dict, variant: Variant, workload: Workload) -> dict:
    """Every replica of one deployment on one workload; the pooled metrics."""
    wall = time.perf_counter()
    parts = run_replicas(args, variant, workload)
    wall = time.perf_counter() - wall
    replicas = len(parts)
    hw, model = hardware_profile(args["hardware"]), model_profile(args["model"])
    metrics = summarize(
        [r for p in parts for r in p["requests"]], [t for p in parts for t in p["scheduled"]],
        [it for p in parts for it in p["iterations"]], [t for p in parts for t in p["transfers"]],
        slo=Slo(args["slo_ttft"], args["slo_tpot"]), calls=[c for p in parts for c in p["calls"]],
        hardware=Hardware.of(hw, model), link_bandwidth=hw.pcie_bandwidth * replicas, series_points=SERIES_POINTS)
    virtual = max(p["virtual_s"] for p in parts)
    metrics["gpu_busy_share"] = {d: sum(p["busy"].get(d, 0.0) for p in parts) / (replicas * virtual)
                                 for d in parts[0]["busy"]} if virtual else None
    metrics["replicas"] = replicas
    metrics["wall_s"] = wall
    metrics["virtual_s"] = virtual
    return metrics


# ---- the matrix -------------------------------------------------------------------------------

def with_load(workload: Workload, rate: float | None, seed: int) -> Workload:
    """The workload at `rate` requests/s: a trace keeps its own pattern, rescaled; a generated
    one gets Poisson arrivals. rate None: as it comes (a trace's own timestamps)."""
    if rate is None:
        return workload
    n = len(workload)
    if workload.name.startswith("azure-"):
        offsets, how = schedule(n, seed, "trace", rate, own=workload.arrivals)
    else:
        offsets, how = schedule(n, seed, "poisson", rate)
    return workload.with_arrivals(offsets, how)


def capacity(args: dict, workload: Workload) -> float:
    """Requests/s the fcfs deployment serves when every request arrives at once."""
    burst = workload.with_arrivals(np.zeros(len(workload)), {"kind": "all-at-once"})
    m = run_variant(args, VARIANTS[BASELINE], burst)
    return m["request_s"]


def prepare(args: dict, model: str, workload: str, requests: int | None,
            probe: bool = True) -> tuple[dict, Workload, float | None]:
    """One (model, workload) point's settings (args with the model and the workload's longest
    sequence), its requests, and the fcfs capacity that loads multiply (None without the probe)."""
    args = dict(args, model=model)
    base = make_workload(workload, requests, args["seed"], **WORKLOAD_ARGS.get(workload, {}))
    args["max_seq_len"] = max(r.prompt_len + r.output_len for r in base.requests)
    return args, base, capacity(args, base) if probe else None


def experiment(job: dict) -> list[dict]:
    """One (model, workload): the capacity probe, then every variant at every load."""
    args, base, cap = prepare(job["args"], job["model"], job["workload"], job["requests"],
                              probe=any(load is not None for load in job["loads"]))
    kernel = kernel_for(hardware_profile(args["hardware"]), dispatch_of(args))
    out = []
    for load, label in itertools.product(job["loads"], job["variants"]):
        rate = None if load is None else load * cap
        wl = with_load(base, rate, args["seed"])
        metrics = run_variant(args, VARIANTS[label], wl)
        out.append({
            "experiment": f"{job['model']}/{job['workload']}", "model": job["model"], "hardware": args["hardware"],
            "workload": job["workload"], "policy": VARIANTS[label].policy,
            "variant": label, "rate": None if rate is None else round(rate, 4), "load": load,
            "capacity_req_s": cap, "requests": len(wl), "seed": args["seed"], "gpus": args["gpus"],
            "dispatch": kernel.model, "kernel": kernel.kernel, "metrics": metrics,
        })
    return out


def run_jobs(jobs: list[dict], processes: int, desc: str, runs_per_job: int) -> list[dict]:
    """Every experiment of `jobs`, in parallel processes when more than one; their results."""
    results: list[dict] = []
    bar = tqdm(total=len(jobs) * runs_per_job, desc=desc, unit="run")
    if processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(processes, len(jobs))) as pool:
            for f in as_completed([pool.submit(experiment, j) for j in jobs]):
                runs = f.result()
                results += runs
                bar.update(len(runs))
    else:
        for j in jobs:
            runs = experiment(j)
            results += runs
            bar.update(len(runs))
    bar.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", choices=sorted(MATRICES), default="quick")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/sim-<matrix>)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="experiments run in parallel processes")
    p.add_argument("--requests", type=int, default=None, help="override the matrix's requests per run")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--workloads", nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS))
    p.add_argument("--loads", nargs="+", type=float, default=None, help="multiples of the fcfs capacity")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--hardware", default="H100-SXM")
    p.add_argument("--host-share", type=float, default=0.9, help="share of the node's host memory for KV")
    p.add_argument("--dispatch", nargs="+", default=None, metavar="NAME",
                   help=f"decode attention dispatch model(s): {', '.join(DISPATCH_MODELS)}, or a kernel "
                        f"({', '.join(KERNELS)}); default {DEFAULT_DISPATCH} (module docstring)")
    p.add_argument("--split-kv", action="store_true", help="the same as --dispatch split")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on TTFT, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="goodput SLO on TPOT, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dashboard", type=int, default=0, metavar="PORT",
                   help="show each replica's orchestrator on the admin dashboard at 127.0.0.1:PORT (runs --jobs 1)")
    a = p.parse_args(argv)
    if a.dashboard:
        a.jobs = 1
    m = MATRICES[a.matrix]
    models, workloads = a.models or m.models, a.workloads or m.workloads
    variants = a.variants or m.variants
    if BASELINE not in variants:
        variants = (BASELINE, *variants)
    loads = a.loads or m.loads
    requests = a.requests if a.requests is not None else m.requests
    for name in models:
        model_profile(name)
    hw = hardware_profile(a.hardware)
    dispatches = list(dict.fromkeys((a.dispatch or []) + (["split"] if a.split_kv else [])))
    dispatches = dispatches or [DEFAULT_DISPATCH]
    for d in dispatches:
        try:
            kernel_for(hw, d)
        except KeyError as e:
            p.error(str(e.args[0]))
    out = a.out or RESULTS / f"sim-{a.matrix}"
    command = "python -m bench.simulate " + " ".join(sys.argv[1:] if argv is None else argv)
    for d in dispatches:
        kernel = kernel_for(hw, d)
        args = dict(hardware=a.hardware, gpus=a.gpus, host_share=a.host_share, dispatch=d,
                    slo_ttft=a.slo_ttft, slo_tpot=a.slo_tpot, seed=a.seed, dashboard=a.dashboard or None)
        jobs = [dict(args=args, model=mo, workload=w, requests=requests, loads=tuple(loads), variants=tuple(variants))
                for mo in models for w in workloads]
        where = out if len(dispatches) == 1 else out / d
        started = time.perf_counter()
        results = run_jobs(jobs, a.jobs, f"simulate {a.matrix} ({kernel.model})", len(loads) * len(variants))
        elapsed = time.perf_counter() - started
        notes = (f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
                 f"{platform.python_version()}; {date.today().isoformat()}; {elapsed:.0f} s wall in all. "
                 f"Virtual time on the {a.hardware} profile, {a.gpus} GPUs per variant, roofline cost constants "
                 f"for the linear layers (efficiency 1, no overhead). Decode attention: dispatch "
                 f"`{kernel.model}`, kernel `{kernel.kernel}` ({kernel.source}). Matrix {a.matrix!r}: {m.note}. "
                 f"Load = multiple of the fcfs deployment's all-at-once request throughput (capacity_req_s in "
                 f"results.json); ratios are against {BASELINE!r} at the same rate and dispatch.")
        title = f"Simulated policy comparison ({a.matrix}, dispatch {kernel.model})"
        path = write_report(results, where, title, notes, baseline="fcfs")
        table = paper_table(results)
        (where / "paper_comparison.md").write_text(f"# Beside the paper's figures ({a.matrix}, dispatch "
                                                   f"{kernel.model})\n\n{notes}\n\n{table}")
        print(table)
        print(f"wrote {path} and {where / 'paper_comparison.md'} ({len(results)} runs, {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

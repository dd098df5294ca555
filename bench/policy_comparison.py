"""Scheduling policies side by side on the torch engine, on the Azure code trace (`make bench-policy`).

    python -m bench.policy_comparison [--model 100m|demo] [--device cpu] [--requests 100] [--rate R]
        [--max-seq-len 1024] [--policies aligned fcfs fcfs-offload] [--modes all-at-once poisson]
        [--seed 0] [--out bench/results/policy_comparison.json]

One engine is built (cached under .cache/bench/) and loaded once; every (mode, policy) run gets
a fresh `Orchestrator` on it, driven from this thread by `orch.step()` (no run-loop thread), so
all policies see the same engine, the same requests and the same arrival schedule. Requests come
from `bench.workloads` (`bench/workloads/window.py` says how trace lengths are fitted to --max-seq-len); each
is sent with end_id 0 and greedy sampling, so it runs to exactly max_tokens tokens unless the
random model happens to emit byte 0 (counted in `finish_reasons`).

Arrivals follow `vllm bench serve`: all-at-once, or Poisson at --rate requests/s. A request is
submitted as soon as the loop is between iterations and its scheduled time has passed; the run
loop drains its inbox only at the start of an iteration, so that is when a request sent during
the iteration would be seen too. Latencies are therefore measured from the *scheduled* arrival
(what a client would see); `Request.arrival_time`, stamped at submit, lags it by at most one
iteration.

Per run, following vLLM's definitions (computed by `bench.run_metrics.summarize`, whose docstring
has the full list):
- output tok/s: generated tokens / makespan (first scheduled arrival to last finish);
- decode tok/s: decode tokens / decode time, where decode time is the summed wall time of the
  engine's decode calls plus the bubble (decode-device time spent waiting for KV loads): the
  decode rate a policy gets, prefill excluded;
- TTFT (first token - scheduled arrival), TPOT ((last token - first token) / (tokens - 1), for
  requests with more than one token), ITL (gaps between tokens, pooled), E2E: mean / p50 / p90 / p99;
- alignment efficiency, token-weighted: sum(B * alignment) / sum(B) over decode iterations,
  alignment = sum(KV) / (B * max KV);
- bubble seconds and their share of decode time, batch switches (count, and per decode
  iteration), KV bytes moved between tiers;
- ratios of the above to fcfs in the same mode;
- the machine's 1-minute load average before and after the run: the benchmark alone keeps it
  near the torch thread count; well above it, something else shared the CPU and the run's
  timings are not comparable with the others.

Step cost model (`bench.step_cost`): before the runs a short calibration times decode steps
built so that batch size, padded KV and real KV vary independently, and fits seconds ~ c0 + c1 B
+ c2 B max_kv + c3 sum_kv; each run's decode time is then attributed to those terms.

KV pools. fcfs reserves prompt + max_tokens on the device at admission and may fill the whole
device pool with its running batch. The host-pool policies (aligned, fcfs-offload) keep a
running batch and a staged batch on the device, each up to bmax_fraction (40%) of the device
blocks, and park the rest in the host pool. The default device pool (--kv-blocks 0) holds
--max-batch-size requests of the workload's mean reserved length, so the device pool, not the
batch cap, binds whenever longer-than-average requests are in the batch; the host pool is sized
for every request of the workload at once. Both are set when the engine is loaded, overriding
the manifest's.

Defaults, measured on the project's 2-core CPU machine (torch 2.13, 2 threads): the 100m model
(97M parameters, float32) at --max-seq-len 1024 prefills ~540 tok/s and decodes a step in
0.045 s + 1.6 ms per sequence + 4.7 us per padded KV token (calibrated), so a 32-batch step at
~800 tokens of KV is half model compute, half padded KV. The code trace is prefill-heavy
(prompts ~10x outputs): 100 requests take ~80 s per run all-at-once, ~90 s at the Poisson rate,
and the default 3 policies x 2 modes ran in 9 minutes. --max-prefill-tokens 1024 (the serving
default is 4096) because the engine pads a prefill batch to its longest prompt: at 4096 a run
spent 95 s in prefill instead of 55 s. --rate 1.2 requests/s is fcfs's capacity on that machine:
at it the engine was busy 99% of the makespan and TTFT p50 stayed under 1 s. --max-batch-size
32 and --kmin 8 scale the paper's batch geometry down to what a CPU step carries. On this
machine, all-at-once runs doing the same decode steps (181 each, same mean batch and alignment)
differed by up to 15% in decode time: smaller CPU ratios are noise.

On a GPU, e.g. `--device cuda:0 --dtype bfloat16 --max-seq-len 2048 --requests 1000
--max-batch-size 128 --kmin 36 --max-prefill-tokens 4096 --rate 55` (an H200 ran each mode in
under 2 minutes; 55/s is 90% of fcfs's all-at-once request throughput there). The 100m model is
too small for such a GPU: its decode step is ~14 ms whatever B and KV (R^2 ~0.01), launch and
Python overhead rather than model compute.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from bench.dashboard import watch
from bench.report import write_report
from bench.run_metrics import ratios, summarize
from bench.step_cost import calibrate, cost_shares, fit_step_cost
from bench.workloads import CODE_TRACE, Workload, arrival_offsets, draw_workload, load_trace
from build_scripts.build_engine import main as build_engine
from engines.base import HOST, CallTiming, Engine
from engines.loader import load_engine
from orchestrator.config import UNBOUNDED, ConfigError, ServeConfig
from orchestrator.core import Request, TokenEvent
from orchestrator.metrics import IterationRecord
from orchestrator.policies import POLICIES
from orchestrator.service import Orchestrator
from orchestrator.transfers import TransferRecord

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POLICIES = tuple(p for p in POLICIES if p != "disagg-fcfs")
"""Every registered policy but disagg-fcfs, which needs --helper-device (a second KV pool: cpu:1
on a CPU, where its prefill does not overlap decode, or cuda:1)."""
MODES = ("all-at-once", "poisson")
STALL_S = 60.0
"""A run with unfinished requests, none left to arrive and nothing runnable for this long is stuck."""
END_ID = 0
"""Sent as every request's end_id: the random model's outputs run to max_tokens (docstring)."""


# ---- engine -----------------------------------------------------------------------------------

def engine_dir(model: str, max_seq_len: int) -> Path:
    """The demo engine directory for (model, max_seq_len), built on first use. Its KV budgets
    are nominal: `open_engine` sizes both pools when it loads the engine."""
    out = CACHE / f"engine-{model}-{max_seq_len}"
    if not (out / "manifest.json").is_file():
        build_engine(["--model", "demo", "--out", str(out), "--demo-size", model, "--max-seq-len", str(max_seq_len),
                      "--kv-memory-gb", "1", "--host-kv-memory-gb", "1"])
    return out


def pool_sizes(workload: Workload, block_size: int, max_batch_size: int, kv_blocks: int) -> tuple[int, int]:
    """(device blocks, host blocks): `kv_blocks`, or by default a batch of mean-sized requests
    (never less than the largest request); the host pool holds the whole workload."""
    need = [-(-(r.prompt_len + r.max_tokens - 1) // block_size) for r in workload.requests]
    device = kv_blocks or max(math.ceil(max_batch_size * sum(need) / len(need)), max(need))
    return device, sum(need)


def open_engine(a: argparse.Namespace, workload: Workload) -> Engine:
    path = engine_dir(a.model, a.max_seq_len)
    block_size = json.loads((path / "manifest.json").read_text())["kv_block_size"]
    device, host = pool_sizes(workload, block_size, a.max_batch_size, a.kv_blocks)
    helpers = (a.helper_device,) if a.helper_device else ()
    return load_engine(path, device=a.device, dtype=a.dtype, kv_blocks=device, host_kv_blocks=host,
                       helper_devices=helpers)


def serve_config(policy: str, a: argparse.Namespace) -> ServeConfig:
    """The same settings for every policy; only the policy name differs."""
    return ServeConfig(policy=policy, max_batch_size=a.max_batch_size, kmin=a.kmin, max_wait_s=a.max_wait_s,
                       max_prefill_tokens=a.max_prefill_tokens, max_queue=max(a.requests, 1024),
                       max_queue_tokens=UNBOUNDED,
                       helper_devices=a.helper_device or "")


# ---- one run ----------------------------------------------------------------------------------

@dataclass
class Run:
    """What one (mode, policy) run leaves behind."""

    requests: list[Request]
    scheduled: list[float]
    """time.monotonic() of each request's scheduled arrival."""
    iterations: list[IterationRecord]
    calls: list[CallTiming]
    transfers: list[TransferRecord]


def drive(orch: Orchestrator, workload: Workload, offsets: list[float], desc: str) -> Run:
    """Submit each request once its arrival time has passed and step the loop until all finish."""
    metrics = orch.loop.metrics
    metrics.history, metrics.timings, metrics.transfers = deque(), deque(), deque()  # a finite run keeps every record
    bar = tqdm(total=len(offsets), desc=desc, unit="req", leave=False)

    def on_event(event: TokenEvent) -> None:
        if event.final:
            bar.update()

    submitted: list[Request] = []
    start = time.monotonic()
    idle_since = None
    while len(submitted) < len(offsets) or not all(r.finished for r in submitted):
        now = time.monotonic() - start
        while len(submitted) < len(offsets) and offsets[len(submitted)] <= now:
            r = workload.requests[len(submitted)]
            submitted.append(orch.submit(r.prompt_ids, max_tokens=r.max_tokens, end_id=END_ID, on_event=on_event))
        if orch.step():
            idle_since = None
        elif len(submitted) < len(offsets):
            time.sleep(max(0.0, start + offsets[len(submitted)] - time.monotonic()))
        else:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > STALL_S:
                stuck = [r.id for r in submitted if not r.finished]
                raise RuntimeError(f"{desc}: {len(stuck)} requests unfinished and nothing runnable "
                                   f"for {STALL_S:.0f}s: {stuck[:5]}")
            time.sleep(orch.config.idle_wait_s)
    bar.close()
    return Run(submitted, [start + o for o in offsets], list(metrics.history), list(metrics.timings),
               list(metrics.transfers))


# ---- metrics ----------------------------------------------------------------------------------

def run_metrics(run: Run, calibrated: dict | None) -> dict:
    """`bench.run_metrics.summarize` (latencies, throughput, decode rate, alignment, bubble,
    switches, KV moved, plot series; no SLO) plus this benchmark's prefill time and step cost
    attribution."""
    metrics = summarize(run.requests, run.scheduled, run.iterations, run.transfers, slo=None, calls=run.calls)
    decodes = [c for c in run.calls if c.op == "decode"]
    return {
        **metrics,
        "prefill_s": sum(c.seconds for c in run.calls if c.op == "prefill"),
        "step_cost": fit_step_cost(decodes),
        "step_shares": cost_shares(decodes, list(calibrated["coef"].values())) if calibrated else None,
    }


def with_ratios(rows: list[dict]) -> None:
    """Add each row's ratios to the fcfs row of its mode (>1: larger than fcfs)."""
    base = {r["mode"]: r for r in rows if r["policy"] == "fcfs"}
    for r in rows:
        if r["mode"] in base:
            r["vs_fcfs"] = ratios(r, base[r["mode"]])


# ---- reporting --------------------------------------------------------------------------------

def machine(device: str) -> str:
    gpu = f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}{gpu}")


def headline(result: dict) -> str:
    """One line saying what was run: model, device, workload, pools, arrival rate."""
    w, kv = result["workload"], result["kv_blocks"]
    rate = f", Poisson rate {w['rate']}/s" if w["rate"] else ""
    return (f"{result['model']} ({result['params'] / 1e6:.1f}M params, {result['dtype']}) on {result['device']}, "
            f"max_seq_len {result['max_seq_len']}, {w['requests']} requests of {Path(w['trace']).name} (seed "
            f"{w['seed']}, prompts x{w['context_scale']:.4f}, {w['clamped']} outputs clamped), KV blocks device "
            f"{kv['device']} / host {kv['host']}{rate}")


def step_cost_line(fit: dict | None) -> str:
    if fit is None:
        return "Decode step cost: not calibrated."
    c = fit["coef"]
    return (f"Decode step cost, calibrated: seconds = {c['fixed']:.4f} + {1e3 * c['per_token']:.3f}e-3 B "
            f"+ {1e6 * c['padded_kv']:.3f}e-6 B max_kv + {1e6 * c['kv']:.3f}e-6 sum_kv (R^2 {fit['r2']:.3f}, "
            f"{fit['points']} steps); shares of each run's decode time under it:")


def markdown(rows: list[dict], calibrated: dict | None) -> str:
    lines = ["| mode | policy | output tok/s | decode tok/s (x fcfs) | TTFT p50 / p99 s | TPOT p50 / p99 ms "
             "| alignment | mean batch | bubble s (% decode) | switches (/iter) | moved MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("vs_fcfs", {}).get("decode_tok_s")
        lines.append(
            f"| {r['mode']} | {r['policy']} | {r['output_tok_s']:.1f} | {r['decode_tok_s']:.1f}"
            f"{f' ({ratio:.2f}x)' if ratio else ''} | {_fmt(r['ttft_s'], 1)} | {_fmt(r['tpot_s'], 1000)} "
            f"| {r['alignment']:.3f} | {r['mean_batch']:.1f} | {r['bubble_s']:.2f} ({100 * r['bubble_share']:.1f}%) "
            f"| {r['switches']} ({r['switch_rate']:.3f}) | {r['transfer_bytes'] / 2**20:.1f} |")
    lines += ["", step_cost_line(calibrated), "",
              "| mode | policy | model share (c0 + c1 B) | padded KV share | KV share | predicted / measured "
              "| own fit R^2 (collinearity) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s, own = r["step_shares"], r["step_cost"]
        shares = (f"{100 * s['model']:.1f}% | {100 * s['padded_kv']:.1f}% | {100 * s['kv']:.1f}% | "
                  f"{s['predicted_over_measured']:.2f}" if s else "- | - | - | -")
        fit = f"{own['r2']:.3f} ({own['collinearity']:.3f})" if own and own["collinearity"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['policy']} | {shares} | {fit} |")
    return "\n".join(lines)


def _fmt(p: dict, unit: float) -> str:
    return "-" if p["p50"] is None else f"{unit * p['p50']:.2f} / {unit * p['p99']:.2f}"


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="100m", choices=["100m", "demo"], help="random-weight demo model")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--rate", type=float, default=1.2, help="Poisson arrival rate, requests/s")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), choices=POLICIES)
    p.add_argument("--helper-device", default="", help="a helper device for disagg-fcfs (cpu:1, cuda:1)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--kmin", type=int, default=8, help="fewest requests in a staged batch (aligned policies)")
    p.add_argument("--max-wait-s", type=float, default=ServeConfig().max_wait_s,
                   help="starvation bound of the host-pool policies (the serving default unless given)")
    p.add_argument("--max-prefill-tokens", type=int, default=1024,
                   help="prompt tokens per prefill call (default 1024: the engine pads a prefill batch)")
    p.add_argument("--kv-blocks", type=int, default=0,
                   help="device KV blocks (default 0: --max-batch-size requests of the workload's mean length)")
    p.add_argument("--output-reserve", type=int, default=None,
                   help="tokens left above the longest scaled prompt (default: trace p99 output, <= half the window)")
    p.add_argument("--trace", type=Path, default=CODE_TRACE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "policy_comparison.json")
    p.add_argument("--dashboard", type=int, default=0, metavar="PORT",
                   help="show each run's orchestrator on the admin dashboard at 127.0.0.1:PORT")
    p.add_argument("--report-dir", type=Path, default=None,
                   help="markdown report and plots (default bench/results/bench-<model>-<device>/)")
    return p.parse_args(argv)


def check_policies(a: argparse.Namespace) -> None:
    """Fail before the long part if a policy cannot be configured (unknown, or a bad setting)."""
    if "disagg-fcfs" in a.policies and not a.helper_device:
        raise SystemExit("error: policy 'disagg-fcfs' prefills on a second device; give --helper-device "
                         "(cpu:1 on a CPU, cuda:1 on a GPU host)")
    for policy in a.policies:
        try:
            serve_config(policy, a)
        except ConfigError as e:
            raise SystemExit(f"error: policy {policy!r} cannot be configured: {e}") from None


def run_all(engine: Engine, workload: Workload, a: argparse.Namespace, calibrated: dict | None) -> list[dict]:
    info = engine.describe()
    rows = []
    for mode in a.modes:
        offsets = arrival_offsets(len(workload.requests), math.inf if mode == "all-at-once" else a.rate, a.seed)
        for policy in a.policies:
            config = serve_config(policy, a)
            load_before = os.getloadavg()[0]
            orch = Orchestrator(engine, config)
            with watch(orch, a.dashboard):
                run = drive(orch, workload, offsets, f"{mode} {policy}")
            leaked = {t: engine.kv_blocks_used(t) for t in (info.decode_device, HOST) if engine.kv_blocks_used(t)}
            if leaked:
                raise RuntimeError(f"{mode} {policy}: KV blocks still held after the run: {leaked}")
            rows.append({"mode": mode, "policy": policy, **run_metrics(run, calibrated),
                         "load_avg": [load_before, os.getloadavg()[0]], "config": config.as_dict()})
    with_ratios(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    check_policies(a)
    workload = draw_workload(load_trace(a.trace), a.requests, a.seed, a.max_seq_len, a.output_reserve, a.trace)
    t0 = time.monotonic()
    engine = open_engine(a, workload)
    info = engine.describe()
    calibration = calibrate(engine, a.max_batch_size)
    calibrated = fit_step_cost(calibration) if calibration else None
    if calibrated is None:
        print("note: the device KV pool cannot hold the step cost calibration; raise --kv-blocks for it")
    rows = run_all(engine, workload, a, calibrated)
    engine.close()
    result = {
        "command": " ".join(["python -m bench.policy_comparison", *(sys.argv[1:] if argv is None else argv)]),
        "date": date.today().isoformat(), "machine": machine(a.device), "wall_s": time.monotonic() - t0,
        "model": a.model, "params": info.model.num_params, "dtype": info.model.dtype, "device": a.device,
        "max_seq_len": info.model.max_seq_len, "kv_block_size": info.block_size,
        "kv_blocks": {"device": info.devices[0].kv_blocks, "host": info.host_blocks},
        "workload": {**workload.describe(), "modes": a.modes, "rate": a.rate if "poisson" in a.modes else None},
        "step_cost_calibration": calibrated, "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + headline(result) + "\n")
    print(markdown(rows, calibrated))
    report = write_report(
        [{"experiment": "policy_comparison", "model": a.model, "hardware": a.device, "workload": "azure-code",
          "policy": r["policy"], "variant": r["policy"], "rate": None if r["mode"] == "all-at-once" else a.rate,
          "requests": a.requests, "seed": a.seed, "metrics": r} for r in rows],
        a.report_dir or RESULTS / f"bench-{a.model}-{a.device.replace(':', '')}",
        f"Policy comparison on the torch engine ({a.model}, {a.device})",
        f"Command: `{result['command']}`; {result['date']}; real engine, wall-clock time. "
        "Ratios within about 0.9-1.2x are this machine's noise on CPU (docs/benchmarks.md).")
    print(f"\nwritten to {a.out} and {report} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

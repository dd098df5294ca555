"""Fit the torch engine's decode-step cost on each attention path and store it in the engine dir.

    python -m bench.step_cost_profile --engine-dir engines_built/smollm2 [--device cpu|cuda:0]
        [--dtype bfloat16] [--paths varlen padded] [--max-batch 32] [--max-seq-len 2048] [--reps 4]

For each path, the engine is opened on that path and `bench.step_cost.calibrate` times decode
steps over batches built so that B, B x max_kv and sum_kv vary independently (one-length
batches of short and mid-length sequences at doubling sizes, and the same with one near-max
member); `fit_step_cost` fits seconds ~ c0 + c1 B + c2 B max_kv + c3 sum_kv by least squares.
The fits go to `<engine dir>/step_cost.json` (engines/torch/step_cost.py), which the engine reads
for `EngineInfo.step_costs` when its device and dtype match. Also printed: each fit's share of
padding (the c2 term) in a step of 32 sequences of mixed KV lengths (64, 64, 512, 1500 repeated:
the policy benchmark's mix), and that step's measured time on each path. JSON of the run under
bench/results/step_cost_profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from bench.step_cost import TERMS, calibrate, fit_step_cost
from engines.base import CallTiming, PrefillRequest, StepCost
from engines.manifest import read_manifest
from engines.torch.attention import ATTENTION_PATHS
from engines.torch.engine import TorchEngine
from engines.torch.step_cost import write_step_costs

RESULTS = Path(__file__).resolve().parent / "results"
MIXED = (64, 64, 512, 1500)
"""KV lengths of the reference step, repeated to 32 sequences."""


def mixed_step_seconds(engine: TorchEngine, reps: int) -> tuple[float, CallTiming] | None:
    """Median time of a decode step over 32 sequences of the MIXED lengths (after one warm-up);
    None when the engine's max_seq_len is shorter than the longest of them, or its device pool
    (sized for the calibration: --max-batch, --max-seq-len) cannot hold them all."""
    info = engine.describe()
    lengths = [MIXED[i % 4] for i in range(32)]
    if engine.max_seq_len <= max(MIXED):
        return None
    if sum(info.blocks_for(n + reps + 1) for n in lengths) > info.devices[0].kv_blocks:
        return None
    ids = [f"x{i}" for i in range(32)]
    for rid, n in zip(ids, lengths):
        engine.prefill([PrefillRequest(rid, [1] + [65] * (n - 2))])  # one at a time: no padding
    times, timing = [], None
    for r in range(reps + 1):
        timing = engine.decode(ids).timing
        if r:
            times.append(timing.seconds)
    engine.free(ids)
    return statistics.median(times), timing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", type=Path, required=True)
    p.add_argument("--device", default="cpu", help="the device to fit on (cpu, cuda:N); fits are kept per device type")
    p.add_argument("--dtype", default=None, help="default: the manifest's")
    p.add_argument("--paths", nargs="+", default=None, choices=list(ATTENTION_PATHS),
                   help="default: every path the device runs (\"paged\" on a CPU only)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="longest KV of the calibration (mid-length sequences are half of it)")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--out", type=Path, default=RESULTS / "step_cost_profile.json")
    a = p.parse_args(argv)
    manifest = read_manifest(a.engine_dir)
    dtype = a.dtype or manifest.dtype
    kind = torch.device(a.device).type
    where = torch.cuda.get_device_name(torch.device(a.device)) if kind == "cuda" else f"{torch.get_num_threads()} threads"
    stamp = (f"{platform.machine()} {os.cpu_count()} CPUs, {a.device} ({where}), {dtype}, "
             f"torch {torch.__version__}, {date.today().isoformat()}")
    paths = a.paths or [p for p in ATTENTION_PATHS if kind == "cpu" or p != "paged"]
    fits, report = [], []
    for path in paths:
        engine = TorchEngine.from_engine_dir(a.engine_dir, manifest, device=a.device, dtype=dtype, host_kv_blocks=0,
                                             attention=path, kv_blocks=a.max_batch * -(-a.max_seq_len // 16) // 2)
        t0, load = time.monotonic(), os.getloadavg()[0]
        timings = calibrate(_Limited(engine, a.max_seq_len), a.max_batch, a.reps)
        fit = fit_step_cost(timings)
        mixed = mixed_step_seconds(engine, a.reps)
        engine.close()
        coef = fit["coef"]
        fits.append(StepCost(path, *(coef[t] for t in TERMS), order_matters=False, r2=fit["r2"],
                             points=fit["points"], fitted_on=stamp))
        row = {"path": path, "fit": fit, "wall_s": round(time.monotonic() - t0, 1),
               "load_avg": [round(load, 2), round(os.getloadavg()[0], 2)]}
        if mixed:
            step, t = mixed
            terms = [coef["fixed"], coef["per_token"] * t.num_seqs, coef["padded_kv"] * t.num_seqs * t.max_kv,
                     coef["kv"] * t.kv_tokens]
            row.update(mixed_step_s=step, mixed_step_predicted_s=sum(terms),
                       mixed_step_padding_share=terms[2] / sum(terms), mixed_step_kv_share=terms[3] / sum(terms))
        report.append(row)
    profile = write_step_costs(a.engine_dir, kind, dtype, fits)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": "python -m bench.step_cost_profile " + " ".join(
        sys.argv[1:] if argv is None else argv), "fitted_on": stamp, "paths": report}, indent=2) + "\n")
    print("| path | fixed ms | per seq ms | padded KV us/token | KV us/token | R^2 | points | mixed step measured s "
          "| predicted s | padding share | KV share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report:
        c = r["fit"]["coef"]
        mixed = (f"{r['mixed_step_s']:.3f} | {r['mixed_step_predicted_s']:.3f} | {r['mixed_step_padding_share']:.0%} | "
                 f"{r['mixed_step_kv_share']:.0%}") if "mixed_step_s" in r else "- | - | - | -"
        print(f"| {r['path']} | {1e3 * c['fixed']:.1f} | {1e3 * c['per_token']:.2f} | {1e6 * c['padded_kv']:.3f} | "
              f"{1e6 * c['kv']:.3f} | {r['fit']['r2']:.3f} | {r['fit']['points']} | {mixed} |")
    print(f"\nfits written to {profile} ({stamp}); run written to {a.out}")
    return 0


class _Limited:
    """The engine as `calibrate` sees it: its describe() with max_seq_len lowered, so the
    calibration's longest sequence stays within --max-seq-len (not the model's own limit)."""

    def __init__(self, engine: TorchEngine, max_seq_len: int):
        self._engine, self._max = engine, max_seq_len

    def describe(self):
        from dataclasses import replace

        info = self._engine.describe()
        return replace(info, model=replace(info.model, max_seq_len=self._max))

    def __getattr__(self, name):
        return getattr(self._engine, name)


if __name__ == "__main__":
    sys.exit(main())

"""`make calibrate`: time the torch engine and fit the sim cost model's constants to the timings.

    python -m bench.calibrate --out bench/profiles/cpu-100m.json [--model 100m] [--max-seq-len 1024]
    python -m bench.calibrate --out refit.json --refit bench/profiles/cpu-100m.json

It runs the torch engine (lazily imported; bench/torch_timings.py says what it times), fits the
constants with `engines.sim.calibration.fit_constants` (whose module docstring says how the fit
works and what a timing lacks), and writes the `Fit` as JSON under bench/profiles/, with the
timings it fitted (`--refit` fits those again without timing the engine).

On the project's 2-core CPU (100m model, float32, 87 calls, ~45 s) the fit gave prefill
R^2 0.98 / MAPE 5-7% and decode R^2 0.76-0.90 / MAPE 15-17% over three runs; no linear model in
(1, B, B max_kv) does better than 15% on those decode steps (CPU noise: B = 2 steps are slower
than B = 4 ones), and no step is weight-bound there, so e_w is reported as not identified.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.sim.calibration import Fit, fit_constants

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="where to write the fit (JSON), e.g. bench/profiles/cpu-100m.json")
    p.add_argument("--refit", type=Path,
                   help="fit the timings stored in this fit (JSON) again instead of timing the engine")
    p.add_argument("--model", default="100m", choices=["100m", "demo"], help="random-weight demo model to time")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each call (after one warm-up)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    command = " ".join(["python -m bench.calibrate", *(sys.argv[1:] if argv is None else argv)])
    if a.refit:
        old = Fit.load(a.refit)
        fit = fit_constants(old.timings, old.hardware, old.model, old.split_kv, old.constants.split_kv_chunk_tokens,
                            meta={**old.meta, "command": command,
                                  "timed_by": old.meta.get("timed_by") or old.meta.get("command")})
    else:
        from bench.torch_timings import measure  # torch is imported here, not at module import

        run = measure(a.model, a.device, a.dtype, a.max_seq_len, a.reps)
        fit = fit_constants(run.timings, run.hardware, run.model, meta={"command": command, **run.meta})
    fit.save(a.out)
    c = fit.constants
    print(f"{fit.hardware.name}, {fit.model.name}: e_f={c.flops_efficiency:.3g} "
          f"e_w={c.weight_bandwidth_efficiency:.3g} e_kv={c.kv_bandwidth_efficiency:.3g} "
          f"o_prefill={c.prefill_overhead_s * 1e3:.2f} ms o_decode={c.decode_overhead_s * 1e3:.2f} ms")
    for op, e in fit.error.items():
        r2 = "n/a" if e["r2"] is None else f"{e['r2']:.4f}"
        print(f"  {op}: R^2 {r2}, MAPE {e['mape']:.1%} over {e['points']} calls")
    for note in fit.notes:
        print(f"  note: {note}")
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

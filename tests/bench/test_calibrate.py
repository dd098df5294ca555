"""`python -m bench.calibrate` (`make calibrate`): the command around the cost-model fit, and the
plan of calls it times on the torch engine."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.calibrate import main
from engines.base import CallTiming
from engines.sim.calibration import fit_constants
from engines.sim.cost_model import CostConstants, CostModel
from engines.sim.profiles import H100_SXM, OPT_13B

REPO = Path(__file__).resolve().parents[2]
FITTED = ("flops_efficiency", "weight_bandwidth_efficiency", "kv_bandwidth_efficiency",
          "prefill_overhead_s", "decode_overhead_s")


def timings() -> list[CallTiming]:
    """Equal-prompt prefills and equal-length decode steps, timed by a cost model with known constants
    (tests/engines/sim/test_calibration.py checks that the fit recovers them)."""
    model = CostModel(H100_SXM, OPT_13B, CostConstants(flops_efficiency=0.6, weight_bandwidth_efficiency=0.85,
                                                       kv_bandwidth_efficiency=0.5, prefill_overhead_s=0.003,
                                                       decode_overhead_s=0.0015))
    calls = [CallTiming("prefill", model.prefill_seconds([n] * b), b, b * n, b * n, n)
             for b in (1, 4) for n in (16, 64, 256, 1024, 2048)]
    return calls + [CallTiming("decode", model.decode_seconds([kv] * b), b, b, b * kv, kv)
                    for b in (1, 4, 16, 64, 128, 256, 512) for kv in (512, 1024, 2048)]


def test_refit_fits_stored_timings_again_and_remembers_who_timed_them(tmp_path):
    fit = fit_constants(timings(), H100_SXM, OPT_13B, meta={"command": "test"})
    path = tmp_path / "profiles" / "h100-13b.json"
    fit.save(path)
    # The CLI refits stored timings without timing an engine again, and gets the same constants.
    out = tmp_path / "refit.json"
    assert main(["--out", str(out), "--refit", str(path)]) == 0
    refit = json.loads(out.read_text())
    for name in FITTED:
        assert refit["constants"][name] == pytest.approx(getattr(fit.constants, name), rel=1e-9)
    assert refit["meta"]["command"] == f"python -m bench.calibrate --out {out} --refit {path}"
    assert refit["meta"]["timed_by"] == "test"
    # A refit of a refit still names the command that timed the engine, not the previous refit.
    again = tmp_path / "refit-again.json"
    assert main(["--out", str(again), "--refit", str(out)]) == 0
    assert json.loads(again.read_text())["meta"]["timed_by"] == "test"


def test_the_command_and_make_calibrate_run_this_module():
    r = subprocess.run([sys.executable, "-m", "bench.calibrate", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "python -m bench.calibrate --out" in r.stdout and "--refit" in r.stdout
    r = subprocess.run(["make", "-n", "calibrate", "VENV=.venv"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "-m bench.calibrate --out" in r.stdout, r.stdout + r.stderr


def test_the_timing_plan_refuses_what_it_cannot_time():
    pytest.importorskip("torch")
    from bench.torch_timings import decode_plan

    lengths, batches = decode_plan(1024, 3)
    assert lengths["long"] == 983 and max(len(b) for b in batches) == 31
    with pytest.raises(ValueError, match="--reps 0: must be >= 1"):
        decode_plan(1024, 0)
    decode_plan(83, 3)  # the smallest max_seq_len the message below asks for
    with pytest.raises(ValueError, match=r"--max-seq-len 82 is too short for --reps 3.*--max-seq-len >= 83"):
        decode_plan(82, 3)

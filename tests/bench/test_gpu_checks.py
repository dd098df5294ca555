"""bench/gpu_checks.sh, the one prepared command a session runs on a lent GPU machine: its quick
mode runs every step here on the CPU, so the script a device session finds still works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_step_runs_and_leaves_what_comes_back(tmp_path):
    out, engine = tmp_path / "out", tmp_path / "engine"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "PY": sys.executable, "GPU_CHECKS_QUICK": "1",
           "GPU_CHECKS_ENGINE": str(engine)}
    run = subprocess.run(["bash", "bench/gpu_checks.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    summary = run.stdout.split("=== summary\n", 1)[1].splitlines()
    assert [line.split(":")[0] for line in summary] == ["env", "build", "cuda-tests", "step-cost", "inprocess-varlen"]
    assert all(": exit 0 in " in line for line in summary), (summary, (out / "log.txt").read_text()[-3000:])
    # At most 8 files come back from a device call; these are the ones the session reads.
    assert sorted(p.name for p in out.iterdir()) == ["inprocess-varlen.json", "log.txt", "pytest.xml",
                                                     "step_cost_profile.json"]
    # The step cost was fitted into the engine directory, and the in-process run's adaptive read it.
    fits = json.loads((engine / "step_cost.json").read_text())["fits"]
    assert [(f["attention"], f["device"]) for f in fits] == [("varlen", "cpu")]
    inproc = json.loads((out / "inprocess-varlen.json").read_text())
    assert inproc["step_cost"]["attention"] == "varlen" and inproc["step_cost"]["fixed"] == fits[0]["fixed"]
    assert set(inproc["summary"]) == {"fcfs", "adaptive"}
    assert all(r["output_tok_s"] > 0 for r in inproc["runs"])

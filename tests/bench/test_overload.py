"""bench.overload --quick on the demo engine: past capacity the server refuses at once (and counts
every refusal in Prometheus) instead of queuing without bound, and goes on serving at its rate."""
from __future__ import annotations

import json

import pytest

from bench import overload

pytestmark = pytest.mark.integration


def test_overload_refuses_at_once_and_keeps_serving(demo_engine_dir, tmp_path):
    assert overload.main(["--engine-dir", str(demo_engine_dir), "--out", str(tmp_path), "--quick"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert "| 8x |" in (tmp_path / "report.md").read_text()
    capacity, steps = min(res["capacity"]["rps"], res["capacity_after"]["rps"]), res["steps"]
    assert capacity > 0 and [s["load"] for s in steps] == list(overload.LOADS)
    top = steps[-1]
    assert top["refused"] > 0, top  # 8x the capacity overflows a 16-request queue
    assert top["refusal_p99_s"] < 1.0, top  # refused at once, not after waiting
    for s in steps:
        assert s["errors"] == 0, s["error_samples"]
        assert s["prometheus_refused_delta"] == s["refused"], s  # every refusal the clients saw, counted
    # No gross collapse under overload, against the lower of the capacity measured before and after
    # the steps (a shared machine drifts). Only gross: on the demo engine (0.8M parameters) a served
    # request costs little more than a refusal through Triton's HTTP front end, so at 8x (seven
    # refusals per capacity request) the refusals themselves take CPU from serving. Measured on a
    # 2-core AMD EPYC, 2026-12-06, four quick runs: 0.52-0.84x of capacity at 8x, the server on
    # 1.8 cores and the client on 0.14. The claim "no collapse" rests on the full run with SmolLM2
    # (docs/benchmarks.md, issue 18: 0.72 req/s at 8x against 0.66-0.69); a full queue's refusal
    # at once, with 429 and Retry-After, on tests/serving/openai_api/test_overload.py.
    assert top["served_rps"] >= 0.4 * capacity, (top, res["capacity"], res["capacity_after"])

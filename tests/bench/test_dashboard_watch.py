"""Standalone dashboard for benchmarks: `bench.dashboard.watch` serves the admin app for an
orchestrator on the sim engine while the block runs, and stops it after."""
from __future__ import annotations

import pytest
import requests

from bench.dashboard import watch
from engines.sim.cost_model import CostModel
from engines.sim.engine import SimEngine
from engines.sim.profiles import H100_SXM, OPT_13B
from orchestrator.config import ServeConfig
from orchestrator.service import Orchestrator
from serving.triton_server import free_port


def test_watch_serves_the_running_simulation_then_stops():
    engine = SimEngine(CostModel(H100_SXM, OPT_13B), host_kv_bytes=50e9, max_seq_len=4096)
    orch = Orchestrator(engine, ServeConfig(policy="aligned"), clock=engine.clock)
    for n in (100, 900, 2000):
        orch.submit([5] * n, max_tokens=50)
    port = free_port()
    with watch(orch, port):
        for _ in range(20):
            orch.loop.step()
        state = requests.get(f"http://127.0.0.1:{port}/api/state", timeout=10).json()
        assert state["policy"] == "aligned"
        assert state["time"] == pytest.approx(engine.clock(), abs=1e-9)  # virtual seconds
        assert state["counts"]["running"] + state["counts"]["parked"] + state["counts"]["staged"] >= 1
        # Read-only: there is no token, so operator actions are refused.
        assert requests.post(f"http://127.0.0.1:{port}/api/drain", timeout=10).status_code == 403
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/api/state", timeout=2)


def test_no_port_serves_nothing():
    with watch(None, 0):  # the orchestrator is never looked at
        pass

"""The virtual clock moves only forward, and the run loop measures waits on it."""
from __future__ import annotations

import pytest

from engines.sim.clock import VirtualClock


def test_advances_and_never_runs_backwards():
    clock = VirtualClock(5.0)
    assert clock() == 5.0
    assert clock.advance(2.5) == 7.5 and clock() == 7.5
    assert clock.advance_to(3.0) == 7.5  # earlier: stays
    assert clock.advance_to(9.0) == 9.0 and clock.now == 9.0


@pytest.mark.parametrize("bad", [-1e-9, float("nan")])
def test_refuses_to_go_back_or_to_nan(bad):
    clock = VirtualClock()
    with pytest.raises(ValueError):
        clock.advance(bad)
    with pytest.raises(ValueError, match="NaN"):
        clock.advance_to(float("nan"))
    assert clock() == 0.0


def test_the_run_loop_stamps_tokens_and_iterations_on_the_clock(demo_engine_dir):
    from engines.loader import load_engine
    from orchestrator.config import ServeConfig
    from orchestrator.service import Orchestrator

    engine = load_engine(demo_engine_dir, device="cpu", kv_blocks=16)
    try:
        clock = VirtualClock(100.0)
        orch = Orchestrator(engine, ServeConfig(policy="fcfs"), clock=clock)
        r = orch.submit([256, 70, 71, 72], max_tokens=3, end_id=0)
        for step in range(3):
            clock.advance(1.0)
            assert orch.loop.step()
        assert r.arrival_time == 100.0 and r.token_times == [101.0, 102.0, 103.0]
        assert [it.end for it in orch.loop.metrics.history] == [101.0, 102.0, 103.0]
    finally:
        engine.close()

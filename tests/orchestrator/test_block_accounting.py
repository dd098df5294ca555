"""Random sequences of submit / step / cancel / engine failure never leak or double-free KV
blocks, and every accepted request ends exactly once. Real torch engine, demo model; the only
addition is a fault switch that makes the engine's next call fail, to exercise error paths."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines.base import EngineError
from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, RequestRejected
from orchestrator.service import Orchestrator


class FaultSwitch:
    """Wraps a real engine; when armed, its next prefill or decode raises EngineError."""

    def __init__(self, engine):
        self._engine = engine
        self.armed: str | None = None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, requests, device=None):
        if self.armed == "prefill":
            self.armed = None
            raise EngineError("injected prefill failure")
        return self._engine.prefill(requests, device)

    def decode(self, request_ids):
        if self.armed == "decode":
            self.armed = None
            raise EngineError("injected decode failure")
        return self._engine.decode(request_ids)


@pytest.fixture(scope="module")
def real_engine(demo_engine_dir):
    return load_engine(demo_engine_dir, device="cpu", kv_blocks=24)


ops = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 120), st.integers(1, 60)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("fail"), st.sampled_from(["prefill", "decode"])),
), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_random_operations_keep_the_books(real_engine, ops):
    engine = FaultSwitch(real_engine)
    orch = Orchestrator(engine, ServeConfig(max_batch_size=4, max_prefill_tokens=200))
    events: dict[str, list] = {}
    accepted = []

    def check():
        orch.ledger.check()
        used = engine.kv_blocks_used("cpu")
        assert used <= orch.ledger.used("cpu") <= orch.ledger.capacity("cpu")
        running = orch.loop.pool.running
        assert used >= sum(orch.info.blocks_for(r.kv_len) for r in running)
        for r in running:
            assert orch.ledger.holds(r.id).get("cpu", 0) == orch.info.blocks_for(r.max_kv_len)

    for op in ops:
        if op[0] == "submit":
            _, plen, max_tokens = op
            try:
                r = orch.submit([1] + [65 + (i % 26) for i in range(plen - 1)], max_tokens=max_tokens,
                                end_id=0, on_event=lambda e: events.setdefault(e.request_id, []).append(e))
                accepted.append(r)
            except RequestRejected as e:
                assert e.field in ("max_tokens", "prompt", "queue")
        elif op[0] == "step":
            for _ in range(op[1]):
                orch.loop.step()
        elif op[0] == "cancel" and accepted:
            orch.cancel(accepted[op[1] % len(accepted)].id)
        elif op[0] == "fail":
            engine.armed = op[1]
        check()

    engine.armed = None
    for _ in range(5000):
        if not orch.loop.step():
            break
    check()
    assert engine.kv_blocks_used("cpu") == 0
    assert orch.ledger.used("cpu") == 0 and orch.ledger.holders == 0
    assert len(orch.loop.pool) == 0
    for r in accepted:
        evs = events.get(r.id, [])
        finals = [e for e in evs if e.final]
        assert len(finals) == 1 and evs[-1].final, f"{r.id} ended {len(finals)} times"
        streamed = [t for e in evs for t in e.token_ids]
        assert streamed == r.output_ids
        if r.finish_reason is FinishReason.LENGTH:
            assert len(r.output_ids) == r.max_tokens
        if r.finish_reason is FinishReason.ERROR:
            assert "injected" in r.error

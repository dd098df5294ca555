"""Random sequences of submit / step / cancel / engine failure never leak or double-free KV
blocks, and every accepted request ends exactly once, under every policy. Real torch engine with
a host KV pool, demo model; the only addition is a fault switch that makes the engine's next
call fail (prefill, decode, a move refused at start, or a copy that fails mid-transfer). The
"aligned-via-helper" case adds a helper device (a second KV pool, "cpu:1") that every load
passes through: host -> helper -> decode device."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engines.base import HOST, EngineError
from engines.loader import load_engine
from engines.sim.cost_model import CostModel
from engines.sim.engine import SimEngine
from engines.sim.profiles import H100_SXM, OPT_13B
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, RequestRejected
from orchestrator.service import Orchestrator


@pytest.fixture(scope="module")
def engines(demo_engine_dir):
    made = {"one": load_engine(demo_engine_dir, device="cpu", kv_blocks=24, host_kv_blocks=40),
            "two": load_engine(demo_engine_dir, device="cpu", helper_devices=("cpu:1",), kv_blocks=24,
                               host_kv_blocks=40)}
    yield made
    for e in made.values():
        e.close()


def sim_engine(helpers: int):
    """The virtual-time engine with the same pool sizes as the torch engines above (block size
    16 as the demo engine's), fresh per example: its clock and timelines start at zero."""
    cost = CostModel(H100_SXM, OPT_13B)
    return SimEngine(cost, helper_devices=helpers, kv_blocks=24, block_size=16, max_seq_len=256,
                     host_kv_bytes=40 * cost.model.kv_bytes_per_token * 16)


SETUPS = {  # name: (engine, config)
    "adaptive": ("one", dict(policy="adaptive")),
    "fcfs": ("one", dict(policy="fcfs")),
    "aligned": ("one", dict(policy="aligned")),
    "fcfs-offload": ("one", dict(policy="fcfs-offload")),
    "aligned-via-helper": ("two", dict(policy="aligned", helper_devices="cpu:1", prefetch_route="helper")),
    # The same books on the virtual-time engine, and the baselines that need it or a helper.
    "sim-fcfs": ("sim", dict(policy="fcfs")),
    # The sim engine reports a step cost: adaptive prices its batches there.
    "sim-adaptive": ("sim", dict(policy="adaptive")),
    "sim-adaptive-prefill-on-helper": ("sim2", dict(policy="adaptive", helper_devices="cuda:1",
                                                    prefill_device="cuda:1")),
    "sim-aligned": ("sim", dict(policy="aligned")),
    "sim-aligned-via-helper": ("sim2", dict(policy="aligned", helper_devices="cuda:1", prefetch_route="helper")),
    "sim-aligned-prefill-on-helper": ("sim2", dict(policy="aligned", helper_devices="cuda:1",
                                                   prefill_device="cuda:1")),
    "sim-disagg-fcfs": ("sim2", dict(policy="disagg-fcfs", helper_devices="cuda:1")),
    "sim-chunked-prefill": ("sim", dict(policy="chunked-prefill", chunk_tokens=48)),
    "disagg-fcfs": ("two", dict(policy="disagg-fcfs", helper_devices="cpu:1")),
    "chunked-prefill": ("one", dict(policy="chunked-prefill", chunk_tokens=48)),
}


ops = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 120), st.integers(1, 60)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("fail"), st.sampled_from(["prefill", "decode", "move", "copy"])),
), min_size=1, max_size=40)


@pytest.mark.parametrize("setup", list(SETUPS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_random_operations_keep_the_books(engines, fault_switch, setup, ops):
    which, cfg = SETUPS[setup]
    real = sim_engine({"sim": 0, "sim2": 1}[which]) if which.startswith("sim") else engines[which]
    engine = fault_switch(real)
    clock = {"clock": real.clock} if which.startswith("sim") else {}
    orch = Orchestrator(engine, ServeConfig(max_batch_size=4, max_prefill_tokens=200, kmin=2, **cfg), **clock)
    tiers = [d.name for d in orch.info.devices] + [HOST]
    dev = orch.info.decode_device
    events: dict[str, list] = {}
    accepted = []
    pool = orch.loop.pool

    def check():
        orch.ledger.check()
        for tier in tiers:
            assert engine.kv_blocks_used(tier) <= orch.ledger.used(tier) <= orch.ledger.capacity(tier)
        assert engine.kv_blocks_used(dev) >= sum(orch.info.blocks_for(r.kv_len) for r in pool.running)
        for r in pool.running:
            assert orch.ledger.holds(r.id).get(dev, 0) == orch.info.blocks_for(r.max_kv_len)
            assert engine.tier_of(r.id) == dev
        # A request's KV is where its state says, once no move of it is under way.
        for r in pool.staged + pool.candidates:
            assert engine.tier_of(r.id) == ("in_flight" if r.moving else dev)
        for r in pool.prefilling:  # chunks on the decode device, or a whole prompt on a helper
            holds = orch.ledger.holds(r.id)
            assert (holds.get(dev, 0) == orch.info.blocks_for(r.max_kv_len)
                    or holds.get(HOST, 0) == orch.info.blocks_for(r.prompt_len))
        for rid in pool.parked:
            assert engine.tier_of(rid) == HOST
            assert orch.ledger.holds(rid) == {HOST: orch.info.blocks_for(pool.get(rid).kv_len)}
        # Every live request is in exactly one part of the pool (or on its way to the host).
        parts = (len(pool.waiting) + len(pool.prefilling) + len(pool.running) + len(pool.staged)
                 + len(pool.candidates) + len(pool.parked))
        to_host = sum(1 for r in pool if r.state.value == "parked" and r.id not in pool.parked)
        assert parts + to_host == len(pool)

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
    assert all(engine.kv_blocks_used(t) == 0 and orch.ledger.used(t) == 0 for t in tiers)
    assert orch.ledger.holders == 0
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
            assert "injected" in r.error or "could not move" in r.error

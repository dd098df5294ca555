"""The two variants of the default policy that issue 16 measured and did not take
(bench/rejected_variants.py): each does what its figures in docs/benchmarks.md say it does."""
from __future__ import annotations

import dataclasses

import pytest

from bench.rejected_variants import OneStepChunks, WaveFill, registered
from engines.sim.cost_model import CostConstants, CostModel
from engines.sim.profiles import hardware_profile, model_profile
from engines.sim.step_cost import SimStepCost
from tests.orchestrator.policies.conftest import PoolState


@pytest.fixture(autouse=True)
def variants():
    """The variants in the policy registry for one test only."""
    with registered():
        yield


def sim_state(dispatch: str) -> PoolState:
    """A pool whose engine prices steps with the sim's cost model: OPT-13B on an H100."""
    state = PoolState(device_blocks=8000, max_seq_len=8192)
    cost = CostModel(hardware_profile("H100-SXM"), model_profile("OPT-13B"), CostConstants(), dispatch=dispatch)
    state.info = dataclasses.replace(state.info, step_costs=(SimStepCost(cost),))
    return state


def test_wave_fill_holds_long_prompts_until_they_fill_a_wave():
    state = sim_state("waves")
    cost = state.info.step_costs[0].cost
    per_wave = cost.hardware.sm_count // cost.model.kv_heads  # 132 SMs / 40 heads: 3 sequences
    for _ in range(6):
        state.running(300)
    long1, short = state.waiting(1200), state.waiting(200)
    policy = state.policy(WaveFill.name, adaptive_chunks="off")
    assert state.plan(policy).admit == (short,)  # the long one would hold a wave of short ones open
    assert state.plan(state.policy("adaptive", adaptive_chunks="off")).admit == (long1, short)

    state.now = policy.config.max_wait_s / 2  # it has waited half the bound: it starts
    assert state.plan(policy).admit == (long1, short)

    state.now = 0.0
    longs = [long1] + [state.waiting(900 + 100 * i) for i in range(per_wave - 1)]
    assert set(state.plan(policy).admit) == {*longs, short}  # a wave's worth: they start together


def test_wave_fill_does_nothing_where_the_kernel_is_not_order_sensitive():
    state = sim_state("split")
    for _ in range(6):
        state.running(300)
    long1 = state.waiting(3000)
    assert state.plan(state.policy(WaveFill.name, adaptive_chunks="off")).admit == (long1,)


def test_one_step_chunks_prefill_whole_prompts_when_nothing_decodes():
    state = sim_state("split")
    prompt = state.waiting(3000)
    plan = state.plan(state.policy(OneStepChunks.name, adaptive_chunks="on"))
    assert plan.chunks == ((prompt, 0, 3000),)
    # adaptive as it is: Sarathi-Serve's 512 tokens whatever is decoding
    assert state.plan(state.policy("adaptive", adaptive_chunks="on")).chunks == ((prompt, 0, 512),)


def test_one_step_chunks_add_at_most_one_decode_step():
    state = sim_state("split")
    running = [state.running(1000) for _ in range(4)]
    state.waiting(3000)
    plan = state.plan(state.policy(OneStepChunks.name, adaptive_chunks="on"))
    step_cost = state.info.step_costs[0]
    step = step_cost.step_seconds([r.kv_len for r in running])
    carried = sum(e - b for _, b, e in plan.chunks)
    block = state.info.block_size
    assert carried % block == 0 and 0 < carried < 3000
    assert step_cost.chunk_seconds(carried) <= step < step_cost.chunk_seconds(carried + block)


def test_the_variants_leave_the_registry_as_they_found_it():
    from orchestrator.policies import REGISTRY

    names = (WaveFill.name, OneStepChunks.name)
    assert all(n in REGISTRY for n in names)  # the fixture's
    with registered():  # nested: the outer one still owns them after the inner exit
        pass
    assert all(n in REGISTRY for n in names)
    saved = {n: REGISTRY.pop(n) for n in names}  # as a process that never registered them
    try:
        with registered():
            assert all(n in REGISTRY for n in names)
        assert not any(n in REGISTRY for n in names)  # taken out again
    finally:
        REGISTRY.update(saved)

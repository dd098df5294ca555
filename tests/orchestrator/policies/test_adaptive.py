"""adaptive as a unit: pool state in, plan out (no engine, no model). Continuous batching that
prices each candidate batch with the engine's step cost: fcfs where a step costs its real KV,
long prompts held back (and started together) where it costs batch x longest KV; a started
request is never parked."""
from __future__ import annotations

import dataclasses

import pytest

from engines.base import StepCost

# A step that costs its real KV (this CPU's paged kernels: bench/results, step_cost.json), and
# one that costs batch x longest (the padded path, 67% padding in a mixed step).
SUM_COST = StepCost("paged", fixed=12.5e-3, per_seq=0.28e-3, padded_kv=0.0, kv=1.17e-6)
PADDED_COST = StepCost("padded", fixed=19.4e-3, per_seq=0.27e-3, padded_kv=1.95e-6, kv=1.03e-6)


def with_cost(state, cost):
    state.info = dataclasses.replace(state.info, step_costs=(cost,))
    return state


@pytest.fixture
def big(make_state):
    return make_state(device_blocks=4000, max_seq_len=4096)


def test_without_a_step_cost_it_plans_as_fcfs(state):
    running = state.running(40)
    a, b = state.waiting(100, max_tokens=29), state.waiting(20, max_tokens=13)
    plan = state.plan(state.policy("adaptive", adaptive_chunks="off"))
    fcfs = state.plan(state.policy("fcfs"))
    assert plan.admit == fcfs.admit == (a, b) and plan.decode == fcfs.decode == (running,)
    assert state.grants(plan) == state.grants(fcfs) == {a.id: {"cuda:0": 8}, b.id: {"cuda:0": 2}}
    assert not (plan.park or plan.offload or plan.load)


def test_where_a_step_costs_its_real_kv_every_place_is_filled_in_arrival_order(big):
    with_cost(big, SUM_COST)
    shorts = [big.running(64) for _ in range(4)]
    waiting = [big.waiting(n) for n in (1500, 64, 512, 1500, 64)]
    policy = big.policy("adaptive", adaptive_chunks="off")
    plan = big.plan(policy)
    assert plan.admit == tuple(waiting) and plan.decode == tuple(shorts)
    assert policy.decision.kind == "filled" and policy.decision.predicted_s == pytest.approx(
        SUM_COST.step_seconds([r.kv_len for r in shorts]))


def test_where_a_step_costs_batch_times_longest_long_prompts_wait_beside_a_short_batch(big):
    with_cost(big, PADDED_COST)
    for _ in range(8):
        big.running(64)
    long1, s1, long2, s2 = big.waiting(1500), big.waiting(64), big.waiting(1500), big.waiting(80)
    policy = big.policy("adaptive", adaptive_chunks="off")
    plan = big.plan(policy)
    assert plan.admit == (s1, s2)
    assert policy.decision.kind == "grouped" and "2 longer prompts wait" in policy.decision.reason
    # The cost agrees: the short batch with the longs in it costs more per token.
    running = [r.kv_len for r in big.pool.running]
    with_longs = PADDED_COST.step_seconds(running + [64, 80, 1500, 1500]) / 12
    without = PADDED_COST.step_seconds(running + [64, 80]) / 10
    assert without < with_longs


def test_long_prompts_start_together_once_the_batch_is_long(big):
    with_cost(big, PADDED_COST)
    big.running(1500)
    waiting = [big.waiting(n) for n in (1400, 64, 1500, 700)]
    plan = big.plan(big.policy("adaptive", adaptive_chunks="off"))
    # With a 1,500-token member the padding is paid anyway: every shorter prompt joins.
    assert plan.admit == tuple(waiting)


def test_a_held_request_starts_once_it_has_waited_half_the_bound(big):
    with_cost(big, PADDED_COST)
    for _ in range(8):
        big.running(64)
    long1 = big.waiting(1500, arrival=0.0)
    short = big.waiting(64, arrival=4.0)
    big.now = 4.9
    assert big.plan(big.policy("adaptive", adaptive_chunks="off", max_wait_s=10)).admit == (short,)
    big.now = 5.0  # long1 has waited max_wait_s / 2
    assert big.plan(big.policy("adaptive", adaptive_chunks="off", max_wait_s=10)).admit == (long1, short)


def test_a_full_device_holds_the_queue_in_arrival_order(state):
    with_cost(state, SUM_COST)
    state.running(16, max_tokens=16 * 60)  # holds 61 of 64 device blocks
    head, small = state.waiting(100), state.waiting(4)  # head needs 8 blocks, small 2
    policy = state.policy("adaptive", adaptive_chunks="off")
    assert state.plan(policy).admit == () and policy.decision.kind == "waiting"


def test_batches_decode_longest_first_only_where_the_kernel_is_order_sensitive(big):
    members = [big.running(n) for n in (64, 1500, 512)]
    with_cost(big, PADDED_COST)
    assert big.plan(big.policy("adaptive", adaptive_chunks="off")).decode == tuple(members)
    with_cost(big, dataclasses.replace(PADDED_COST, order_matters=True))
    assert big.ids(big.plan(big.policy("adaptive", adaptive_chunks="off")).decode) == big.ids([members[1], members[2], members[0]])


def test_room_and_the_prefill_budget_bound_an_iteration(big):
    with_cost(big, SUM_COST)
    for _ in range(3):
        big.running(10)
    waiting = [big.waiting(300) for _ in range(4)]
    plan = big.plan(big.policy("adaptive", adaptive_chunks="off", max_batch_size=5, max_prefill_tokens=700))
    assert plan.admit == tuple(waiting[:2])


def test_with_a_prefill_device_prompts_prefill_there_and_landed_ones_join(make_state):
    state = with_cost(make_state(device_blocks=400, helper=True), PADDED_COST)
    landed = state.staged(40, candidate=True)
    a = state.waiting(40)
    plan = state.plan(state.policy("adaptive", helper_devices="cuda:1", prefill_device="cuda:1"))
    assert landed in plan.promote and plan.prefill == (a,) and plan.prefill_on == "cuda:1"
    assert state.grants(plan)[a.id] == {"cuda:0": state.info.blocks_for(a.max_kv_len), "cuda:1": 3}


def test_with_chunks_prompts_ride_in_the_decode_steps_within_the_token_budget(big):
    with_cost(big, SUM_COST)
    running = [big.running(64) for _ in range(4)]
    under_way = big.prefilling(1500, done=1000)
    a, b, c = big.waiting(300), big.waiting(400), big.waiting(64)
    policy = big.policy("adaptive", adaptive_chunks="on", chunk_tokens=1024)
    plan = big.plan(policy)
    # 1,024 tokens a step: 4 decode tokens, the rest of the prompt under way (500), then new
    # prompts in arrival order: all of a (300), the first 220 tokens of b; c waits.
    assert plan.chunks == ((under_way, 1000, 1500), (a, 0, 300), (b, 0, 220))
    assert plan.admit == (a, b) and plan.prefill == () and plan.decode == tuple(running)
    assert state_grants_longest_kv(big, plan, (a, b))
    # The step it predicts is the one the engine runs: the decode and the 1,020 chunk tokens.
    assert policy.decision.predicted_s == pytest.approx(
        SUM_COST.step_seconds([r.kv_len for r in running]) + SUM_COST.chunk_seconds(1020))


def test_with_chunks_the_cap_still_holds_long_prompts_back(big):
    with_cost(big, PADDED_COST)
    for _ in range(8):
        big.running(64)
    long1, s1 = big.waiting(1500), big.waiting(64)
    plan = big.plan(big.policy("adaptive", adaptive_chunks="on", chunk_tokens=2048))
    assert [r for r, _, _ in plan.chunks] == [s1] and plan.admit == (s1,)


def state_grants_longest_kv(state, plan, requests) -> bool:
    return state.grants(plan) == {r.id: {"cuda:0": state.info.blocks_for(r.max_kv_len)} for r in requests}


def test_auto_chunks_where_a_chunk_rides_on_the_weight_read(big):
    # A GPU-like cost: a 512-token step costs 1.4x a one-token step (weights read either way).
    with_cost(big, StepCost("varlen", fixed=8e-3, per_seq=6e-6, padded_kv=0.0, kv=1e-8))
    assert big.policy("adaptive").chunked
    # This CPU's paged cost: 512 tokens cost 12x one (0.28 ms a token over a 12.5 ms step).
    with_cost(big, SUM_COST)
    assert not big.policy("adaptive").chunked and big.policy("adaptive", adaptive_chunks="on").chunked
    big.info = dataclasses.replace(big.info, step_costs=())
    assert not big.policy("adaptive").chunked  # no step cost: whole prompts, as fcfs


GPU_LIKE = StepCost("varlen", fixed=8e-3, per_seq=20e-6, padded_kv=0.0, kv=1e-7)
"""A memory-bound decode step (8 ms of weight read) and 20 us of linear compute per token."""


def test_with_a_tpot_target_each_step_carries_what_keeps_it_under_the_target(big):
    with_cost(big, GPU_LIKE)
    block = big.info.block_size
    running = [big.running(1000) for _ in range(10)]
    long1, long2 = big.waiting(3000), big.waiting(3000)
    policy = big.policy("adaptive", adaptive_chunks="on", tpot_slo_s=0.030)
    plan = big.plan(policy)
    carried = sum(e - b for _, b, e in plan.chunks)
    step = GPU_LIKE.step_seconds([r.kv_len for r in running])
    # The most whole blocks under the target: one more block would go over it.
    assert carried % block == 0 and carried > 512
    assert step + GPU_LIKE.chunk_seconds(carried) <= 0.030 < step + GPU_LIKE.chunk_seconds(carried + block)
    assert policy.decision.predicted_s == pytest.approx(step + GPU_LIKE.chunk_seconds(carried))
    assert plan.chunks[0] == (long1, 0, min(carried, 3000))


def test_a_tpot_target_shrinks_the_chunk_as_the_batch_grows_and_keeps_a_block(big):
    with_cost(big, GPU_LIKE)
    big.waiting(8000)

    def carried(target: float) -> int:
        return sum(e - b for _, b, e in big.plan(big.policy("adaptive", adaptive_chunks="on", tpot_slo_s=target)).chunks)

    alone = carried(0.030)
    for _ in range(20):
        big.running(2000)
    beside_20 = carried(0.030)
    assert alone > beside_20 > 0  # the 20 members' step leaves less room under the target
    # Over the target with decode alone: a prompt still gets one block a step.
    assert carried(0.001) == big.info.block_size
    # No target: Sarathi-Serve's fixed budget, decode tokens included.
    assert carried(0.0) == 512 - 20

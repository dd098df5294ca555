"""fcfs as a unit: pool state in, plan out (no engine, no model). Continuous batching in arrival
order with the longest KV booked at admission, as vLLM and TensorRT-LLM's in-flight batcher do."""
from __future__ import annotations



def test_admits_in_arrival_order_and_books_the_longest_kv(state):
    running = state.running(40)
    a, b = state.waiting(100, max_tokens=29), state.waiting(20, max_tokens=13)
    plan = state.plan(state.policy("fcfs"))
    assert plan.admit == plan.prefill == (a, b) and plan.decode == (running,)
    # prompt + max_tokens - 1 tokens of KV: 128 -> 8 blocks, 32 -> 2 blocks, on the decode device
    assert state.grants(plan) == {a.id: {"cuda:0": 8}, b.id: {"cuda:0": 2}}
    assert not (plan.park or plan.offload or plan.load or plan.promote or plan.chunks)


def test_the_head_of_the_queue_is_never_overtaken(state):
    state.running(16, max_tokens=16 * 60)  # holds 61 of 64 device blocks
    head, small = state.waiting(100), state.waiting(4)  # head needs 8 blocks, small needs 2
    plan = state.plan(state.policy("fcfs"))
    assert plan.admit == () and len(state.pool.waiting) == 2 and head in state.pool.waiting


def test_room_and_the_prefill_budget_bound_an_iteration(make_state):
    state = make_state(device_blocks=1000)
    for _ in range(3):
        state.running(10)
    waiting = [state.waiting(300) for _ in range(4)]
    plan = state.plan(state.policy("fcfs", max_batch_size=5, max_prefill_tokens=700))
    assert plan.admit == tuple(waiting[:2])  # room for 2, and 600 of the 700 prompt tokens
    alone = make_state(device_blocks=1000)
    big = alone.waiting(900)
    assert alone.plan(alone.policy("fcfs", max_prefill_tokens=700)).admit == (big,)  # a long prompt runs alone

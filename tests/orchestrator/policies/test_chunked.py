"""chunked-prefill as a unit: pool state in, plan out. A step carries the running batch's decode
tokens, then the next chunks of prompts under way, then new prompts, within chunk_tokens."""
from __future__ import annotations


def test_a_step_is_decode_tokens_then_chunks_under_way_then_new_prompts(state):
    running = [state.running(10) for _ in range(4)]
    under_way = state.prefilling(300, done=100)
    new, later = state.waiting(500), state.waiting(50)
    plan = state.plan(state.policy("chunked-prefill", chunk_tokens=512))
    # 512 - 4 decode tokens = 508: the rest of the prompt under way (200), then 308 of the new one
    assert plan.chunks == ((under_way, 100, 300), (new, 0, 308))
    assert plan.decode == tuple(running) and plan.admit == (new,) and later in state.pool.waiting
    assert state.grants(plan) == {new.id: {"cuda:0": 33}}  # 500 + 16 - 1 tokens of KV
    assert not plan.prefill


def test_the_batch_counts_prompts_under_way_and_the_head_waits_for_memory(make_state):
    state = make_state(device_blocks=40)
    state.running(10)
    state.prefilling(100, done=50)
    head, small = state.waiting(600), state.waiting(8)  # 39 blocks do not fit in the 30 left
    plan = state.plan(state.policy("chunked-prefill", max_batch_size=8))
    assert plan.admit == () and [c[0] for c in plan.chunks] == [state.pool.prefilling[0]]
    full = make_state()
    full.running(10)
    full.prefilling(100, done=50)
    full.waiting(8)
    assert full.plan(full.policy("chunked-prefill", max_batch_size=2)).admit == ()  # no place left

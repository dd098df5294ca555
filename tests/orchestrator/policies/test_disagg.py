"""disagg-fcfs as a unit: pool state in, plan out. Prompts prefill on the helper device; their KV
joins the running batch once it has landed on the decode device."""
from __future__ import annotations


def test_landed_candidates_join_and_prompts_go_to_the_prefill_device(make_state):
    state = make_state(helper=True)
    running = state.running(10)
    landed = state.staged(30, candidate=True)
    on_its_way = state.staged(30, candidate=True, moving=True)
    a = state.waiting(64, max_tokens=17)
    plan = state.plan(state.policy("disagg-fcfs"))
    assert plan.promote == (landed,) and plan.decode == (running, landed)
    assert plan.prefill == plan.admit == (a,) and plan.prefill_on == "cuda:1"
    # both sides booked at admission: the longest KV on the decode device, the prompt where it prefills
    assert state.grants(plan) == {a.id: {"cuda:0": 5, "cuda:1": 4}}
    assert on_its_way in state.pool.candidates


def test_places_in_prefill_and_in_transit_count_against_the_batch(make_state):
    state = make_state(helper=True)
    state.running(10)
    state.staged(30, candidate=True, moving=True)
    first, second = state.waiting(8), state.waiting(8)
    plan = state.plan(state.policy("disagg-fcfs", max_batch_size=3))
    assert plan.admit == (first,) and second in state.pool.waiting

"""The request pool as a unit: every transition moves a request between exactly two parts and
notes it in the request's history; the host pool answers by length and by age."""
from __future__ import annotations

import pytest

from orchestrator.core import FinishReason, Request, RequestState
from orchestrator.pool import RequestPool


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def request(rid: str, prompt_len: int, tokens: int = 0) -> Request:
    r = Request(rid, tuple(range(prompt_len)), max_tokens=32)
    r.output_ids = [1] * tokens
    r.token_times = [float(i) for i in range(tokens)]
    return r


def parts(pool: RequestPool) -> dict[str, list[str]]:
    return {"waiting": [r.id for r in pool.waiting], "prefilling": [r.id for r in pool.prefilling],
            "running": [r.id for r in pool.running], "staged": [r.id for r in pool.staged],
            "candidates": [r.id for r in pool.candidates], "parked": sorted(pool.parked)}


def test_a_request_travels_the_parts_and_its_history_says_where_it_went():
    clock = Clock()
    pool = RequestPool(max_len=1024, block_size=16, clock=clock)
    r = request("a", 100)
    pool.add(r)
    pool.take_waiting([r])
    clock.now = 1.0
    pool.start(r)
    r.output_ids, r.token_times = [5], [1.0]
    assert parts(pool)["running"] == ["a"] and r.state is RequestState.RUNNING
    clock.now = 2.0
    pool.to_host(r, now=2.0)
    assert r.state is RequestState.PARKED and r.moving and r.parked_since == 1.0  # from its last token
    assert all(not ids for ids in parts(pool).values())  # on its way: in no part, nobody can pick it
    r.moving = False
    pool.on_host(r, at=2.5)  # the time its move landed
    assert parts(pool)["parked"] == ["a"] and pool.parked.length_of("a") == 100
    clock.now = 3.0
    pool.to_device(r, as_candidate=True)
    assert parts(pool)["candidates"] == ["a"] and r.moving and r.state is RequestState.STAGED
    r.moving = False
    pool.promote(r)
    assert parts(pool)["running"] == ["a"]
    r.finish_reason = FinishReason.LENGTH
    pool.remove(r)
    assert len(pool) == 0 and pool.get("a") is None
    assert [(t, e) for t, e, _ in r.history] == [
        (0.0, "waiting"), (0.0, "admitted"), (1.0, "prefilled"), (2.0, "offloading"), (2.5, "parked"),
        (3.0, "loading"), (3.0, "running"), (3.0, "finished")]


def test_each_request_is_in_exactly_one_part():
    pool = RequestPool(1024, 16)
    reqs = [request(f"r{i}", 10 + i, tokens=1) for i in range(6)]
    for r in reqs:
        pool.add(r)
    pool.take_waiting(reqs[1:])
    pool.begin_prefill(reqs[1])
    for r in reqs[2:]:
        pool.start(r)
    pool.to_host(reqs[4], 0.0)
    pool.on_host(reqs[4])
    pool.to_host(reqs[5], 0.0)
    pool.on_host(reqs[5])
    pool.to_device(reqs[5], as_candidate=False)
    assert parts(pool) == {"waiting": ["r0"], "prefilling": ["r1"], "running": ["r2", "r3"], "staged": ["r5"],
                           "candidates": [], "parked": ["r4"]}
    with pytest.raises(KeyError, match="already in the pool"):
        pool.add(request("r0", 3))


def test_the_host_pool_answers_by_length_and_by_age_and_can_leave_some_out():
    pool = RequestPool(1024, 16)
    for rid, length, since in (("old", 300, 1.0), ("mid", 120, 2.0), ("new", 100, 3.0)):
        r = request(rid, length, tokens=1)
        r.token_times = [since]
        pool.add(r)
        pool.take_waiting([r])
        pool.to_host(r, since)
        pool.on_host(r)
    assert [r.id for r in pool.oldest_parked(2)] == ["old", "mid"]
    assert [r.id for r in pool.oldest_parked(2, exclude={"old"})] == ["mid", "new"]
    assert [r.id for r in pool.oldest_parked(3)] == ["old", "mid", "new"]  # the excluded one is still there
    assert pool.parked.nearest(110) == "new" and pool.parked.nearest(110, exclude={"new"}) == "mid"
    assert pool.parked.nearest(110, exclude={"new", "mid", "old"}) is None
    window = pool.parked.densest(2, block_budget=100, kmax=5, exclude={"mid"})
    assert window.request_ids == ("new", "old")

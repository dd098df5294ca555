"""The `aligned` policy on the virtual-time engine, with the decode device full and requests
parking all the time: the starvation guard at its limit (a small max_wait_s: no started request
waits longer than max_wait_s between two tokens, plus one decode step and one transfer), and
staged batches that are reserved whole (windows sized by the device blocks they are granted)."""
from __future__ import annotations

import random

import pytest

from tests.orchestrator.sim_serving import serve

MAX_WAIT = 0.4  # seconds: ~15 decode steps of this batch


def workload(n: int = 240, seed: int = 0) -> list[tuple[float, int, int]]:
    """Mixed lengths arriving faster than the device can serve them: most requests are parked
    after their first token, and the pool always holds closer lengths than the oldest one's."""
    rng = random.Random(seed)
    return [(0.02 * k, rng.choice([40, 60, 300, 500]) + rng.randrange(20), rng.randrange(30, 300)) for k in range(n)]


def worst_gap(requests) -> float:
    return max(b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:]))


@pytest.mark.parametrize("max_wait", [MAX_WAIT, 2 * MAX_WAIT])
def test_no_started_request_waits_past_max_wait_between_two_tokens(max_wait):
    orch, requests = serve("aligned", workload(), max_wait_s=max_wait)
    m = orch.loop.metrics
    parked = sum(1 for r in requests if any(event == "parked" for _, event, _ in r.history))
    assert parked > len(requests) / 2  # the device was full: the guard had work to do
    step = max(it.seconds for it in m.history)
    transfer = max(t.seconds for t in m.transfers)
    assert worst_gap(requests) <= max_wait + step + transfer, (worst_gap(requests), step, transfer)
    assert all(len(r.output_ids) == r.max_tokens for r in requests)
    assert orch.ledger.holders == 0


def test_staged_batches_are_reserved_whole():
    """Every window the density-first search picks is staged whole: its members' device grants
    (at their longest KV) fit Bmax and the device, so no load is refused for want of blocks."""
    windows, staged = [], []

    def spy(policy):
        search, schedule = policy._next_batch, policy.schedule

        def next_batch(draft):
            ids = search(draft)
            windows.append((ids, sum(policy.info.blocks_for(draft.get(i).max_kv_len) for i in ids)))
            return ids

        def plan(draft):
            windows.clear()
            p = schedule(draft)
            if windows and windows[0][0] and policy.by_length:
                staged.append((windows[0], tuple(r.id for r in p.stage), policy.bmax))
            return p
        policy._next_batch, policy.schedule = next_batch, plan

    serve("aligned", workload(), spy=spy, max_wait_s=2.0)
    assert len(staged) >= 3
    for (ids, blocks), got, bmax in staged:
        assert blocks <= bmax
        assert got in (ids, ())  # staged whole, or not at all (not worth switching to)
    assert sum(len(got) for _, got, _ in staged) >= 4 * sum(1 for _, got, _ in staged if got)  # kmin 4

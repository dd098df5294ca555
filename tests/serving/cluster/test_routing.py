"""Length-aware routing (serving/cluster/routing.py)."""
from __future__ import annotations

import pytest

from serving.cluster.routing import Router, Weights, WorkerLoad, cost, padding_waste


def test_padding_waste_counts_the_padded_tokens_of_one_step():
    assert padding_waste([], 500) == 0
    assert padding_waste([100, 200], 500) == 2 * 300  # both padded up to the newcomer
    assert padding_waste([100, 800], 500) == 300  # the newcomer padded up to the longest
    assert padding_waste([500, 500], 500) == 0


def test_with_no_length_weight_the_cost_is_dynamos():
    load = WorkerLoad(1, expected={"a": 2000}, tokens={"a": 1000})
    # overlap_weight * prefill blocks + decode blocks (the new request's included)
    assert cost(load, 160, 300, 4, 16, Weights(overlap=1.0, length=0.0)) == (10 - 4) + (63 + 10)
    assert cost(load, 160, 300, 4, 16, Weights(overlap=1.0, length=1.0)) == (10 - 4) + (63 + 10) + 1700 / 16


def test_requests_of_close_lengths_gather_on_the_same_workers():
    r = Router(block_size=16, mode="length")
    placed = {}
    for i in range(8):  # alternate short and long requests, as they arrive
        short = i % 2 == 0
        key = f"r{i}"
        placed[key] = (short, r.choose([1, 2], key, 50 if short else 1500, 100 if short else 1600))
    shorts = {w for s, w in placed.values() if s}
    longs = {w for s, w in placed.values() if not s}
    assert len(shorts) == 1 and len(longs) == 1 and shorts != longs


def test_kv_mode_balances_load_whatever_the_lengths():
    r = Router(block_size=16, mode="kv")
    workers = [r.choose([1, 2], f"r{i}", 50 if i % 2 == 0 else 1500, 100 if i % 2 == 0 else 1600)
               for i in range(8)]
    # Dynamo's cost alone: the long requests go to whichever worker has fewer blocks, so both get both kinds
    assert {workers[i] for i in range(0, 8, 2)} == {1, 2} or {workers[i] for i in range(1, 8, 2)} == {1, 2}


def test_the_load_term_still_spreads_requests_of_one_length():
    r = Router(block_size=16, mode="length")
    workers = [r.choose([1, 2, 3], f"r{i}", 300, 400) for i in range(9)]
    assert sorted(workers.count(w) for w in (1, 2, 3)) == [3, 3, 3]


def test_finished_requests_stop_counting_and_growth_counts():
    r = Router(block_size=16, mode="length")
    w = r.choose([1], "a", 32, 64)
    assert r.loads[w].blocks(16) == 2
    r.grow("a", 1)
    assert r.loads[w].blocks(16) == 3
    r.finish("a")
    assert r.loads[w].blocks(16) == 0 and not r.loads[w].expected


def test_round_robin_takes_turns_and_bad_settings_are_refused():
    r = Router(block_size=16, mode="round-robin")
    assert [r.choose([7, 3], f"r{i}", 10, 20) for i in range(4)] == [3, 7, 3, 7]
    with pytest.raises(ValueError, match="router mode"):
        Router(block_size=16, mode="fastest")
    with pytest.raises(ValueError, match="weights"):
        Weights(length=-1)
    with pytest.raises(LookupError, match="no worker"):
        Router(block_size=16).choose([], "x", 1, 2)

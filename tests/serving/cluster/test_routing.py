"""Length-aware routing (serving/cluster/routing.py)."""
from __future__ import annotations

import pytest

from serving.cluster.routing import Router, Weights, WorkerLoad, cost, device_overlap, expected_len, padding


def test_padding_counts_the_padded_tokens_of_one_step_once_the_request_joins():
    assert padding([], 500) == 0
    assert padding([100, 200], 500) == 400 + 300  # both padded up to the newcomer
    assert padding([100, 800], 500) == 700 + 300  # the newcomer and the first padded up to the longest
    assert padding([500, 500], 500) == 0


def test_with_no_length_weight_the_cost_is_dynamos():
    load = WorkerLoad(1, expected={"a": 2000}, tokens={"a": 1000})
    # overlap_weight * prefill blocks + decode blocks (the new request's included)
    assert cost(load, 160, 300, 4, 16, Weights(overlap=1.0, length=0.0)) == (10 - 4) + (63 + 10)
    assert cost(load, 160, 300, 4, 16, Weights(overlap=1.0, length=1.0)) == (10 - 4) + (63 + 10) + 1700 / 16


def test_a_worker_of_long_requests_takes_another_only_while_its_padded_step_is_the_cheaper():
    def router(longs: int, long_tokens: int, shorts: int = 8) -> Router:
        r = Router(block_size=16, mode="length")
        r.loads[1] = WorkerLoad(1, expected={f"s{i}": 100 for i in range(shorts)},
                                tokens={f"s{i}": 50 for i in range(shorts)})
        r.loads[2] = WorkerLoad(2, expected={f"l{i}": 1600 for i in range(longs)},
                                tokens={f"l{i}": long_tokens for i in range(longs)})
        return r
    # two long requests early on: a short one stays with the short ones, a long one joins the long
    assert router(2, 200).choose([1, 2], "short", 50, 100) == 1
    assert router(2, 200).choose([1, 2], "long", 800, 1600) == 2
    # six long ones grown to 800 tokens beside two short ones: the long worker's step (350 blocks
    # with the newcomer) now costs more than the short worker's padded to 1,600 (245.5): load wins
    assert router(6, 800, shorts=2).choose([1, 2], "long", 800, 1600) == 1
    assert router(6, 800, shorts=8).choose([1, 2], "long", 800, 1600) == 2  # eight to pad: 832


def test_requests_of_close_lengths_gather_on_the_same_workers():
    r = Router(block_size=16, mode="length")
    placed = {}
    for i in range(8):  # alternate short and long requests, as they arrive
        short = i % 2 == 0
        key = f"r{i}"
        placed[key] = (short, r.choose([1, 2], key, 50 if short else 1500, 100 if short else 1600))
        r.grow(key, 1)  # its first token is back before the next one arrives
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


def test_pending_prefill_counts_until_the_first_token():
    """Dynamo's prefill term: a worker's prompts not yet prefilled cost overlap_weight per block."""
    load = WorkerLoad(1)
    load.add("long", 1600, 1700)
    before = cost(load, 32, 64, 0, 16, Weights(overlap=2.0, length=0.0))
    load.grow("long", 1)  # the first token is back: prefill done
    after = cost(load, 32, 64, 0, 16, Weights(overlap=2.0, length=0.0))
    assert before - after == 2.0 * 100 - 1  # 100 blocks no longer to prefill; one more decoded


def test_finished_requests_stop_counting_and_growth_counts():
    r = Router(block_size=16, mode="length")
    w = r.choose([1], "a", 32, 64)
    assert r.loads[w].blocks(16) == 2 and r.loads[w].prefill_blocks(16) == 2
    r.grow("a", 1)
    assert r.loads[w].blocks(16) == 3 and r.loads[w].prefill_blocks(16) == 0
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


def test_expected_length_and_dynamos_overlap_rows():
    assert expected_len(100, 28, 4096) == 128 and expected_len(100, None, 4096) == 4096
    assert expected_len(4000, 500, 4096) == 4096
    rows = {"workers": [{"worker_id": 7, "dp_rank": 0, "device_blocks": 12, "host_pinned_blocks": 12},
                        {"worker_id": 9, "dp_rank": 0, "device_blocks": None}]}
    assert device_overlap(rows) == {7: 12, 9: 0} and device_overlap({}) == {}

"""The length index against brute force on random pools (hypothesis)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.length_index import LengthIndex

BLOCK = 16


def brute_narrowest_span(lengths: list[int], kmin: int, budget: int) -> int | None:
    """Narrowest span over every set of kmin requests consecutive in length order that fits."""
    s = sorted(lengths)
    best = None
    for i in range(len(s) - kmin + 1):
        window = s[i:i + kmin]
        if sum(-(-x // BLOCK) for x in window) <= budget:
            span = window[-1] - window[0]
            best = span if best is None else min(best, span)
    return best


pools = st.lists(st.integers(1, 700), min_size=0, max_size=80)


@settings(max_examples=300, deadline=None)
@given(lengths=pools, kmin=st.integers(1, 12), budget=st.integers(1, 400), kmax=st.integers(12, 40))
def test_densest_is_the_narrowest_feasible_window(lengths, kmin, budget, kmax):
    idx = LengthIndex(max_len=700, block_size=BLOCK)
    for i, n in enumerate(lengths):
        idx.insert(f"r{i}", n)
    want = brute_narrowest_span(lengths, kmin, budget)
    got = idx.densest(kmin, budget, kmax)
    if want is None:
        assert got is None
        return
    assert got is not None and got.span == want
    members = [idx.length_of(r) for r in got.request_ids]
    assert kmin <= len(members) <= kmax and len(set(got.request_ids)) == len(members)
    assert min(members) == got.lo and max(members) == got.hi
    assert got.blocks == sum(-(-x // BLOCK) for x in members) <= budget


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 5000), min_size=1, max_size=60), probe=st.integers(0, 6000))
def test_nearest_matches_brute_force(lengths, probe):
    idx = LengthIndex(max_len=5000, block_size=BLOCK)
    for i, n in enumerate(lengths):
        idx.insert(f"r{i}", n)
    best = min(abs(n - probe) for n in lengths)
    assert abs(idx.length_of(idx.nearest(probe)) - probe) == best


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 700), min_size=1, max_size=60), pick=st.integers(0, 59),
       kmax=st.integers(1, 20), budget=st.integers(1, 400))
def test_around_takes_the_nearest_lengths_within_budget(lengths, pick, kmax, budget):
    idx = LengthIndex(max_len=700, block_size=BLOCK)
    for i, n in enumerate(lengths):
        idx.insert(f"r{i}", n)
    center_id = f"r{pick % len(lengths)}"
    center = idx.length_of(center_id)
    got = idx.around(center_id, kmax, budget)
    members = [idx.length_of(r) for r in got.request_ids]
    assert got.request_ids[0] == center_id and len(set(got.request_ids)) == len(members) <= kmax
    assert got.blocks == sum(-(-x // BLOCK) for x in members)
    assert len(members) == 1 or got.blocks <= budget
    # No request left out is nearer to the center than one taken (the scan goes outward).
    taken = {abs(x - center) for x in members}
    left_out = [abs(n - center) for i, n in enumerate(lengths) if f"r{i}" not in got.request_ids]
    assert not left_out or min(left_out) >= max(taken)
    if budget >= sum(-(-x // BLOCK) for x in lengths):  # budget no constraint: exactly kmax nearest
        assert sorted(abs(x - center) for x in members) == sorted(abs(x - center) for x in lengths)[:len(members)]
        assert len(members) == min(kmax, len(lengths))


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["insert", "remove", "update"]), st.integers(0, 30),
                              st.integers(1, 4096)), max_size=120))
def test_tree_counts_stay_consistent_under_updates(ops):
    idx = LengthIndex(max_len=4096, block_size=BLOCK)
    model: dict[str, int] = {}
    for op, k, n in ops:
        rid = f"r{k}"
        if op == "insert" and rid not in model:
            idx.insert(rid, n)
            model[rid] = n
        elif op == "remove" and rid in model:
            assert idx.remove(rid) == model.pop(rid)
        elif op == "update" and rid in model:
            idx.update(rid, n)
            model[rid] = n
    assert len(idx) == len(model)
    for d, level in enumerate(idx.counts):  # every node counts exactly the lengths under it
        for node in level.nonzero()[0]:
            span = 4 ** d
            assert level[node] == sum(node * span < n <= (node + 1) * span for n in model.values())
    assert idx.counts[-1].sum() == len(model) and idx.counts[-1].size == 1
    if model:
        assert idx.densest(len(model), 10**9).request_ids and idx.nearest(1) in model


def test_depth_covers_max_len():
    assert LengthIndex(65536, 16).depth == 8  # 4**8 = 65,536 leaves: lengths 1..65,536
    assert LengthIndex(65537, 16).depth == 9
    assert LengthIndex(2048, 16).depth == 6


def test_bad_lengths_are_refused():
    idx = LengthIndex(100, 16)
    with pytest.raises(ValueError, match=r"outside \[1, 100\]"):
        idx.insert("a", 101)
    idx.insert("a", 5)
    with pytest.raises(KeyError):
        idx.insert("a", 6)


def brute_narrowest_weighted(lengths: list[int], weight: dict[int, int], kmin: int, budget: int) -> int | None:
    """`brute_narrowest_span` with each length weighing `weight[length]` blocks."""
    s = sorted(lengths)
    spans = [s[i + kmin - 1] - s[i] for i in range(len(s) - kmin + 1) if sum(weight[x] for x in s[i:i + kmin]) <= budget]
    return min(spans, default=None)


@settings(max_examples=200, deadline=None)
@given(lengths=pools, extra=st.lists(st.integers(0, 40), min_size=80, max_size=80), kmin=st.integers(1, 12),
       budget=st.integers(1, 800), kmax=st.integers(12, 40), by_length=st.booleans())
def test_densest_counts_each_request_at_the_blocks_it_weighs(lengths, extra, kmin, budget, kmax, by_length):
    # Weighed as the pool weighs a parked request: the blocks of its longest KV, which grows by
    # its remaining tokens (`extra`, per request; with `by_length`, the same for every request of a
    # length, where the search is exact).
    idx = LengthIndex(max_len=700, block_size=BLOCK)
    weigh = {}
    for i, n in enumerate(lengths):
        weigh[f"r{i}"] = -(-(n + extra[n % 80 if by_length else i]) // BLOCK)
        idx.insert(f"r{i}", n, blocks=weigh[f"r{i}"])
    got = idx.densest(kmin, budget, kmax)
    if got is not None:  # a window found can be granted: its members' weights fit the budget
        members = [idx.length_of(r) for r in got.request_ids]
        assert kmin <= len(members) <= kmax and min(members) == got.lo and max(members) == got.hi
        assert got.blocks == sum(weigh[r] for r in got.request_ids) <= budget
    if by_length:
        want = brute_narrowest_weighted(lengths, {n: -(-(n + extra[n % 80]) // BLOCK) for n in lengths}, kmin, budget)
        assert (got is None) == (want is None) and (got is None or got.span == want)


def test_a_window_is_sized_by_the_weights_not_the_lengths():
    idx = LengthIndex(max_len=4096, block_size=BLOCK)
    for i in range(10):
        idx.insert(f"s{i}", 100, blocks=-(-(100 + 1000) // BLOCK))  # 100 tokens now, up to 1,100
    # By KV length, ten fit 70 blocks (7 each); by their weights (69 each), one does.
    assert idx.densest(2, 70) is None
    assert idx.densest(1, 70, kmax=10).request_ids == ("s0",)
    assert len(idx.densest(2, 69 * 4, kmax=10).request_ids) == 4
    idx.insert("light", 99)  # 7 blocks
    assert idx.densest(2, 69 + 7, kmax=10).request_ids == ("light", "s0")
    # At one length the search counts the heaviest request's blocks for every place it takes
    # (so a window found always fits); the widening then takes the lightest first.
    idx.insert("light2", 100)
    assert idx.densest(2, 69 + 7, kmax=10).request_ids == ("light", "light2")
    assert idx.blocks_of("light") == 7 and idx.blocks_of("s3") == 69

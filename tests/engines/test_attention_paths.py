"""The attention paths' plans (engines/torch/attention.py, forward_batch.py): varlen computes
real tokens only and groups decode tokens by KV length; padded is B x longest. Their numbers
are checked against transformers in test_torch_equivalence.py and test_chunked_prefill.py."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.torch import attention as attention_module
from engines.torch import cpu_kernels
from engines.torch.attention import PaddedPlan, VarlenPlan, decode_groups
from engines.torch.forward_batch import build_batch
from engines.torch.kv_cache import PagedKVCache


def cost(groups: list[list[int]], lens: list[int], overhead: int) -> int:
    return sum(overhead + len(g) * max(lens[i] for i in g) for g in groups)


def test_one_length_is_one_group_and_far_lengths_split():
    assert decode_groups([64] * 8) == [list(range(8))]
    # 7 short and one long: padding the short ones to the long one costs 7 * 1436 tokens, far
    # more than one more call; a small spread is cheaper padded than split.
    assert decode_groups([64] * 7 + [1500], overhead=256) == [list(range(7)), [7]]
    assert decode_groups([60, 64, 70], overhead=256) == [[0, 1, 2]]
    assert decode_groups([60, 64, 70], overhead=0) == [[0], [1], [2]]


def test_groups_respect_the_size_cap_but_never_split_one_sequence():
    groups = decode_groups([1000] * 8, overhead=256, max_tokens=4000)
    assert [len(g) for g in groups] == [4, 4]
    assert decode_groups([9000], max_tokens=4000) == [[0]]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=7), st.integers(0, 200))
def test_groups_cover_each_sequence_once_at_the_least_cost(lens, overhead):
    groups = decode_groups(lens, overhead=overhead, max_tokens=10**9)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lens)))
    assert [lens[i] for i in flat] == sorted(lens)  # ascending, so groups are contiguous in length
    # No partition of the lengths sorted into runs does better (the optimum is among those).
    order = sorted(range(len(lens)), key=lens.__getitem__)
    best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(lens)))], lens, overhead)
               for k in range(len(lens)) for cuts in itertools.combinations(range(1, len(lens)), k))
    assert cost(groups, lens, overhead) == best


@pytest.fixture
def cache() -> PagedKVCache:
    return PagedKVCache(num_layers=1, num_blocks=64, block_size=4, num_kv_heads=1, head_dim=2,
                        dtype=torch.float32, device=torch.device("cpu"), tier="cpu")


def test_varlen_rows_are_the_real_tokens_decode_first(cache):
    runs, starts = [[5, 6, 7], [8], [9, 10], [11]], [0, 9, 4, 2]  # a prompt, decode, chunk, decode
    ids = ["p", "d9", "c", "d2"]
    for rid, s, r in zip(ids, starts, runs):
        cache.reserve(rid, s + len(r))
    batch = build_batch(cache, ids, runs, starts, torch.device("cpu"), "varlen", q_per_kv=2)
    plan = batch.attention
    assert isinstance(plan, VarlenPlan) and batch.real is None
    # Decodes first, shortest KV first, then the longer runs in call order: 7 rows, no pads.
    assert batch.tokens.tolist() == [11, 8, 5, 6, 7, 9, 10]
    assert batch.positions.tolist() == [2, 9, 0, 1, 2, 4, 5]
    assert batch.first == [2, 1, 5, 0] and batch.last.tolist() == [4, 1, 6, 0]
    assert len(plan.groups) == 1  # kv 3 and 10: one group, masked to each length
    g = plan.groups[0]
    assert (g.start, g.end, g.kv_len, g.mask.squeeze().tolist()) == (0, 2, 10, [[True] * 3 + [False] * 7, [True] * 10])
    prompt, chunk = plan.runs
    assert (prompt.start, prompt.end, prompt.block_table, prompt.mask) == (2, 5, None, None)  # causal, fresh keys
    assert (chunk.start, chunk.end) == (5, 7) and chunk.block_table.tolist() == cache.tables["c"][:2]
    assert chunk.mask[0, 0].tolist() == [[True] * 5 + [False], [True] * 6]
    for rid, row, pos in [("d2", 0, 2), ("d9", 1, 9), ("p", 4, 2), ("c", 6, 5)]:
        table = cache.tables[rid]
        assert batch.slots[row] == table[pos // 4] * 4 + pos % 4


def test_padded_rows_are_batch_times_longest(cache):
    runs, starts = [[5, 6, 7], [8]], [0, 6]
    for rid, s, r in zip("ab", starts, runs):
        cache.reserve(rid, s + len(r))
    batch = build_batch(cache, ["a", "b"], runs, starts, torch.device("cpu"), "padded", q_per_kv=2)
    assert isinstance(batch.attention, PaddedPlan)
    assert batch.tokens.tolist() == [5, 6, 7, 8, 0, 0] and batch.real.tolist() == [0, 1, 2, 3]
    assert batch.last.tolist() == [2, 3] and batch.attention.mask.shape == (2, 1, 2 * 3, 8)


def test_an_unknown_path_is_refused(cache):
    cache.reserve("a", 1)
    with pytest.raises(ValueError, match=r"attention path 'flash': use one of \('paged', 'varlen', 'padded'\)"):
        build_batch(cache, ["a"], [[1]], [0], torch.device("cpu"), "flash", q_per_kv=1)


def test_varlen_and_paged_attention_equal_padded_attention_on_random_kv(monkeypatch):
    # The three plans over the same blocks and queries: one-token runs of four KV lengths (varlen:
    # two groups, KV 4 and 4 unmasked, 18 and 21 masked; paged: one group for the compiled
    # kernel, longest first), a prompt and a chunk.
    monkeypatch.setattr(attention_module, "GROUP_OVERHEAD_TOKENS", 4)
    torch.manual_seed(0)
    kvh, G, hd, bs = 2, 3, 8, 4
    kv_blocks = torch.randn(2, 32, bs, kvh, hd)
    cache = PagedKVCache(num_layers=1, num_blocks=32, block_size=bs, num_kv_heads=kvh, head_dim=hd,
                         dtype=torch.float32, device=torch.device("cpu"), tier="cpu")
    runs, starts = [[1], [1], [1], [1], [1] * 6, [1] * 3], [3, 3, 17, 20, 0, 9]
    ids = [f"r{i}" for i in range(len(runs))]
    for rid, s, r in zip(ids, starts, runs):
        cache.reserve(rid, s + len(r))
    outs = {}
    for path in ("paged", "varlen", "padded"):
        batch = build_batch(cache, ids, runs, starts, torch.device("cpu"), path, q_per_kv=G)
        rows = batch.tokens.shape[0]
        q = torch.randn(rows, kvh * G, hd, generator=torch.Generator().manual_seed(1))
        k = torch.randn(rows, kvh, hd, generator=torch.Generator().manual_seed(2))
        v = torch.randn(rows, kvh, hd, generator=torch.Generator().manual_seed(3))
        # The same query and new K/V per real token on both paths: write them as the layer does.
        real = torch.arange(rows) if batch.real is None else batch.real
        order = torch.argsort(batch.slots)
        q_real = torch.randn(len(real), kvh * G, hd, generator=torch.Generator().manual_seed(4))[order.argsort()]
        kv_real = torch.randn(2, len(real), kvh, hd, generator=torch.Generator().manual_seed(5))[:, order.argsort()]
        q[real], k[real], v[real] = q_real, kv_real[0], kv_real[1]
        kv = kv_blocks.clone()
        kv[0].view(-1, kvh, hd).index_copy_(0, batch.slots, k[real])
        kv[1].view(-1, kvh, hd).index_copy_(0, batch.slots, v[real])
        out = batch.attention.attend(q, k, v, kv)
        if path == "varlen":
            assert [(g.end - g.start, g.mask is None) for g in batch.attention.groups] == [(2, True), (2, False)]
            assert batch.attention.kernel is None
        if path == "paged":
            assert batch.attention.kernel is not None, cpu_kernels.unavailable()
            (group,) = batch.attention.groups
            assert group.kv_lens.tolist() == [21, 18, 4, 4]
        outs[path] = batch.per_run(out)
    for i, r in enumerate(runs):  # the padded path's pad rows hold garbage
        for path in ("varlen", "paged"):
            torch.testing.assert_close(outs[path][i, :len(r)], outs["padded"][i, :len(r)], rtol=0, atol=1e-5)

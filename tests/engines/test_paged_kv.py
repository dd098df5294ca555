"""The paged KV cache: block accounting never leaks or double-frees, and paging is invisible
in the model's output (a request decodes the same alone or beside others)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.base import EngineError, OutOfKVBlocks, PrefillRequest, SamplingParams
from engines.torch.engine import TorchEngine
from engines.torch.kv_cache import BlockAllocator, KVAccountingError, PagedKVCache
from tests.engines.torch_probe import decode_with_logits, kv_len


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- allocator and block tables ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=40))
def test_allocator_hands_out_each_block_once(ops):
    alloc = BlockAllocator(32)
    held: list[list[int]] = []
    for allocate, n in ops:
        if allocate:
            if n > alloc.num_free:
                before = alloc.num_free
                with pytest.raises(OutOfKVBlocks):
                    alloc.allocate(n)
                assert alloc.num_free == before  # all-or-nothing
            else:
                held.append(alloc.allocate(n))
        elif held:
            alloc.free(held.pop(n % len(held)))
        flat = [b for h in held for b in h]
        assert len(flat) == len(set(flat)) == alloc.used
        assert alloc.used + alloc.num_free == alloc.num_blocks
        assert all(0 <= b < 32 for b in flat)
    for h in held:
        alloc.free(h)
    alloc.check_empty()


def test_double_free_and_foreign_blocks_are_refused():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(KVAccountingError, match="not allocated"):
        alloc.free(blocks)
    with pytest.raises(KVAccountingError, match="twice"):
        alloc.free([alloc.allocate(1)[0]] * 2)
    with pytest.raises(KVAccountingError, match="leaked"):
        alloc.check_empty()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 40)), max_size=30))
def test_block_tables_cover_exactly_the_tokens_reserved(ops):
    cache = PagedKVCache(num_layers=1, num_blocks=12, block_size=4, num_kv_heads=1, head_dim=2,
                         dtype=torch.float32, device=torch.device("cpu"), tier="cpu")
    reserved: dict[str, int] = {}
    for rid, n in ops:
        if n == 0:  # release; releasing an unknown id is a no-op
            cache.release(rid)
            reserved.pop(rid, None)
            continue
        try:
            cache.reserve(rid, n)
            reserved[rid] = max(reserved.get(rid, 0), n)
        except OutOfKVBlocks:
            pass
        cache.check_consistency()
        for r, tokens_held in reserved.items():
            assert len(cache.tables[r]) == cache.blocks_for(tokens_held)
    for rid in list(cache.tables):
        cache.release(rid)
    cache.allocator.check_empty()


# -- the engine --------------------------------------------------------------------------------


def test_blocks_return_to_zero_after_free(model_dir):
    engine = TorchEngine(model_dir, device="cpu", block_size=4, kv_blocks=64)
    engine.prefill([PrefillRequest("a", tokens(1, 10)), PrefillRequest("b", tokens(2, 3))])
    assert engine.kv_blocks_used("cpu") == 3 + 1
    for _ in range(3):
        engine.decode(["a", "b"])
    assert kv_len(engine, "a") == 13 and engine.kv_blocks_used("cpu") == 4 + 2
    engine.free(["a", "nobody", "a"])  # unknown and repeated ids are ignored
    engine.free(["a"])
    assert engine.kv_blocks_used("cpu") == 2
    engine.free(["b"])
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used("host") == 0
    engine.cache.allocator.check_empty()


def test_out_of_blocks_leaves_no_partial_allocation(model_dir):
    engine = TorchEngine(model_dir, device="cpu", block_size=4, kv_blocks=5)
    with pytest.raises(OutOfKVBlocks, match="out of blocks"):
        engine.prefill([PrefillRequest("a", tokens(1, 8)), PrefillRequest("b", tokens(2, 16))])
    assert engine.kv_blocks_used("cpu") == 0
    engine.prefill([PrefillRequest("a", tokens(1, 20))])  # exactly 5 blocks
    with pytest.raises(OutOfKVBlocks):
        engine.decode(["a"])  # the 21st token needs a sixth block
    engine.free(["a"])
    assert engine.kv_blocks_used("cpu") == 0


def test_engine_errors_name_the_problem(model_dir):
    engine = TorchEngine(model_dir, device="cpu", block_size=4, max_seq_len=12)
    with pytest.raises(EngineError, match="longer than max_seq_len=12"):
        engine.prefill([PrefillRequest("long", tokens(1, 13))])
    with pytest.raises(EngineError, match="already in use"):
        engine.prefill([PrefillRequest("x", [5]), PrefillRequest("x", [6])])
    with pytest.raises(EngineError, match="unknown request ids"):
        engine.decode(["ghost"])
    engine.prefill([PrefillRequest("full", tokens(1, 11))])
    with pytest.raises(EngineError, match="already in use"):
        engine.prefill([PrefillRequest("full", [5])])
    with pytest.raises(EngineError, match="more than once"):
        engine.decode(["full", "full"])
    engine.decode(["full"])  # KV reaches max_seq_len = 12
    with pytest.raises(EngineError, match="max_seq_len=12"):
        engine.decode(["full"])
    engine.free(["full"])
    assert engine.kv_blocks_used("cpu") == 0


def test_timings_describe_the_work(model_dir):
    engine = TorchEngine(model_dir, device="cpu", block_size=4)
    pre = engine.prefill([PrefillRequest("a", tokens(1, 7)), PrefillRequest("b", tokens(2, 3))]).timing
    assert (pre.op, pre.num_seqs, pre.num_tokens, pre.kv_tokens, pre.max_kv) == ("prefill", 2, 10, 10, 7)
    dec = engine.decode(["a", "b"]).timing
    assert (dec.op, dec.num_seqs, dec.num_tokens, dec.kv_tokens, dec.max_kv) == ("decode", 2, 2, 12, 8)
    assert pre.seconds > 0 and dec.seconds > 0
    info = engine.describe()
    assert info.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 4  # layers * (K,V) * block * kv_heads * head_dim * fp32
    assert info.devices[0].name == "cpu" and not info.capabilities.can_offload


def test_decode_is_the_same_alone_or_batched(model_dir):
    """Batch neighbours change the padded shapes and block placement, never a request's output."""
    steps = 20
    alone = TorchEngine(model_dir, device="cpu", block_size=4)
    alone.prefill([PrefillRequest("me", tokens(7, 6))])
    alone_out = [decode_with_logits(alone, ["me"]) for _ in range(steps)]

    crowd = TorchEngine(model_dir, device="cpu", block_size=4)
    # Neighbours first, so "me" gets different physical blocks; their KV is longer and shorter.
    crowd.prefill([PrefillRequest("long", tokens(8, 37)), PrefillRequest("short", tokens(9, 2))])
    crowd.decode(["long", "short"])
    crowd.prefill([PrefillRequest("me", tokens(7, 6)), PrefillRequest("mid", tokens(10, 15))])
    for i in range(steps):
        batch = ["long", "me", "short", "mid"] if i % 3 else ["me", "mid"]
        result, logits = decode_with_logits(crowd, batch)
        want_result, want_logits = alone_out[i]
        assert result.tokens["me"] == want_result.tokens["me"], f"step {i}"
        torch.testing.assert_close(logits[batch.index("me")], want_logits[0], rtol=0, atol=1e-5)
    assert crowd.cache.tables["me"] != alone.cache.tables["me"]


def test_a_freed_id_can_be_prefilled_again(model_dir):
    engine = TorchEngine(model_dir, device="cpu")
    engine.prefill([PrefillRequest("s", tokens(1, 4), SamplingParams(temperature=1.0, seed=3))])
    engine.free(["s"])
    engine.prefill([PrefillRequest("s", tokens(1, 4), SamplingParams(temperature=1.0, seed=3))])
    assert kv_len(engine, "s") == 4 and engine.kv_blocks_used("cpu") == 1

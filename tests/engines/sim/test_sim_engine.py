"""The sim engine keeps the engine contract's books and moves its virtual clock by the cost model.

Times are checked against the cost model's own functions (tested against hand-computed cases in
test_cost_model.py) and, for links, against bytes / bandwidth + latency worked out here."""
from __future__ import annotations

import pytest

from engines.base import HOST, IN_FLIGHT, EngineError, OutOfKVBlocks, PrefillChunk, PrefillRequest
from engines.sim.cost_model import CostModel
from engines.sim.engine import SIM_EOS, SIM_TOKEN, SimEngine
from engines.sim.profiles import H100_SXM, OPT_13B

GB = 1e9


@pytest.fixture
def cost():
    return CostModel(H100_SXM, OPT_13B)


def engine(cost, **kw):
    kw.setdefault("host_kv_bytes", 20 * GB)
    kw.setdefault("max_seq_len", 8192)
    return SimEngine(cost, **kw)


def req(rid, n):
    return PrefillRequest(rid, [5] * n)


def test_describe_sizes_the_kv_pool_from_device_memory(cost):
    e = engine(cost, helper_devices=1)
    info = e.describe()
    per_block = OPT_13B.kv_bytes_per_token * 16
    assert info.bytes_per_block == per_block == 16 * 2 * 40 * 40 * 128 * 2
    want = int((0.9 * 80e9 - OPT_13B.weight_bytes) // per_block)
    assert [d.kv_blocks for d in info.devices] == [want, want]
    assert [d.name for d in info.devices] == ["cuda:0", "cuda:1"]
    assert info.host_blocks == int(20e9 // per_block)
    caps = info.capabilities
    assert caps.can_offload and caps.can_peer_copy and caps.can_chunk_prefill and caps.can_overlap_prefill
    assert info.model.eos_token_ids == (SIM_EOS,) and SIM_TOKEN != SIM_EOS


def test_prefill_and_decode_advance_the_clock_by_the_cost_model(cost):
    e = engine(cost)
    out = e.prefill([req("a", 100), req("b", 300)])
    assert out.tokens == {"a": SIM_TOKEN, "b": SIM_TOKEN}
    assert e.clock() == pytest.approx(cost.prefill_seconds([100, 300]))
    t0 = e.clock()
    step = e.decode(["a", "b"])
    assert step.timing.kv_tokens == 101 + 301 and step.timing.max_kv == 301
    assert e.clock() - t0 == pytest.approx(cost.decode_seconds([101, 301]))
    assert e.kv_len("a") == 101
    # 101 tokens -> 7 blocks, 301 -> 19 blocks.
    assert e.kv_blocks_used("cuda:0") == 7 + 19


def test_moves_on_one_pcie_link_queue_and_on_two_links_overlap(cost):
    e = engine(cost, helper_devices=1)
    e.prefill([req("a", 1600), req("b", 1600)])
    e.prefill([req("c", 1600)], device="cuda:1")
    t0 = e.clock()
    bw, lat = H100_SXM.pcie_bandwidth, H100_SXM.pcie_latency
    nbytes = 100 * e.bytes_per_block  # 1600 tokens = 100 blocks
    h1 = e.move(["a"], "cuda:0", HOST)
    h2 = e.move(["b"], "cuda:0", HOST)  # same link and direction: after h1
    h3 = e.move(["c"], "cuda:1", HOST)  # another device's link: alongside h1
    assert h1.bytes == nbytes
    assert e.tier_of("a") == IN_FLIGHT and not e.poll(h1)
    e.wait(h3)
    assert e.clock() - t0 == pytest.approx(lat + nbytes / bw)
    assert e.poll(h1) and e.tier_of("a") == HOST  # ended at the same time as h3
    assert not e.poll(h2)
    e.wait(h2)
    assert e.clock() - t0 == pytest.approx(2 * (lat + nbytes / bw))
    assert h2.seconds == pytest.approx(2 * (lat + nbytes / bw))
    assert e.kv_blocks_used("cuda:0") == 0 and e.kv_blocks_used(HOST) == 300


def test_a_peer_copy_uses_nvlink_and_wait_any_stops_at_the_first_end(cost):
    e = engine(cost, helper_devices=1)
    e.prefill([req("a", 1600)], device="cuda:1")
    e.prefill([req("b", 1600)])
    t0 = e.clock()
    nbytes = 100 * e.bytes_per_block
    peer = e.move(["a"], "cuda:1", "cuda:0")
    off = e.move(["b"], "cuda:0", HOST)
    e.wait_any([off, peer])
    assert e.clock() - t0 == pytest.approx(H100_SXM.nvlink_latency + nbytes / H100_SXM.nvlink_bandwidth)
    assert e.poll(peer) and not e.poll(off)
    assert e.tier_of("a") == "cuda:0" and e.kv_blocks_used("cuda:1") == 0


def test_a_prefill_on_another_device_overlaps_decode(cost):
    e = engine(cost, helper_devices=1)
    e.prefill([req("run", 50)])
    t0 = e.clock()
    handle = e.start_prefill([req("p", 4000)], "cuda:1")
    assert e.prefill_result(handle) is None and e.clock() == t0
    long = cost.prefill_seconds([4000])
    steps = 0
    while e.prefill_result(handle) is None:
        e.decode(["run"])
        steps += 1
    assert steps > 1  # several decode steps ran while the prompt was prefilled
    assert e.clock() - t0 >= long
    with pytest.raises(EngineError, match="already in use"):
        e.start_prefill([req("p", 10)], "cuda:1")
    # A move of KV that is still being prefilled starts when the prefill ends.
    h2 = e.start_prefill([req("q", 4000)], "cuda:1")
    t1 = e.clock()
    mv = e.move(["q"], "cuda:1", "cuda:0")
    e.wait(mv)
    assert e.clock() - t1 >= long
    assert e.prefill_result(h2) is not None


def test_mixed_step_prefills_chunks_and_decodes_together(cost):
    e = engine(cost)
    e.prefill([req("d", 200)])
    r = req("c", 1000)
    t0 = e.clock()
    out = e.mixed_step(["d"], [PrefillChunk(r, 0, 512)])
    assert out.tokens == {"d": SIM_TOKEN}  # the chunked prompt is not done: no token
    assert e.clock() - t0 == pytest.approx(cost.step_seconds([201], [(0, 512)]))
    with pytest.raises(EngineError, match="prompt tokens prefilled"):
        e.decode(["c"])
    with pytest.raises(EngineError, match="does not continue its prompt"):
        e.mixed_step([], [PrefillChunk(r, 600, 1000)])
    out = e.mixed_step(["d"], [PrefillChunk(r, 512, 1000)])
    assert out.tokens == {"d": SIM_TOKEN, "c": SIM_TOKEN}
    assert e.kv_len("c") == 1000 and e.kv_len("d") == 202
    e.decode(["c", "d"])
    e.free(["c", "d"])
    assert e.kv_blocks_used("cuda:0") == 0


def test_refusals_change_nothing(cost):
    e = engine(cost, kv_blocks=10, max_seq_len=1000)
    e.prefill([req("a", 100)])  # 7 blocks
    used = e.kv_blocks_used("cuda:0")
    now = e.clock()
    for call, match in [
        (lambda: e.prefill([req("b", 16), req("c", 64)]), "out of blocks"),  # 1 + 4 > 3 free
        (lambda: e.prefill([req("a", 10)]), "already in use"),
        (lambda: e.prefill([req("x", 1001)]), "max_seq_len=1000"),
        (lambda: e.prefill([PrefillRequest("y", [OPT_13B.vocab])]), "outside"),
        (lambda: e.decode(["nope"]), "unknown request id"),
        (lambda: e.decode(["a", "a"]), "more than once"),
        (lambda: e.move(["a"], HOST, "cuda:0"), "is in 'cuda:0'"),
        (lambda: e.move(["a"], "cuda:0", "cuda:0"), "both"),
        (lambda: e.move(["a"], "cuda:0", "cuda:7"), "unknown KV tier"),
    ]:
        with pytest.raises(EngineError, match=match):
            call()
        assert e.kv_blocks_used("cuda:0") == used and e.clock() == now
    with pytest.raises(OutOfKVBlocks):
        e.prefill([req("b", 16), req("c", 64)])
    assert e.tier_of("a") == "cuda:0"
    h = e.move(["a"], "cuda:0", HOST)
    with pytest.raises(EngineError, match="in_flight"):
        e.decode(["a"])
    e.wait(h)
    with pytest.raises(EngineError, match="is in 'host'"):
        e.decode(["a"])


def test_a_failed_copy_keeps_the_kv_where_it_was(cost):
    e = engine(cost)
    e.prefill([req("a", 100)])
    e.inject_copy_fault("error")
    h = e.move(["a"], "cuda:0", HOST)
    assert e.kv_blocks_used(HOST) == 7
    with pytest.raises(EngineError, match="injected copy failure"):
        e.wait(h)
    assert e.tier_of("a") == "cuda:0" and e.kv_blocks_used(HOST) == 0 and e.kv_blocks_used("cuda:0") == 7
    h = e.move(["a"], "cuda:0", HOST)  # the next copy works
    e.wait(h)
    assert e.tier_of("a") == HOST


def test_free_mid_move_releases_both_sides_and_the_move_lands_for_the_rest(cost):
    e = engine(cost)
    e.prefill([req("a", 100), req("b", 50)])
    h = e.move(["a", "b"], "cuda:0", HOST)
    e.free(["a", "a"])
    assert e.kv_blocks_used("cuda:0") == 4 and e.kv_blocks_used(HOST) == 4
    e.wait(h)
    assert e.tier_of("b") == HOST and e.kv_blocks_used("cuda:0") == 0
    e.free(["b", "unknown"])
    assert e.kv_blocks_used(HOST) == 0
    with pytest.raises(EngineError, match="unknown request id"):
        e.tier_of("b")

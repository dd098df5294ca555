"""The torch engine on several devices: prefill on a helper device, move the KV to the decode
device (directly, or by way of the host pool), decode; the tokens are those of an engine that
never moved anything. "cpu:1" is a second CPU tier with a pool of its own, so all of this runs
without a GPU; with one, the decode device is "cuda:0" and the helper stays on the CPU."""
from __future__ import annotations

import threading

import pytest
import torch

from engines.base import HOST, IN_FLIGHT, CapabilityError, EngineError, OutOfKVBlocks, PrefillRequest, SamplingParams
from engines.torch.engine import TorchEngine
from tests.engines.torch_probe import cache_of, decode_with_logits, hold_copies, kv_contents, kv_len

# As in test_kv_tiers: the CUDA layout is collected only where there is a GPU.
LAYOUTS = [("cpu", "cpu:1")] + ([("cuda:0", "cpu:1")] if torch.cuda.is_available() else [])


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def two_devices(model_dir, device="cpu", helper="cpu:1", kv_blocks=32, host_kv_blocks=32) -> TorchEngine:
    return TorchEngine(model_dir, device=device, helper_devices=(helper,), block_size=4, kv_blocks=kv_blocks,
                       host_kv_blocks=host_kv_blocks)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_on_a_helper_then_decode_gives_the_tokens_of_one_device(model_dir, layout):
    decode_on, helper = layout
    if decode_on.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the CPU-prefilled KV must match closely
    sampling = {"greedy": SamplingParams(), "seeded": SamplingParams(temperature=1.0, top_k=20, seed=11)}
    ids = list(sampling)
    prompts = [PrefillRequest(name, tokens(3, 9), s) for name, s in sampling.items()]

    alone = TorchEngine(model_dir, device=decode_on, block_size=4, kv_blocks=32)
    want_first = alone.prefill(prompts).tokens
    want_kv = {i: kv_contents(alone, i) for i in ids}
    want = [decode_with_logits(alone, ids) for _ in range(12)]

    engine = two_devices(model_dir, decode_on, helper)
    engine.prefill([PrefillRequest("other", tokens(4, 6))])  # so the KV lands in other blocks
    assert engine.prefill(prompts, device=helper).tokens == want_first
    assert {engine.tier_of(i) for i in ids} == {helper}
    assert engine.kv_blocks_used(helper) == 2 * 3 and engine.kv_blocks_used(decode_on) == 2
    kv = {i: kv_contents(engine, i) for i in ids}
    same_kind = torch.device(decode_on).type == "cpu"
    for i in ids:
        if same_kind:  # the same kernels on the same CPU: the same bytes
            assert torch.equal(kv[i], want_kv[i])
        else:
            torch.testing.assert_close(kv[i], want_kv[i], rtol=0, atol=1e-4)

    # greedy goes straight to the decode device (and out and back once more); seeded by way of the host.
    direct, offload = engine.move(["greedy"], helper, decode_on), engine.move(["seeded"], helper, HOST)
    engine.wait(direct)
    engine.wait(offload)
    assert direct.bytes == 3 * engine.cache.bytes_per_block and direct.seconds > 0
    assert engine.tier_of("greedy") == decode_on and engine.tier_of("seeded") == HOST
    engine.wait(engine.move(["greedy"], decode_on, helper))
    assert engine.tier_of("greedy") == helper and torch.equal(kv_contents(engine, "greedy"), kv["greedy"])
    engine.wait(engine.move(["greedy"], helper, decode_on))
    assert torch.equal(kv_contents(engine, "seeded"), kv["seeded"])
    engine.wait(engine.move(["seeded"], HOST, decode_on))
    assert engine.kv_blocks_used(helper) == engine.kv_blocks_used(HOST) == 0
    assert engine.kv_blocks_used(decode_on) == 2 + 2 * 3
    for i in ids:
        assert engine.tier_of(i) == decode_on
        assert torch.equal(kv_contents(engine, i), kv[i])

    got = [decode_with_logits(engine, ids) for _ in range(12)]
    assert [g.tokens for g, _ in got] == [w.tokens for w, _ in want]
    for (_, got_logits), (_, want_logits) in zip(got, want):
        torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0 if same_kind else 1e-4)
    engine.free(ids + ["other"])
    assert all(engine.kv_blocks_used(t) == 0 for t in (decode_on, helper, HOST))


def test_describe_lists_every_device_and_peer_copy(model_dir):
    engine = TorchEngine(model_dir, device="cpu", helper_devices=("cpu:1", "cpu:2"), block_size=4, kv_blocks=9,
                         host_kv_blocks=5)
    info = engine.describe()
    assert [(d.name, d.kind, d.kv_blocks) for d in info.devices] == [
        ("cpu", "cpu", 9), ("cpu:1", "cpu", 9), ("cpu:2", "cpu", 9)]
    assert info.decode_device == "cpu" and info.tier_blocks("cpu:2") == 9 and info.host_blocks == 5
    assert info.capabilities.can_peer_copy and info.capabilities.can_offload
    # One set of weights for every CPU tier, but a KV pool each.
    assert engine._devices["cpu:2"].model is engine.model
    pools = [cache_of(engine, "cpu:1").kv, engine.cache.kv, cache_of(engine, "cpu:2").kv]
    assert pools[0].data_ptr() != pools[1].data_ptr() != pools[2].data_ptr()
    with pytest.raises(KeyError, match="unknown KV tier 'cpu:3'"):
        engine.kv_blocks_used("cpu:3")

    peers_only = two_devices(model_dir, host_kv_blocks=0)
    caps = peers_only.describe().capabilities
    assert caps.can_peer_copy and not caps.can_offload and peers_only.kv_blocks_used(HOST) == 0
    peers_only.prefill([PrefillRequest("a", tokens(1, 5))], device="cpu:1")
    peers_only.wait(peers_only.move(["a"], "cpu:1", "cpu"))  # device to device needs no host pool
    assert peers_only.tier_of("a") == "cpu"
    with pytest.raises(CapabilityError, match="can_offload=False"):
        peers_only.move(["a"], "cpu", HOST)

    single = TorchEngine(model_dir, device="cpu", block_size=4)
    assert not single.describe().capabilities.can_peer_copy and len(single.describe().devices) == 1
    single.prefill([PrefillRequest("a", tokens(1, 5))])
    with pytest.raises(CapabilityError, match="can_peer_copy=False"):
        single.move(["a"], "cpu", "cpu:1")


def test_device_names_are_checked_before_anything_loads(model_dir):
    with pytest.raises(EngineError, match="device 'cpu:1' is tier 'cpu:1', which 'cpu:1' already names"):
        TorchEngine(model_dir, device="cpu", helper_devices=("cpu:1", "cpu:1"))
    with pytest.raises(EngineError, match="device 'cpu:0' is tier 'cpu', which 'cpu' already names"):
        TorchEngine(model_dir, device="cpu", helper_devices=("cpu:0",))
    with pytest.raises(EngineError, match="not a single string"):
        TorchEngine(model_dir, device="cpu", helper_devices="cpu:1")
    with pytest.raises(EngineError, match="'tpu:0' is not a device name"):
        TorchEngine(model_dir, device="cpu", helper_devices=("tpu:0",))
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="'cuda:1' requested but CUDA is not available"):
            TorchEngine(model_dir, device="cpu", helper_devices=("cuda:1",))


def test_misplaced_requests_and_unknown_tiers_are_refused(model_dir):
    engine = two_devices(model_dir)
    engine.prefill([PrefillRequest("a", tokens(1, 5))], device="cpu:1")
    with pytest.raises(EngineError, match=r"KV must be on 'cpu' to decode, but 'a' is in 'cpu:1'"):
        engine.decode(["a"])
    with pytest.raises(EngineError, match="unknown KV tier 'cpu:7'"):
        engine.move(["a"], "cpu:1", "cpu:7")
    with pytest.raises(EngineError, match="source and destination are both 'cpu:1'"):
        engine.move(["a"], "cpu:1", "cpu:1")
    with pytest.raises(EngineError, match=r"move from 'cpu': 'a' is in 'cpu:1'"):
        engine.move(["a"], "cpu", HOST)
    with pytest.raises(EngineError, match=r"computes on \['cpu', 'cpu:1'\]"):
        engine.prefill([PrefillRequest("b", [5])], device="cpu:7")
    assert "b" not in engine._seqs
    assert (engine.kv_blocks_used("cpu"), engine.kv_blocks_used("cpu:1"), engine.kv_blocks_used(HOST)) == (0, 2, 0)


def test_peer_move_in_flight_free_and_full_destination(model_dir):
    engine = two_devices(model_dir, kv_blocks=8, host_kv_blocks=8)
    engine.prefill([PrefillRequest("a", tokens(1, 10)), PrefillRequest("b", tokens(2, 3))], device="cpu:1")
    gate = threading.Event()
    hold_copies(engine, gate.wait)  # hold the copy worker so the move stays in flight
    handle = engine.move(["a", "b"], "cpu:1", "cpu")
    assert not engine.poll(handle) and engine.tier_of("a") == IN_FLIGHT
    assert engine.kv_blocks_used("cpu:1") == 4 and engine.kv_blocks_used("cpu") == 4  # both ends while in flight
    with pytest.raises(EngineError, match=r"'a' is in_flight"):
        engine.decode(["a"])
    with pytest.raises(EngineError, match=r"'b' is in_flight"):
        engine.move(["b"], "cpu:1", HOST)
    engine.free(["a"])  # at once: a's blocks at both ends are held while the copy may touch them
    assert (engine.kv_blocks_used("cpu"), engine.kv_blocks_used("cpu:1")) == (4, 4)
    gate.set()
    engine.wait(handle)
    assert engine.tier_of("b") == "cpu"
    assert (engine.kv_blocks_used("cpu"), engine.kv_blocks_used("cpu:1")) == (1, 0)

    engine.prefill([PrefillRequest("c", tokens(3, 4 * 7))])  # the decode pool is full now: b 1 + c 7
    engine.prefill([PrefillRequest("d", tokens(4, 5))], device="cpu:1")
    with pytest.raises(OutOfKVBlocks, match="'cpu' is out of blocks"):
        engine.move(["d"], "cpu:1", "cpu")
    assert engine.tier_of("d") == "cpu:1" and engine.kv_blocks_used("cpu:1") == 2 and engine.kv_blocks_used("cpu") == 8

    gate = threading.Event()
    hold_copies(engine, gate.wait)
    engine.move(["d"], "cpu:1", HOST)
    threading.Timer(0.05, gate.set).start()
    engine.close()  # waits for the move in flight, in every tier
    assert not engine._tiers.busy
    assert all(not pool.tables for pool in engine._tiers.pools.values())


def test_a_failed_peer_copy_leaves_the_kv_in_the_source(model_dir, fail_next_copy):
    engine = two_devices(model_dir)
    engine.prefill([PrefillRequest("a", tokens(1, 7))], device="cpu:1")
    before = kv_contents(engine, "a")
    fail_next_copy(engine)
    handle = engine.move(["a"], "cpu:1", "cpu")
    with pytest.raises(EngineError, match="failed; the KV stays in 'cpu:1': injected copy failure"):
        engine.wait(handle)
    assert handle.seconds is None and engine.tier_of("a") == "cpu:1"
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used("cpu:1") == 2
    assert torch.equal(kv_contents(engine, "a"), before)
    engine.wait(engine.move(["a"], "cpu:1", "cpu"))  # the next try works
    assert torch.equal(kv_contents(engine, "a"), before)
    assert kv_len(engine, "a") == 7 and engine.decode(["a"]).tokens.keys() == {"a"}


def test_loader_passes_helper_devices(demo_engine_dir):
    from engines.loader import load_engine

    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=16, host_kv_blocks=0, helper_devices=("cpu:1",))
    info = eng.describe()
    assert [d.name for d in info.devices] == ["cpu", "cpu:1"] and info.tier_blocks("cpu:1") == 16
    assert info.capabilities.can_peer_copy and not info.capabilities.can_offload
    eng.close()
    assert [d.name for d in load_engine(demo_engine_dir, device="cpu", kv_blocks=16).describe().devices] == ["cpu"]

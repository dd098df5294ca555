"""KV tiers in the torch engine: a request's KV moves device <-> host pool with real copies and
comes back unchanged, so offloading is invisible in its tokens; block accounting never leaks."""
from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.base import HOST, IN_FLIGHT, CapabilityError, EngineError, OutOfKVBlocks, PrefillRequest, SamplingParams
from engines.torch.engine import TorchEngine
from engines.torch.kv_cache import KVAccountingError
from tests.engines.torch_probe import hold_copies, kv_contents, kv_len

DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_on(model_dir, device="cpu", kv_blocks=32, host_kv_blocks=32) -> TorchEngine:
    return TorchEngine(model_dir, device=device, block_size=4, kv_blocks=kv_blocks, host_kv_blocks=host_kv_blocks)


def offload_and_back(engine: TorchEngine, ids: list[str]) -> None:
    engine.wait(engine.move(ids, engine.tier, HOST))
    assert all(engine.tier_of(i) == HOST for i in ids)
    engine.wait(engine.move(ids, HOST, engine.tier))


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_keeps_kv_and_tokens(model_dir, device):
    sampling = {"greedy": SamplingParams(), "seeded": SamplingParams(temperature=1.0, top_k=20, seed=11)}
    prompts = [PrefillRequest(name, tokens(3, 9), s) for name, s in sampling.items()]

    stay = engine_on(model_dir, device)
    stay.prefill(prompts)
    want = [stay.decode(list(sampling)).tokens for _ in range(12)]

    roam = engine_on(model_dir, device)
    assert roam.host_pool.kv.is_pinned() == (roam.device.type == "cuda")
    roam.prefill([PrefillRequest("other", tokens(4, 6))])  # so the KV comes back to other blocks
    roam.prefill(prompts)
    got = [roam.decode(list(sampling)).tokens for _ in range(5)]
    before = {i: kv_contents(roam, i) for i in sampling}
    tables_before = {i: list(roam.cache.tables[i]) for i in sampling}
    roam.wait(roam.move(list(sampling), roam.tier, HOST))
    assert roam.kv_blocks_used(HOST) == 2 * 4 and roam.kv_blocks_used(roam.tier) == 2  # "other" only
    for i in sampling:
        assert roam.tier_of(i) == HOST
        assert torch.equal(kv_contents(roam, i), before[i])
    roam.decode(["other"])  # the device keeps working while they are away
    roam.prefill([PrefillRequest("squatter", tokens(5, 12))])  # takes the blocks they left
    roam.wait(roam.move(list(sampling), HOST, roam.tier))
    assert roam.kv_blocks_used(HOST) == 0
    for i in sampling:
        assert roam.tier_of(i) == roam.tier
        assert torch.equal(kv_contents(roam, i), before[i])
        assert roam.cache.tables[i] != tables_before[i]
    got += [roam.decode(list(sampling)).tokens for _ in range(7)]
    assert got == want


def test_describe_and_capabilities(model_dir):
    engine = engine_on(model_dir, host_kv_blocks=7)
    info = engine.describe()
    assert info.host_blocks == 7 and info.tier_blocks(HOST) == 7
    assert info.capabilities.can_offload and not info.capabilities.can_peer_copy
    assert engine.host_pool.bytes_per_block == engine.cache.bytes_per_block
    assert not engine.host_pool.kv.is_pinned()  # CPU engine: plain host memory

    without = engine_on(model_dir, host_kv_blocks=0)
    assert without.describe().host_blocks == 0 and not without.describe().capabilities.can_offload
    without.prefill([PrefillRequest("a", [5, 6])])
    with pytest.raises(CapabilityError, match="can_offload=False"):
        without.move(["a"], "cpu", HOST)
    with pytest.raises(EngineError, match="host_kv_blocks must be >= 0"):
        engine_on(model_dir, host_kv_blocks=-1)


def test_poll_and_wait(model_dir):
    engine = engine_on(model_dir)
    engine.prefill([PrefillRequest("a", tokens(1, 10))])
    gate = threading.Event()
    hold_copies(engine, gate.wait)  # hold the copy worker so the move stays in flight
    handle = engine.move(["a"], "cpu", HOST)
    assert handle.bytes == 3 * engine.cache.bytes_per_block
    assert (handle.src, handle.dst, handle.request_ids) == ("cpu", HOST, ("a",))
    assert not engine.poll(handle) and handle.seconds is None
    assert engine.tier_of("a") == IN_FLIGHT
    assert engine.kv_blocks_used("cpu") == 3 and engine.kv_blocks_used(HOST) == 3  # both tiers while in flight
    gate.set()
    engine.wait(handle)
    assert handle.seconds is not None and handle.seconds > 0  # timed for the cost model
    assert engine.poll(handle)  # finished handles stay finished
    engine.wait(handle)
    assert engine.tier_of("a") == HOST
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used(HOST) == 3
    back = engine.move(["a"], HOST, "cpu")
    while not engine.poll(back):
        pass
    assert engine.tier_of("a") == "cpu"
    empty = engine.move([], "cpu", HOST)
    assert engine.poll(empty) and empty.bytes == 0


def test_full_destination_changes_nothing(model_dir):
    engine = engine_on(model_dir, host_kv_blocks=4)
    engine.prefill([PrefillRequest("a", tokens(1, 8)), PrefillRequest("b", tokens(2, 9))])  # 2 + 3 blocks
    tables = {i: list(engine.cache.tables[i]) for i in "ab"}
    with pytest.raises(OutOfKVBlocks, match="'host' is out of blocks"):
        engine.move(["a", "b"], "cpu", HOST)
    assert engine.kv_blocks_used(HOST) == 0 and engine.kv_blocks_used("cpu") == 5
    assert {i: engine.cache.tables[i] for i in "ab"} == tables
    assert engine.tier_of("a") == engine.tier_of("b") == "cpu"
    engine.decode(["a", "b"])
    engine.wait(engine.move(["b"], "cpu", HOST))  # one of them fits
    engine.prefill([PrefillRequest("c", tokens(3, 4 * 32 - 12))])  # fill the device pool
    with pytest.raises(OutOfKVBlocks, match="'cpu' is out of blocks"):
        engine.move(["b"], HOST, "cpu")
    assert engine.tier_of("b") == HOST and engine.kv_blocks_used(HOST) == 3


def test_misplaced_kv_is_refused_with_its_whereabouts(model_dir):
    engine = engine_on(model_dir)
    engine.prefill([PrefillRequest("a", tokens(1, 5)), PrefillRequest("b", tokens(2, 5))])
    engine.wait(engine.move(["a"], "cpu", HOST))
    with pytest.raises(EngineError, match=r"'a' is in 'host'"):
        engine.decode(["a", "b"])
    gate = threading.Event()
    hold_copies(engine, gate.wait)
    handle = engine.move(["b"], "cpu", HOST)
    with pytest.raises(EngineError, match=r"'b' is in_flight"):
        engine.decode(["b"])
    with pytest.raises(EngineError, match=r"'b' is in_flight"):
        engine.move(["b"], "cpu", HOST)
    with pytest.raises(EngineError, match=r"'a' is in 'host'"):
        engine.move(["a"], "cpu", HOST)
    with pytest.raises(EngineError, match="unknown KV tier 'cuda:7'"):
        engine.move(["a"], HOST, "cuda:7")
    with pytest.raises(EngineError, match="both 'cpu'"):
        engine.move(["a"], "cpu", "cpu")
    with pytest.raises(EngineError, match="unknown request ids"):
        engine.move(["ghost"], "cpu", HOST)
    with pytest.raises(EngineError, match="move the KV to the host"):
        engine.prefill([PrefillRequest("c", [5])], device=HOST)
    gate.set()
    engine.wait(handle)
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used(HOST) == 4


def test_free_during_flight_leaks_nothing(model_dir):
    engine = engine_on(model_dir)
    engine.prefill([PrefillRequest("a", tokens(1, 10)), PrefillRequest("b", tokens(2, 3))])
    gate = threading.Event()
    hold_copies(engine, gate.wait)
    handle = engine.move(["a", "b"], "cpu", HOST)
    engine.free(["a"])  # at once: the copy may still read a's source and write its destination
    assert engine.tier_of("b") == IN_FLIGHT  # the rest of the move goes on
    assert engine.kv_blocks_used("cpu") == 3 + 1 and engine.kv_blocks_used(HOST) == 3 + 1  # a's held, b's
    gate.set()
    engine.wait(handle)
    assert engine.tier_of("b") == HOST
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used(HOST) == 1  # a's held blocks freed
    engine.free(["b"])
    engine.cache.allocator.check_empty()
    engine.host_pool.allocator.check_empty()


def test_from_engine_dir_takes_host_blocks_from_the_manifest(model_dir):
    from engines.manifest import Manifest
    manifest = Manifest(
        backend="torch", architecture="LlamaForCausalLM", dtype="float32", max_seq_len=64, kv_block_size=4,
        kv_blocks_device=20, kv_blocks_host=9, bytes_per_block=2 * 2 * 4 * 2 * 8 * 4, tokenizer="tokenizer.json",
        weights=(), weights_sha256="", num_params=0,
    )
    assert TorchEngine.from_engine_dir(model_dir, manifest, device="cpu").describe().host_blocks == 9
    assert TorchEngine.from_engine_dir(model_dir, manifest, device="cpu", host_kv_blocks=0).describe().host_blocks == 0


# -- random sequences of operations ------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        # prefill and move twice: requests to work on, and moves between many pairs of tiers
        st.sampled_from(["prefill", "prefill", "decode", "decode_any", "offload", "reload", "move", "move",
                         "move_any", "poll", "wait", "free", "stall", "unstall", "fail_copy"]),
        st.integers(0, 5), st.integers(1, 20),
    ),
    min_size=10, max_size=40,
)


@pytest.fixture(scope="module", params=[(), ("cpu:1",)], ids=["one device", "two devices"])
def shared_engine(request, model_dir):
    """A small CPU engine with a host pool, alone or with a helper device (peer moves)."""
    return TorchEngine(model_dir, device="cpu", helper_devices=request.param, block_size=4, kv_blocks=14,
                       host_kv_blocks=10)


def check_accounting(engine: TorchEngine, names: list[str]) -> None:
    """Every live request holds exactly its blocks in its tier, or in both ends of its move while
    in flight; a freed one holds none anywhere."""
    pools = engine._tiers.pools
    expected = dict.fromkeys(pools, 0)
    for r in names:
        holding = {t for t, pool in pools.items() if r in pool.tables}
        if r not in engine._seqs:
            assert not holding, f"freed {r} still holds blocks in {holding}"
            continue
        tier = engine.tier_of(r)
        if tier == IN_FLIGHT:
            handle = engine._tiers._in_flight[r].handle
            assert holding == {handle.src, handle.dst}
        else:
            assert holding == {tier}
        for t in holding:
            assert len(pools[t].tables[r]) >= engine.cache.blocks_for(kv_len(engine, r))
            expected[t] += len(pools[t].tables[r])
    for t, pool in pools.items():
        used = engine.kv_blocks_used(t)  # frees first the held blocks of copies that have ended
        assert used == expected[t] + sum(len(b) for b in pool.held), t
        pool.check_consistency()


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_operations_keep_block_accounting(shared_engine, fail_next_copy, ops):
    """Prefill (on any device), decode, moves between any two tiers, polls, waits, frees (also in
    the middle of a move) and copies that fail, with errors on the way: blocks are never leaked or
    freed twice (KVAccountingError) in any tier, and a settled request's KV is always the KV it
    had after its last prefill or decode."""
    engine = shared_engine
    devices = [d.name for d in engine.describe().devices]
    tiers = devices + [HOST]
    names = [f"r{i}" for i in range(6)]
    handles = []
    kv = {}  # request -> its KV after its last prefill or decode
    gate: threading.Event | None = None  # while set up and unset, the copy worker is held

    def blocking(call):
        if gate is not None and not gate.is_set():  # let the worker go shortly after we block
            threading.Timer(0.002, gate.set).start()
        return call()

    for op, who, n in ops:
        rid = names[who]
        live = [r for r in names if r in engine._seqs]
        try:
            if op == "prefill":
                engine.prefill([PrefillRequest(rid, tokens(who, n))], device=devices[n % len(devices)])
                kv[rid] = kv_contents(engine, rid)
            elif op in ("decode", "decode_any"):
                batch = live if op == "decode_any" else [r for r in live if engine.tier_of(r) == "cpu"]
                engine.decode(batch[: n % 4 + 1])
                kv.update({r: kv_contents(engine, r) for r in batch[: n % 4 + 1]})
            elif op == "move" and live:  # a live request and some neighbours, to any tier (or its own)
                first = live[who % len(live)]
                src = engine.tier_of(first)
                batch = [first] + [r for r in live if r != first and engine.tier_of(r) == src][: n % 3]
                handles.append(engine.move(batch, src, tiers[n % len(tiers)]))
            elif op in ("offload", "reload", "move_any"):
                if op == "move_any":
                    src, dst = tiers[n % len(tiers)], tiers[(n // len(tiers) + who) % len(tiers)]
                else:
                    src, dst = ("cpu", HOST) if op == "offload" else (HOST, "cpu")
                movable = live if op == "move_any" else [r for r in live if engine.tier_of(r) == src]
                handles.append(engine.move(movable[: n % 3 + 1], src, dst))
            elif op == "poll" and handles:
                engine.poll(handles[who % len(handles)])
            elif op == "wait" and handles:
                handle = handles.pop(who % len(handles))
                try:
                    blocking(lambda: engine.wait(handle))
                except EngineError:  # the copy failed: its requests stay where they were
                    assert {engine.tier_of(r) for r in handle.request_ids if r in engine._seqs} <= {handle.src}
                    raise
            elif op == "free":
                blocking(lambda: engine.free([rid]))
                kv.pop(rid, None)
            elif op == "stall" and (gate is None or gate.is_set()):
                gate = threading.Event()
                hold_copies(engine, gate.wait)
            elif op == "unstall" and gate is not None:
                gate.set()
            elif op == "fail_copy":
                fail_next_copy(engine)
        except KVAccountingError:
            raise
        except EngineError:  # OutOfKVBlocks, misplaced or in-flight KV, failed copy: refused as a whole
            pass
        check_accounting(engine, names)
        for r in kv:
            if engine.tier_of(r) != IN_FLIGHT:
                assert torch.equal(kv_contents(engine, r), kv[r]), f"{r} in {engine.tier_of(r)}"
    fail_next_copy(engine, disarm=True)
    if gate is not None:
        gate.set()  # a held worker would hang the next example
    for handle in handles:
        try:
            engine.wait(handle)
        except EngineError:
            pass  # an injected failure: the KV stayed where it was
    for r in kv:
        assert torch.equal(kv_contents(engine, r), kv[r]), f"{r} in {engine.tier_of(r)}"
    engine.free(names)
    assert all(engine.kv_blocks_used(t) == 0 for t in tiers)
    assert not engine._tiers.busy and not engine._tiers._in_flight
    for pool in engine._tiers.pools.values():
        pool.allocator.check_empty()


def test_loader_passes_the_host_pool_override(demo_engine_dir):
    from engines.loader import load_engine

    # The manifest's host pool: 2x the device pool's memory by default (here 0.1 GiB).
    assert load_engine(demo_engine_dir, device="cpu").describe().host_blocks == 2 * 1638
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=32, host_kv_blocks=64)
    info = eng.describe()
    assert info.host_blocks == 64 and info.capabilities.can_offload
    eng.close()

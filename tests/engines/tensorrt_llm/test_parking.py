"""Parking (device -> host) and resuming (host -> device) on both flavours: the LLM API's KV connector
into the orchestrator's host pool, and the C++ Executor's own host cache. Same tokens, no block leaked."""
from __future__ import annotations

import time

import pytest

from engines.base import HOST, CapabilityError, EngineError, PrefillRequest


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.002)


def _quiet(e):
    """Every executor-side block returned: nothing running, saving, or held for a hand-off."""
    fake = getattr(e.llm, "executor", e.llm)
    _wait(lambda: fake.idle() and fake.blocks_in_use() == 0)


def test_park_then_resume_continues_the_same_tokens(make_engine, trtllm, flavour, core):
    e = make_engine(flavour=flavour, host_blocks=32)
    prompt = list(range(3, 14))  # 11 tokens: 2 full blocks of 4 and a partial one
    got = [e.prefill([PrefillRequest("a", prompt)]).tokens["a"]]
    got += [e.decode(["a"]).tokens["a"] for _ in range(3)]
    e.wait(e.move(["a"], "cuda:0", HOST))
    # 13 tokens of KV (the last has none yet): 4 blocks, or more where the executor decoded ahead
    # before the abort reached it (the connector saves what it holds; a resume loads what matches)
    assert e.tier_of("a") == HOST and e.kv_blocks_used(HOST) >= 4
    _quiet(e)  # the device blocks went back once the save finished
    h = e.move(["a"], HOST, "cuda:0")
    e.wait(h)
    assert e.tier_of("a") == "cuda:0" and h.seconds is not None
    assert e.kv_blocks_used(HOST) == 0  # loaded back: the host copy is released
    got += [e.decode(["a"]).tokens["a"] for _ in range(4)]
    assert got == trtllm.reference_tokens(prompt, 8)


def test_full_host_pool_fails_the_move_and_leaks_nothing(make_engine, flavour):
    e = make_engine(flavour=flavour, host_blocks=2)
    e.prefill([PrefillRequest("a", list(range(1, 20)))])
    h = e.move(["a"], "cuda:0", HOST)
    with pytest.raises(EngineError, match="host KV pool full"):
        e.wait(h)
    e.free(["a"])
    _quiet(e)
    assert e.kv_blocks_used(HOST) == 0 and e.pool.parked() == ()


@pytest.mark.parametrize("when", ["parked", "saving", "resuming", "running"])
def test_every_exit_path_frees_host_and_device_blocks(make_engine, when, flavour):
    e = make_engine(flavour=flavour, host_blocks=16)
    e.prefill([PrefillRequest("a", list(range(1, 10)), max_new_tokens=16), PrefillRequest("b", [4, 5], max_new_tokens=16)])
    if when in ("parked", "resuming"):
        e.wait(e.move(["a"], "cuda:0", HOST))
    if when == "saving":
        e.move(["a"], "cuda:0", HOST)  # freed before the save is seen
    if when == "resuming":
        e.move(["a"], HOST, "cuda:0")
    e.free(["a", "b"])
    _quiet(e)
    _wait(lambda: e.kv_blocks_used(HOST) == 0)
    assert e.gate.used == 0 and not e.streams.keys() and e.pool.parked() == ()


def test_resume_of_a_request_never_parked_is_refused(make_engine, flavour):
    e = make_engine(flavour=flavour, host_blocks=16)
    e.prefill([PrefillRequest("a", [1, 2])])
    with pytest.raises(EngineError, match="tier"):
        e.move(["a"], HOST, "cuda:0")


def test_without_a_host_pool_moves_are_a_capability_error(make_engine, flavour):
    e = make_engine(flavour=flavour, host_blocks=0)
    assert not e.describe().capabilities.can_offload and e.describe().host_blocks == 0
    e.prefill([PrefillRequest("a", [1, 2])])
    with pytest.raises(CapabilityError, match="no host KV pool"):
        e.move(["a"], "cuda:0", HOST)
    with pytest.raises(CapabilityError):
        e.move(["a"], "cuda:0", "cuda:1")


def test_retention_priorities_mark_the_staged_batch(make_engine, flavour, core):
    from engines.tensorrt_llm import retention

    e = make_engine(flavour=flavour, host_blocks=16)
    e.prefill([PrefillRequest("a", [1, 2, 3])])
    e.wait(e.move(["a"], "cuda:0", HOST))
    e.wait(e.move(["a"], HOST, "cuda:0"))
    kept = [r.honoured_retention for r in core(e.llm).submitted if r.prompt_len > 1]  # not the driver (below)
    # On `main` KV cache manager V2 ("auto" where the model prefers it) ignores retention configs:
    # the adapter turns it off wherever the field exists, so the priorities act.
    assert [(k.token_range_retention_configs[0].priority, k.decode_retention_priority) for k in kept] == \
        [(retention.RUNNING,) * 2, (retention.STAGED,) * 2]
    if flavour == "llm_api":
        assert e.llm.kwargs["kv_cache_config"].use_kv_cache_manager_v2 is False


@pytest.mark.parametrize("end", ["max_seq_len", "max_tokens"])
def test_a_request_that_reached_its_end_in_tensorrt_llm_parks_and_resumes_from_its_buffer(make_engine, trtllm, flavour,
                                                                                          core, end):
    """The executor runs ahead of the orchestrator: a request can reach its max_tokens or max_seq_len
    in TensorRT-LLM (every token buffered, its KV already released) before the orchestrator parks it.
    Parking it must not wait for a save that will never come; its remaining tokens come from the buffer."""
    e = make_engine(flavour=flavour, host_blocks=64, timeout_s=3)
    # max_seq_len 128: TensorRT-LLM ends a 120-token prompt after 8 tokens, or a short one at max_tokens 8
    prompt, cap = (list(range(1, 121)), None) if end == "max_seq_len" else (list(range(1, 30)), 8)
    got = [e.prefill([PrefillRequest("a", prompt, max_new_tokens=cap)]).tokens["a"]]
    _quiet(e)  # ended in the executor: all 8 tokens are buffered, no park order existed
    h = e.move(["a"], "cuda:0", HOST)
    e.wait(h)
    assert e.tier_of("a") == HOST and e.kv_blocks_used(HOST) == 0 and e.gate.used == 0
    e.wait(e.move(["a"], HOST, "cuda:0"))
    got += [e.decode(["a"]).tokens["a"] for _ in range(7)]
    assert got == trtllm.reference_tokens(prompt, 8)
    assert len(core(e.llm).submitted) == 1  # nothing was resubmitted
    e.free(["a"])
    assert not e.streams.keys() and e.pool.parked() == ()


def test_a_park_racing_the_natural_end_never_hangs(make_engine, trtllm, monkeypatch, flavour):
    """The order is left after TensorRT-LLM reported the request finished but before its last output
    reached the stream: the park completes from the buffer once the stream ends."""
    e = make_engine(flavour=flavour, host_blocks=64, timeout_s=3)
    prompt = list(range(1, 121))
    e.prefill([PrefillRequest("a", prompt)])
    _quiet(e)
    stream = e.streams._streams[e._reqs["a"].stream]
    held = []
    while not stream.tokens.empty():  # hold the stream's tail back, as if not yet delivered
        held.append(stream.tokens.get())
    h = e.move(["a"], "cuda:0", HOST)
    assert not e.poll(h)
    for item in held:
        stream.tokens.put(item)
    e.wait(h)
    e.wait(e.move(["a"], HOST, "cuda:0"))
    assert [e.decode(["a"]).tokens["a"] for _ in range(7)] == trtllm.reference_tokens(prompt, 8)[1:]
    assert e.pool.parked() == () and e.kv_blocks_used(HOST) == 0


def test_parking_the_last_running_request_drives_the_iteration_its_save_needs(make_engine, trtllm, core):
    """TensorRT-LLM saves through the connector only in an iteration that forwards a batch, and an
    executor with nothing active blocks on its request queue (the fake copies py_executor.py): the
    park of the last running request waited for the next client request (here: the timeout). A
    one-token request drives that iteration; with another request still running, none is sent."""
    e = make_engine(host_blocks=32, timeout_s=3)
    prompt = list(range(3, 14))
    got = [e.prefill([PrefillRequest("a", prompt, max_new_tokens=20)]).tokens["a"]]
    e.prefill([PrefillRequest("b", [7, 8, 9], max_new_tokens=100)])
    e.wait(e.move(["a"], "cuda:0", HOST))  # "b" runs: its iterations carry the save
    assert [r.prompt_len for r in core(e.llm).submitted] == [11, 3]
    e.wait(e.move(["a"], HOST, "cuda:0"))
    got += [e.decode(["a"]).tokens["a"] for _ in range(3)]
    e.free(["b"])
    e.wait(e.move(["a"], "cuda:0", HOST))  # the last one running: the engine drives the save
    drivers = [r for r in core(e.llm).submitted if r.prompt_len == 1]
    assert len(drivers) == 1 and drivers[0].sampling.max_tokens == 1
    assert core(e.llm).max_running_seen <= e.settings.max_batch_size + 1
    e.wait(e.move(["a"], HOST, "cuda:0"))
    got += [e.decode(["a"]).tokens["a"] for _ in range(4)]
    assert got == trtllm.reference_tokens(prompt, 8)
    e.free(["a"])
    _quiet(e)
    assert e.kv_blocks_used(HOST) == 0 and set(e.streams.keys()) <= {e._driver}


@pytest.mark.parametrize("crowded", [False, True])
def test_the_executor_host_cache_may_drop_a_parked_request_and_resume_recomputes(make_engine, trtllm, core, crowded):
    """The Executor flavour parks by cancel: the request's blocks become reusable cache, kept in the
    host tier while it has room (the fake copies kvCacheManager.cpp). Other requests' blocks compete
    for that tier, and the oldest are dropped: resuming then recomputes them, with the same tokens."""
    e = make_engine(flavour="engine", host_blocks=6)
    fake = core(e.llm)
    prompt = list(range(3, 14))
    got = [e.prefill([PrefillRequest("a", prompt, max_new_tokens=12)]).tokens["a"]]
    got += [e.decode(["a"]).tokens["a"] for _ in range(2)]
    e.wait(e.move(["a"], "cuda:0", HOST))
    _quiet(e)
    if crowded:  # two finished requests' blocks push a's out of the 6-block host tier
        for rid, first in (("b", 40), ("c", 60)):
            e.prefill([PrefillRequest(rid, list(range(first, first + 13)), max_new_tokens=4)])
            e.decode([rid])
            e.free([rid])
            _quiet(e)
        assert fake.reuse_dropped >= 3
    before = fake.reused_tokens
    e.wait(e.move(["a"], HOST, "cuda:0"))
    got += [e.decode(["a"]).tokens["a"] for _ in range(5)]
    assert got == trtllm.reference_tokens(prompt, 8)
    assert fake.reused_tokens - before == (0 if crowded else 12)  # 13 tokens of KV: 3 full blocks, or none
    e.free(["a"])
    _quiet(e)
    assert e.kv_blocks_used(HOST) == 0 and e.pool.parked() == ()

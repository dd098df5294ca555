"""Peer prefetch: context_only prefill on the helper instance, generation_only hand-off to the decode one."""
from __future__ import annotations

import asyncio
import sys
import time

import pytest

from engines.base import CapabilityError, EngineError, PrefillRequest
from engines.tensorrt_llm import host_pool
from engines.tensorrt_llm.api_surface import ENGINE
from engines.tensorrt_llm.host_pool import HostKvPool
from engines.tensorrt_llm.llm_settings import TrtllmSettings, llm_kwargs


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.002)


def test_hand_off_continues_the_same_tokens(make_engine, trtllm, flavour, core):
    e = make_engine(flavour=flavour, peer=True)
    caps = e.describe().capabilities
    assert caps.can_peer_copy and caps.can_overlap_prefill
    assert [d.name for d in e.describe().devices] == ["cuda:0", "cuda:1"]
    prompt = list(range(30, 41))
    h = e.start_prefill([PrefillRequest("a", prompt)], "cuda:1")
    e.wait_any([h])
    first = e.prefill_result(h).tokens["a"]
    assert e.tier_of("a") == "cuda:1"
    sent = core(e.ctx_llm).submitted[0]
    assert sent.disagg.request_type == "context_only" and sent.sampling.max_tokens == 1
    backend = core(e.ctx_llm).kwargs["cache_transceiver_config"].backend
    assert getattr(backend, "name", backend) == "NIXL"  # a string on the LLM API, an enum on the Executor
    m = e.move(["a"], "cuda:1", "cuda:0")
    e.wait(m)
    assert e.tier_of("a") == "cuda:0"
    gen = core(e.llm).submitted[0]
    assert gen.disagg.request_type == "generation_only" and gen.disagg.first_gen_tokens == [first]
    # the context phase's own params, request_type set, as NVIDIA's disaggregated test passes them on:
    # the newer fields (ctx_info_endpoint, which the fake's transceiver needs, ctx_dp_rank) come along
    if flavour != ENGINE:  # the C++ Executor's ContextPhaseParams has four fields only
        assert gen.disagg.ctx_info_endpoint == core(e.ctx_llm).endpoint and gen.disagg.ctx_dp_rank == 0
    rest = [e.decode(["a"]).tokens["a"] for _ in range(4)]
    assert [first, *rest] == trtllm.reference_tokens(prompt, 5)
    _wait(lambda: core(e.ctx_llm).blocks_in_use() == 0)  # the context side let go once the KV was pulled
    e.free(["a"])
    _wait(lambda: core(e.llm).blocks_in_use() == 0)


def test_prefill_on_the_helper_waits_for_the_result(make_engine, flavour):
    e = make_engine(flavour=flavour, peer=True)
    r = e.prefill([PrefillRequest("a", [1, 2, 3])], device="cuda:1")
    assert set(r.tokens) == {"a"} and e.tier_of("a") == "cuda:1"


def test_freeing_before_the_hand_off_releases_nothing_twice(make_engine, flavour):
    e = make_engine(flavour=flavour, peer=True)
    h = e.start_prefill([PrefillRequest("a", [1, 2, 3]), PrefillRequest("b", [4])], "cuda:1")
    e.free(["a"])
    e.wait_any([h])
    assert set(e.prefill_result(h).tokens) == {"b"}
    e.free(["b"])
    assert e.gate.used == 0 and not e.streams.keys()


def test_hand_off_without_a_context_result_is_refused(make_engine, flavour):
    e = make_engine(flavour=flavour, peer=True)
    e.prefill([PrefillRequest("a", [1, 2])])
    with pytest.raises(EngineError, match="tier"):
        e.move(["a"], "cuda:1", "cuda:0")


def test_connector_host_pool_and_peer_prefetch_exclude_each_other(make_engine):
    """TensorRT-LLM's connector refuses generation-only requests, so the engine refuses the pair up front
    (from_engine_dir parks in TensorRT-LLM's own host cache instead: test_build_and_load)."""
    with pytest.raises(CapabilityError, match="generation-only"):
        make_engine(host_blocks=16, peer=True)
    e = make_engine(flavour=ENGINE, host_blocks=16, peer=True)  # no connector on the Executor: both work
    caps = e.describe().capabilities
    assert caps.can_offload and caps.can_peer_copy


def test_the_fake_connector_refuses_generation_only_as_tensorrt_llm_does(trtllm):
    """Why the engine refuses the pair: the message TensorRT-LLM's KvCacheConnectorManager raises."""
    api = sys.modules["tensorrt_llm.llmapi"]
    settings = TrtllmSettings(max_batch_size=2, max_seq_len=64, tokens_per_block=4, host_pool_blocks=8,
                              cache_transceiver_backend="NIXL")
    host_pool.bind(HostKvPool(8, 4))
    llm = api.LLM(**llm_kwargs(api, settings, "fake-model", connector=True, transceiver=True))

    async def run():
        out = llm.generate_async([1, 2], api.SamplingParams(max_tokens=2), streaming=True,
                                 disaggregated_params=api.DisaggregatedParams("generation_only", [3], 1, {}))
        async for _ in out:
            pass

    try:
        with pytest.raises(RuntimeError, match="not supported for generation-only requests"):
            asyncio.run(run())
    finally:
        llm.shutdown()

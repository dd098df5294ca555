"""The 1.2.x C++ Executor behind the LLM-API calls (`executor_llm.ExecutorLLM`), over the fake Executor:
what reaches `ExecutorConfig` and each `Request`, and how responses come back."""
from __future__ import annotations

import asyncio

import pytest

from engines.base import HOST, EngineError, PrefillRequest, SamplingParams
from engines.tensorrt_llm import retention
from engines.tensorrt_llm.api_surface import ENGINE
from engines.tensorrt_llm.executor_llm import NO_END_ID


@pytest.fixture
def engine(make_engine):
    return make_engine(flavour=ENGINE, slots=3, host_blocks=16, peer=True)


def test_executor_config_forms_batches_by_admission(engine, trtllm):
    cfg = engine.llm.executor.config
    assert cfg.max_batch_size == 3 and cfg.max_beam_width == 1 and cfg.enable_chunked_context is False
    assert cfg.scheduler_config.capacity_scheduler_policy is trtllm.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    assert cfg.kv_cache_config.enable_block_reuse and cfg.kv_cache_config.host_cache_size == 16 * 1024
    assert cfg.cache_transceiver_config.backend is trtllm.CacheTransceiverBackendType.NIXL
    # each executor on its own GPU: the decode one on cuda:0, the context (prefetch) one on cuda:1
    assert cfg.parallel_config.device_ids == [0]
    assert engine.ctx_llm.executor.config.parallel_config.device_ids == [1]


def test_requests_stream_with_no_end_id_and_the_role_priority(engine):
    engine.prefill([PrefillRequest("g", [1, 2, 3]),
                    PrefillRequest("s", [4, 5], SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=11))])
    g, s = engine.llm.executor.submitted
    assert g.sampling.max_tokens == engine.describe().model.max_seq_len - 3
    assert g.sampling.top_k == 1 and g.sampling.temperature is None  # greedy
    assert (s.sampling.temperature, s.sampling.top_k, s.sampling.seed) == (0.7, 20, 11)
    assert g.sampling.ignore_eos  # the fake saw end_id == NO_END_ID
    assert NO_END_ID == -1
    assert g.retention.decode_retention_priority == retention.RUNNING


def test_parking_is_cancel_and_resuming_resubmits_the_same_tokens(engine, trtllm):
    prompt = list(range(3, 14))
    got = [engine.prefill([PrefillRequest("a", prompt)]).tokens["a"]]
    got += [engine.decode(["a"]).tokens["a"] for _ in range(2)]
    engine.wait(engine.move(["a"], "cuda:0", HOST))
    first = engine.llm.executor.submitted[0]
    assert first.aborted  # cancel_request: its blocks stay as TensorRT-LLM's reusable cache
    assert engine.kv_blocks_used(HOST) == 4  # 13 tokens of KV, blocks of 4
    engine.wait(engine.move(["a"], HOST, "cuda:0"))
    again = engine.llm.executor.submitted[1]
    assert again.tokens[:len(prompt) + 3] == prompt + got  # prompt + generated: the prefix reuse finds
    assert again.retention.decode_retention_priority == retention.STAGED
    assert all(c.priority >= 30 for c in again.retention.token_range_retention_configs)  # offloaded, not dropped
    got += [engine.decode(["a"]).tokens["a"] for _ in range(3)]
    assert got == trtllm.reference_tokens(prompt, 6)
    assert engine.kv_blocks_used(HOST) == 0


def test_parking_beyond_the_host_cache_fails_clearly(make_engine):
    e = make_engine(flavour=ENGINE, host_blocks=2)
    e.prefill([PrefillRequest("a", list(range(1, 20)))])
    with pytest.raises(EngineError, match="host KV pool full: 5 blocks needed, 2 of 2 free"):
        e.wait(e.move(["a"], "cuda:0", HOST))
    e.free(["a"])
    assert e.kv_blocks_used(HOST) == 0 and e.pool.parked() == ()


def test_the_hand_off_carries_context_phase_params(engine, trtllm):
    h = engine.start_prefill([PrefillRequest("a", [7, 8, 9])], "cuda:1")
    engine.wait_any([h])
    first = engine.prefill_result(h).tokens["a"]
    ctx = engine.ctx_llm.executor.submitted[0]
    assert ctx.disagg.request_type == "context_only" and ctx.sampling.max_tokens == 1
    engine.wait(engine.move(["a"], "cuda:1", "cuda:0"))
    gen = engine.llm.executor.submitted[0]
    assert gen.disagg.request_type == "generation_only" and gen.disagg.first_gen_tokens == [first]
    assert gen.disagg.ctx_request_id == ctx.request_id  # ContextPhaseParams.req_id, round-tripped
    assert [first, engine.decode(["a"]).tokens["a"]] == trtllm.reference_tokens([7, 8, 9], 2)


def test_an_error_response_reaches_the_caller(engine, monkeypatch, trtllm):
    fake = engine.llm.executor
    real = fake._respond

    def failing(response):
        real(trtllm.Response(response.request_id, None, "[TensorRT-LLM][ERROR] out of KV blocks"))

    monkeypatch.setattr(fake, "_respond", failing)
    with pytest.raises(EngineError, match="out of KV blocks"):
        engine.prefill([PrefillRequest("a", [1, 2])])
    assert engine.gate.used == 0 and not engine.streams.keys()


def test_streaming_only(engine):
    async def call():
        engine.llm.generate_async([1], None, streaming=False)

    with pytest.raises(ValueError, match="streams only"):
        asyncio.run(call())

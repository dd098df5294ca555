"""Externally formed batches by admission control, over the fake TensorRT-LLM."""
from __future__ import annotations

import pytest

from engines.base import EngineError, PrefillRequest


def reqs(*specs, max_new_tokens=16):
    return [PrefillRequest(rid, list(prompt), max_new_tokens=max_new_tokens) for rid, prompt in specs]


def test_prefill_and_decode_follow_the_model(make_engine, trtllm, flavour):
    e = make_engine(flavour=flavour)
    prompt = [5, 6, 7, 8, 9]
    first = e.prefill(reqs(("a", prompt))).tokens["a"]
    rest = [e.decode(["a"]).tokens["a"] for _ in range(5)]
    assert [first, *rest] == trtllm.reference_tokens(prompt, 6)
    assert e.tier_of("a") == "cuda:0"


def test_settings_the_orchestrator_needs_reach_llm(make_engine, trtllm):
    e = make_engine(slots=3)
    kw = e.llm.kwargs
    assert kw["max_batch_size"] == 3
    assert kw["enable_chunked_prefill"] is False
    assert kw["scheduler_config"].capacity_scheduler_policy is trtllm.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    assert kw["kv_cache_config"].tokens_per_block == 4
    info = e.describe()
    assert info.backend == "tensorrt_llm" and info.block_size == 4
    assert not info.capabilities.can_form_batches and not info.capabilities.can_chunk_prefill


def test_batch_beyond_the_slots_is_refused_before_anything_runs(make_engine, flavour):
    e = make_engine(flavour=flavour, slots=2)
    e.prefill(reqs(("a", [1, 2]), ("b", [3, 4])))
    with pytest.raises(EngineError, match="max_batch_size=2"):
        e.prefill(reqs(("c", [5, 6])))
    with pytest.raises(EngineError, match="unknown"):
        e.tier_of("c")
    e.free(["a"])  # a slot frees up: the next member of the aligned batch is admitted
    assert e.prefill(reqs(("c", [5, 6]))).tokens["c"] >= 0


def test_executor_never_runs_more_than_the_batch(make_engine, flavour, core):
    e = make_engine(flavour=flavour, slots=3)
    e.prefill(reqs(("a", [1]), ("b", [2, 3]), ("c", [4, 5, 6])))
    for _ in range(4):
        e.decode(["a", "b", "c"])
    assert core(e.llm).max_running_seen <= 3


def test_bad_prompts_are_refused_like_every_engine(make_engine, flavour):
    e = make_engine(flavour=flavour)
    with pytest.raises(EngineError, match="empty prompt"):
        e.prefill(reqs(("a", [])))
    with pytest.raises(EngineError, match="outside"):
        e.prefill(reqs(("a", [999])))
    e.prefill(reqs(("a", [1])))
    with pytest.raises(EngineError, match="already in use"):
        e.prefill(reqs(("a", [1])))


def test_free_aborts_and_returns_every_block(make_engine, flavour, core):
    e = make_engine(flavour=flavour)
    e.prefill(reqs(("a", [1, 2, 3]), ("b", [4, 5])))
    e.decode(["a", "b"])
    e.free(["a", "b", "never-seen"])
    e.free(["a"])  # twice is fine
    _wait(lambda: core(e.llm).idle() and core(e.llm).blocks_in_use() == 0)
    assert e.kv_blocks_used("cuda:0") == 0 and e.gate.used == 0 and not e.streams.keys()


def _wait(cond, timeout=5.0):
    import time

    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.002)


def test_a_failing_submission_frees_the_whole_call(make_engine, monkeypatch, flavour, core):
    e = make_engine(flavour=flavour, slots=4)
    real = e.llm.generate_async
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("executor queue closed")
        return real(*a, **k)

    monkeypatch.setattr(e.llm, "generate_async", flaky)
    with pytest.raises(EngineError, match="executor queue closed"):
        e.prefill(reqs(("a", [1, 2]), ("b", [3, 4]), ("c", [5])))
    assert e.gate.used == 0 and not e.streams.keys()
    for rid in "abc":
        with pytest.raises(EngineError, match="unknown"):
            e.tier_of(rid)
    _wait(lambda: core(e.llm).idle() and core(e.llm).blocks_in_use() == 0)


def test_decode_past_the_end_of_a_stream_is_an_error(make_engine, flavour):
    e = make_engine(flavour=flavour)
    e.prefill(reqs(("a", [1, 2])))
    e.streams.abort(e._reqs["a"].stream)  # TensorRT-LLM ended it on its own
    with pytest.raises(EngineError, match="ended in TensorRT-LLM"):
        for _ in range(200):
            e.decode(["a"])
    e.free(["a"])
    assert e.gate.used == 0


def test_each_request_reserves_its_own_max_tokens_not_max_seq_len(make_engine, trtllm, flavour, core, monkeypatch):
    """GUARANTEED_NO_EVICT reserves KV for prompt + max_tokens on admission (the fake copies
    kvCacheManager.cpp). Submitted with max_tokens = max_seq_len - prompt, each of these requests
    would reserve 32 blocks of a 27-block pool, and the executor would queue them while the
    orchestrator believed they ran (prefill waited for its timeout)."""
    monkeypatch.setattr(trtllm.FakeLLM, "NUM_BLOCKS", 27)
    e = make_engine(flavour=flavour, slots=3, timeout_s=3)
    prompts = {f"r{i}": [5 + i, 6, 7, 8, 9] for i in range(3)}
    first = e.prefill(reqs(*prompts.items(), max_new_tokens=27)).tokens
    assert e.gate.reserved == 3 * 8  # ceil((5 + 27) / 4) each
    assert [r.sampling.max_tokens for r in core(e.llm).submitted] == [27] * 3
    assert core(e.llm).max_running_seen == 3 and core(e.llm).kv_waits == 0
    for rid, p in prompts.items():
        got = [first[rid]] + [e.decode([rid]).tokens[rid] for _ in range(26)]
        assert got == trtllm.reference_tokens(p, 27)


def test_a_batch_whose_kv_does_not_fit_is_refused_before_anything_is_submitted(make_engine, trtllm, flavour, core,
                                                                               monkeypatch):
    monkeypatch.setattr(trtllm.FakeLLM, "NUM_BLOCKS", 24)
    e = make_engine(flavour=flavour, slots=4, timeout_s=3)
    with pytest.raises(EngineError, match="reserve 34 KV blocks .* but 24 of 24 are free"):
        e.prefill(reqs(("a", [1] * 5), ("b", [3] * 5), max_new_tokens=60))  # ceil(65 / 4) = 17 each
    assert core(e.llm).submitted == [] and e.gate.used == 0 and e.gate.reserved == 0
    e.prefill(reqs(("a", [1] * 5), max_new_tokens=60))
    assert e.gate.reserved == 17


def test_the_orchestrator_is_told_one_block_per_slot_less(make_engine, trtllm):
    """It grants prompt + max_tokens - 1 tokens (the last is never fed); TensorRT-LLM reserves one
    token more, one block more at a block boundary: the slack keeps its grants inside the pool."""
    e = make_engine(slots=4)
    assert e.describe().devices[0].kv_blocks == trtllm.FakeLLM.NUM_BLOCKS - 4
    assert e.gate.blocks == trtllm.FakeLLM.NUM_BLOCKS


def test_the_orchestrator_never_leaves_a_request_queued_in_the_executor(make_engine, trtllm, flavour, core,
                                                                        monkeypatch):
    """The whole path: the orchestrator's KV grants and the executor's reservations agree, so
    every request it starts runs at once, and every one ends with the model's tokens."""
    from orchestrator.config import ServeConfig
    from orchestrator.service import Orchestrator

    monkeypatch.setattr(trtllm.FakeLLM, "NUM_BLOCKS", 40)
    e = make_engine(flavour=flavour, slots=8, timeout_s=5)
    orch = Orchestrator(e, ServeConfig(max_batch_size=8, max_queue=64).with_manifest(e.describe().model.max_seq_len))
    prompts = [[3 + i % 7] * (4 + 3 * i) for i in range(12)]
    submitted = [orch.submit(p, max_tokens=9, ignore_eos=True) for p in prompts]
    for _ in range(2_000):
        if all(r.finished for r in submitted):
            break
        orch.step()
    assert all(r.finish_reason.name == "LENGTH" for r in submitted), [r.finish_reason for r in submitted]
    for r, p in zip(submitted, prompts):
        assert r.output_ids == trtllm.reference_tokens(p, 9)
    assert core(e.llm).kv_waits == 0
    assert max(r.prompt_len + r.sampling.max_tokens for r in core(e.llm).submitted) <= max(map(len, prompts)) + 9


def test_a_prompt_over_8192_tokens_is_taken_with_chunked_prefill_off(make_engine, trtllm, monkeypatch):
    """The LLM API refuses a prompt longer than max_num_tokens (default 8,192) when chunked prefill is
    off (llm.py `_check_arguments`; the fake copies it), and every resume resubmits prompt plus
    generated tokens: the adapter raises max_num_tokens to max_seq_len."""
    monkeypatch.setattr(trtllm.FakeLLM, "NUM_BLOCKS", 160)
    e = make_engine(max_seq_len=10_000, block_size=64, slots=2)
    assert e.llm.kwargs["max_num_tokens"] == 10_000
    prompt = [5 + i % 100 for i in range(9_000)]
    first = e.prefill([PrefillRequest("long", prompt, max_new_tokens=3)]).tokens["long"]
    assert [first, e.decode(["long"]).tokens["long"]] == trtllm.reference_tokens(prompt, 2)

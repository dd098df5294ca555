"""The orchestrator on the real torch engine with the demo model: FCFS continuous batching,
stop conditions, cancellation and request validation."""
from __future__ import annotations

import pytest

from engines.base import PrefillRequest, SamplingParams
from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, RequestRejected
from orchestrator.service import Orchestrator
from orchestrator.stream import TokenStream


@pytest.fixture
def engine(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=64)
    yield eng
    eng.close()


def make(engine, **cfg) -> Orchestrator:
    return Orchestrator(engine, ServeConfig(**{"policy": "fcfs", **cfg}))


def run_until_idle(orch: Orchestrator, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not orch.loop.step():
            return
    raise AssertionError("the run loop never went idle")


def alone(engine, prompt, n):
    """Greedy tokens of `prompt` with the engine driven directly, one request in the batch."""
    out = [engine.prefill([PrefillRequest("solo", prompt)]).tokens["solo"]]
    while len(out) < n:
        out.append(engine.decode(["solo"]).tokens["solo"])
    engine.free(["solo"])
    return out


PROMPTS = [[1, 72, 101, 108, 108, 111], [1] + list(range(40, 90)), [1, 50, 51], [1] + list(range(100, 130))]


def test_batched_outputs_equal_solo_runs(engine):
    expected = [alone(engine, p, 12) for p in PROMPTS]
    orch = make(engine)
    streams = [TokenStream() for _ in PROMPTS]
    for p, s in zip(PROMPTS, streams):
        orch.submit(p, max_tokens=12, end_id=0, on_event=s)
    run_until_idle(orch)
    for s, want in zip(streams, expected):
        assert s.result(timeout=1) == want
        assert s.finish_reason is FinishReason.LENGTH
    assert engine.kv_blocks_used("cpu") == 0
    assert orch.ledger.used("cpu") == 0


def test_stop_on_end_id_and_stop_sequence(engine):
    # A prompt whose greedy output has a token at k >= 2 that did not occur before it.
    prompt, ref, k = next((p, r, i) for p in PROMPTS for r in [alone(engine, p, 10)]
                          for i in range(2, 10) if r[i] not in r[:i])
    orch = make(engine)
    s1 = TokenStream()
    orch.submit(prompt, max_tokens=10, end_id=ref[k], on_event=s1)  # output stops before it
    s2 = TokenStream()
    seq = ref[5:7]  # a two-token stop sequence, kept in the output at its first occurrence
    orch.submit(prompt, max_tokens=10, end_id=0, stop_sequences=[seq], on_event=s2)
    run_until_idle(orch)
    assert s1.result(1) == ref[:k] and s1.finish_reason is FinishReason.STOP
    first_end = next(i for i in range(1, 10) if ref[i - 1:i + 1] == seq)
    assert s2.result(1) == ref[:first_end + 1] and s2.finish_reason is FinishReason.STOP
    assert engine.kv_blocks_used("cpu") == 0


def test_admission_waits_for_kv_blocks(engine):
    # 64 blocks of 16 tokens; each request reserves ceil((100 + 60 - 1) / 16) = 10 blocks,
    # so at most 6 run at once and the rest wait their turn in arrival order.
    orch = make(engine)
    streams = [TokenStream() for _ in range(9)]
    for i, s in enumerate(streams):
        orch.submit([1] + [40 + i] * 99, max_tokens=60, end_id=0, on_event=s)
    orch.loop.step()
    assert len(orch.loop.pool.running) == 6 and len(orch.loop.pool.waiting) == 3
    assert orch.ledger.used("cpu") == 60
    run_until_idle(orch)
    assert all(len(s.result(1)) == 60 for s in streams)
    assert engine.kv_blocks_used("cpu") == 0 and orch.ledger.used("cpu") == 0


def test_max_batch_size_bounds_the_running_batch(engine):
    orch = make(engine, max_batch_size=2)
    streams = [TokenStream() for _ in range(5)]
    for s in streams:
        orch.submit([1, 2, 3], max_tokens=4, end_id=0, on_event=s)
    orch.loop.step()
    assert len(orch.loop.pool.running) == 2
    run_until_idle(orch)
    assert [len(s.result(1)) for s in streams] == [4] * 5


def test_cancel_waiting_and_running(engine):
    orch = make(engine, max_batch_size=1)
    a, b = TokenStream(), TokenStream()
    ra = orch.submit(PROMPTS[0], max_tokens=50, end_id=0, on_event=a)
    rb = orch.submit(PROMPTS[1], max_tokens=50, end_id=0, on_event=b)
    orch.loop.step()
    orch.loop.step()
    orch.cancel(rb.id)  # still waiting behind a
    orch.cancel(ra.id)  # running
    orch.cancel("no-such-request")  # ignored
    run_until_idle(orch)
    a.result(1), b.result(1)
    assert a.finish_reason is FinishReason.CANCELLED and len(a.token_ids) == 2
    assert b.finish_reason is FinishReason.CANCELLED and b.token_ids == []
    assert engine.kv_blocks_used("cpu") == 0 and orch.ledger.used("cpu") == 0
    assert orch.snapshot().totals["finished"] == {"cancelled": 2}


def test_a_request_ended_because_its_output_is_complete_counts_as_stopped(engine):
    """The serving layer ends a request whose text matched a stop string: reason stop, KV freed."""
    orch = make(engine)
    s = TokenStream()
    r = orch.submit(PROMPTS[0], max_tokens=50, end_id=0, on_event=s)
    orch.loop.step()
    orch.cancel(r.id, FinishReason.STOP)
    run_until_idle(orch)
    s.result(1)
    assert s.finish_reason is FinishReason.STOP and s.error is None and len(s.token_ids) == 1
    assert orch.snapshot().totals["finished"] == {"stop": 1} and engine.kv_blocks_used("cpu") == 0


def test_seeded_sampling_is_reproducible_through_the_orchestrator(engine):
    orch = make(engine)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    s1, s2, s3 = TokenStream(), TokenStream(), TokenStream()
    orch.submit(PROMPTS[0], max_tokens=16, sampling=sp, end_id=0, on_event=s1)
    orch.submit(PROMPTS[1], max_tokens=16, end_id=0, on_event=s3)  # a different neighbour
    run_until_idle(orch)
    orch.submit(PROMPTS[0], max_tokens=16, sampling=sp, end_id=0, on_event=s2)
    run_until_idle(orch)
    assert s1.result(1) == s2.result(1)


@pytest.mark.parametrize("kwargs, field, words", [
    (dict(prompt_ids=[]), "prompt", "empty"),
    (dict(prompt_ids=[1, 999999]), "prompt", "vocabulary"),
    (dict(prompt_ids=[1] * 300), "prompt", "limit is 255"),
    (dict(prompt_ids=[1, 2], max_tokens=0), "max_tokens", "outside [1, 256]"),
    (dict(prompt_ids=[1, 2], max_tokens=-5), "max_tokens", "outside [1, 256]"),
    (dict(prompt_ids=[1, 2], max_tokens=10_000), "max_tokens", "outside [1, 256]"),
    (dict(prompt_ids=[1] * 200, max_tokens=100), "max_tokens", "exceeds max_seq_len (256)"),
    (dict(prompt_ids=[1, 2], end_id=-1), "end_id", "outside the vocabulary"),
])
def test_bad_requests_are_rejected_with_the_field_and_limit(engine, kwargs, field, words):
    orch = make(engine)
    with pytest.raises(RequestRejected) as e:
        orch.submit(**kwargs)
    assert e.value.field == field and words in str(e.value)


def test_request_needing_more_blocks_than_the_device_has_is_rejected(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=4)
    orch = Orchestrator(eng, ServeConfig())
    with pytest.raises(RequestRejected, match="need 7 KV blocks but the device holds 4"):
        orch.submit([1] * 50, max_tokens=50)


def test_queue_limit(engine):
    orch = make(engine, max_queue=2)
    orch.submit([1, 2], max_tokens=2)
    orch.submit([1, 2], max_tokens=2)
    with pytest.raises(RequestRejected, match="max_queue=2"):
        orch.submit([1, 2], max_tokens=2)
    run_until_idle(orch)
    orch.submit([1, 2], max_tokens=2)  # room again once admitted


def test_threaded_loop_serves_and_stops_cleanly(engine):
    orch = make(engine).start()
    try:
        streams = [TokenStream() for _ in range(6)]
        for i, s in enumerate(streams):
            orch.submit(PROMPTS[i % 4], max_tokens=8, end_id=0, on_event=s)
        assert all(len(s.result(30)) == 8 for s in streams)
        long = TokenStream()
        orch.submit(PROMPTS[0], max_tokens=200, end_id=0, on_event=long)
    finally:
        orch.stop()
    long.result(5)
    assert long.finish_reason is FinishReason.CANCELLED  # shutdown ends in-flight requests
    assert engine.kv_blocks_used("cpu") == 0 and orch.ledger.used("cpu") == 0


def test_iteration_metrics_record_batch_shape_and_alignment(engine):
    orch = make(engine)
    orch.submit([1] * 10, max_tokens=3, end_id=0)
    orch.submit([1] * 40, max_tokens=3, end_id=0)
    run_until_idle(orch)
    history = list(orch.loop.metrics.history)
    first, second = history[0], history[1]
    assert first.prefill_tokens == 50 and first.batch_size == 0  # step 1 only prefills
    # Step 2 decodes both: each feeds its first token, so KV lengths are 11 and 41.
    assert (second.batch_size, second.kv_max, second.kv_mean) == (2, 41, 26.0)
    assert second.alignment == pytest.approx(52 / (2 * 41))
    assert second.device_blocks_used == 1 + 3  # ceil(11/16) + ceil(41/16)
    assert second.host_blocks_used == 0 and second.transfer_bytes == 0 and not second.switch
    summary = orch.snapshot().totals
    assert summary["iterations"] == len(history) == 3 and summary["tokens"] == 6
    assert summary["recent"]["batch_size"] == 2.0


def test_min_tokens_holds_back_the_requests_own_stop_token(engine):
    prompt, ref, k = next((p, r, i) for p in PROMPTS for r in [alone(engine, p, 10)]
                          for i in range(2, 10) if r[i] not in r[:i])
    orch = make(engine)
    short, held = TokenStream(), TokenStream()
    orch.submit(prompt, max_tokens=10, end_id=ref[k], on_event=short)  # stops before ref[k]
    r = orch.submit(prompt, max_tokens=10, end_id=ref[k], sampling=SamplingParams(min_tokens=k + 2), on_event=held)
    assert r.sampling.stop_ids == (ref[k],)  # filled in from the request's own end_id
    run_until_idle(orch)
    assert short.result(1) == ref[:k] and short.finish_reason is FinishReason.STOP
    out = held.result(1)
    assert len(out) >= k + 2 and ref[k] not in out[:k + 2] and out[:k] == ref[:k]


def test_an_engine_that_cannot_shape_logits_refuses_by_name():
    from engines.sim.cost_model import CostModel
    from engines.sim.engine import SimEngine
    from engines.sim.profiles import H100_SXM, OPT_13B
    orch = Orchestrator(SimEngine(CostModel(H100_SXM, OPT_13B), kv_blocks=64, block_size=16, max_seq_len=256),
                        ServeConfig(policy="fcfs"))
    with pytest.raises(RequestRejected) as e:
        orch.submit([1, 2, 3], max_tokens=4, sampling=SamplingParams(frequency_penalty=0.5))
    assert e.value.field == "frequency_penalty" and "does not apply it" in e.value.message
    with pytest.raises(RequestRejected) as e:
        orch.submit([1, 2, 3], max_tokens=4, sampling=SamplingParams(bad_words=((10_000_000,),)))
    assert e.value.field == "bad_words" and "outside the vocabulary" in e.value.message
    with pytest.raises(RequestRejected) as e:
        orch.submit([1, 2, 3], max_tokens=4, sampling=SamplingParams(logprobs=True))
    assert e.value.field == "logprobs" and "log probabilities" in e.value.message


def test_log_probabilities_reach_the_stream_with_their_tokens(engine):
    """Each streamed token comes with its log probability where the request asked, none where it
    did not; the final event carries the last token's."""
    orch = make(engine)
    events = []
    asked = orch.submit([1, 2, 3], max_tokens=5, sampling=SamplingParams(logprobs=True), on_event=events.append,
                        ignore_eos=True)
    plain = orch.submit([1, 2, 3], max_tokens=5, ignore_eos=True)
    run_until_idle(orch)
    assert len(asked.output_logprobs) == len(asked.output_ids) == 5 and not plain.output_logprobs
    streamed = [lp for e in events for lp in e.logprobs]
    assert streamed == asked.output_logprobs and all(len(e.logprobs) == len(e.token_ids) for e in events)
    assert all(lp <= 0 for lp in streamed)

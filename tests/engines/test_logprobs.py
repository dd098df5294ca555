"""Log probabilities of the chosen tokens (`SamplingParams.logprobs`, TensorRT-LLM's return_log_probs),
checked against transformers on the same checkpoint: greedy with a penalty against `generate`'s
processed scores, and a sampled request against the model's own logits over the tokens it chose."""
from __future__ import annotations

import pytest
import torch

from engines.base import PrefillChunk, PrefillRequest, SamplingParams

PROMPT = [5, 17, 33, 9, 60, 17, 5]
STEPS = 10


@pytest.fixture(scope="module")
def engine(float32_engine):
    return float32_engine


def run(engine, params: SamplingParams, chunked: bool, rid: str = "a") -> tuple[list[int], list[float]]:
    """The request's tokens and log probabilities, with a request that did not ask beside it."""
    other = PrefillRequest("plain", [7, 8, 9], SamplingParams())
    if chunked:
        r = PrefillRequest(rid, PROMPT, params)
        engine.mixed_step([], [PrefillChunk(r, 0, 4), PrefillChunk(other, 0, 3)])
        result = engine.mixed_step(["plain"], [PrefillChunk(r, 4, len(PROMPT))])
    else:
        result = engine.prefill([PrefillRequest(rid, PROMPT, params), other])
    assert "plain" not in result.logprobs  # only where asked
    tokens, logprobs = [result.tokens[rid]], [result.logprobs[rid]]
    while len(tokens) < STEPS:
        result = engine.decode([rid, "plain"])
        assert "plain" not in result.logprobs
        tokens.append(result.tokens[rid])
        logprobs.append(result.logprobs[rid])
    engine.free([rid, "plain"])
    return tokens, logprobs


@pytest.mark.parametrize("chunked", [False, True])
def test_greedy_logprobs_equal_transformers_scores(hf, engine, chunked):
    params = SamplingParams(repetition_penalty=1.3, logprobs=True)
    tokens, logprobs = run(engine, params, chunked)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          max_new_tokens=STEPS, do_sample=False, repetition_penalty=1.3, eos_token_id=None,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert tokens == out.sequences[0, len(PROMPT):].tolist()
    want = [score[0].log_softmax(-1)[t].item() for score, t in zip(out.scores, tokens)]
    assert logprobs == pytest.approx(want, abs=1e-4)
    assert all(lp <= 0 for lp in logprobs)


def test_sampled_logprobs_follow_the_temperature(hf, engine):
    """A sampled token's log probability is in the distribution it was drawn from: the logits over
    the temperature (before top-k / top-p)."""
    params = SamplingParams(temperature=0.7, top_k=20, seed=3, logprobs=True)
    tokens, logprobs = run(engine, params, chunked=False, rid="s")
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT + tokens[:-1]])).logits[0, len(PROMPT) - 1:]
    want = (logits / 0.7).log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    assert logprobs == pytest.approx(want, abs=1e-4)

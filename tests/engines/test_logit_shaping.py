"""Penalties, a minimum length and bad words, checked against transformers: the sampler's
`shape_logits` against its logits processors on random logits, and the torch engine's greedy
tokens with them against `generate` on the same checkpoint (prefill, decode and chunked prefill)."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, NoBadWordsLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor)

from engines.base import PrefillChunk, PrefillRequest, SamplingParams
from engines.torch.sampler import shape_logits

PROMPT = [5, 17, 33, 9, 60, 17, 5]
V = 128


def test_shaping_equals_transformers_logits_processors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 3
    tokens = PROMPT + [40, 41, 40]  # 3 generated
    words = ((41, 40, 99), (7,), (40, 12))  # 99 banned after "41 40"; 7 always; 12 after "40"
    params = SamplingParams(repetition_penalty=1.3, min_tokens=5, stop_ids=(2, 3), bad_words=words)
    ours = shape_logits(logits, params, tokens, len(PROMPT))
    ids = torch.tensor([tokens])
    want = logits[None].clone()
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, want)
    want = MinNewTokensLengthLogitsProcessor(len(PROMPT), 5, [2, 3])(ids, want)
    want = NoBadWordsLogitsProcessor([list(w) for w in words], eos_token_id=None)(ids, want)
    assert torch.equal(ours, want[0])
    assert ours[99] == ours[7] == ours[12] == ours[2] == float("-inf")
    # Past min_tokens the stop tokens are free again.
    later = shape_logits(logits, params, tokens + [1, 1], len(PROMPT))
    assert later[2] == logits[2]


def test_presence_and_frequency_count_generated_tokens_only():
    logits = torch.zeros(V)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = shape_logits(logits, params, PROMPT + [40, 41, 40], len(PROMPT))
    # OpenAI's definition: logit - presence * [count > 0] - frequency * count, over the output.
    assert out[40].item() == pytest.approx(-(0.5 + 2 * 0.25)) and out[41].item() == pytest.approx(-(0.5 + 0.25))
    assert out[5].item() == 0.0  # in the prompt only


@pytest.fixture(scope="module")
def engine(float32_engine):
    return float32_engine


def reference(hf, params: SamplingParams, steps: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          max_new_tokens=steps, do_sample=False, repetition_penalty=params.repetition_penalty,
                          min_new_tokens=params.min_tokens or None, eos_token_id=eos, pad_token_id=eos,
                          bad_words_ids=[list(w) for w in params.bad_words] or None)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("chunked", [False, True])
def test_greedy_tokens_with_shaping_equal_transformers_generate(hf, engine, chunked):
    steps = 12
    plain = reference(hf, SamplingParams(), steps, eos=V - 1)
    # Ban what the unshaped model would say first and second, penalise repeats, and hold the
    # model's would-be second token (as a stop token) back until 4 tokens are out.
    params = SamplingParams(repetition_penalty=1.5, min_tokens=4, stop_ids=(plain[1],),
                            bad_words=((plain[0],), (plain[2], plain[3])))
    want = reference(hf, params, steps, eos=plain[1])
    if chunked:
        r = PrefillRequest("a", PROMPT, params)
        engine.mixed_step([], [PrefillChunk(r, 0, 4)])
        first = engine.mixed_step([], [PrefillChunk(r, 4, len(PROMPT))]).tokens["a"]
    else:
        first = engine.prefill([PrefillRequest("a", PROMPT, params)]).tokens["a"]
    got = [first]
    while len(got) < len(want):
        got.append(engine.decode(["a"]).tokens["a"])
    engine.free(["a"])
    assert got == want and got != plain[:len(got)]

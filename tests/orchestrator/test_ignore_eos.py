"""ignore_eos on Orchestrator.submit: the model's EOS no longer ends a request, so it runs to
max_tokens (a benchmark's fixed output length); an explicit end_id still ends it."""
from __future__ import annotations

import pytest

from engines.base import SamplingParams
from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, RequestRejected
from orchestrator.service import Orchestrator
from serving.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "Hello"
"""The demo model (random weights) answers this prompt greedily with one token, then its EOS (257)."""


@pytest.fixture(scope="module")
def orch(demo_engine_dir):
    engine = load_engine(demo_engine_dir, device="cpu", kv_blocks=48, host_kv_blocks=200)
    yield Orchestrator(engine, ServeConfig(max_batch_size=4, kmin=2))
    engine.close()


@pytest.fixture(scope="module")
def prompt(demo_engine_dir):
    return load_tokenizer(demo_engine_dir).encode(PROMPT).ids


def run(orch, *args, **kw):
    r = orch.submit(*args, **kw)
    while orch.step():
        pass
    return r


def test_eos_ends_a_request_unless_ignored(orch, prompt):
    eos = orch.info.model.eos_token_ids
    plain = run(orch, prompt, 12, GREEDY)
    assert plain.finish_reason is FinishReason.STOP and len(plain.output_ids) == 1  # the EOS is dropped
    ignored = run(orch, prompt, 12, GREEDY, ignore_eos=True)
    assert ignored.finish_reason is FinishReason.LENGTH and len(ignored.output_ids) == 12
    assert ignored.output_ids[0] == plain.output_ids[0] and ignored.output_ids[1] in eos  # generated as any token


def test_an_end_id_still_ends_a_request_that_ignores_eos(orch, prompt):
    ids = run(orch, prompt, 12, GREEDY, ignore_eos=True).output_ids
    at = next(i for i, t in enumerate(ids) if i > 1 and t not in ids[:i])  # a token first generated after the EOS
    r = run(orch, prompt, 12, GREEDY, end_id=ids[at], ignore_eos=True)
    assert r.finish_reason is FinishReason.STOP and r.output_ids == ids[:at]


def test_ignore_eos_must_be_a_boolean(orch, prompt):
    with pytest.raises(RequestRejected) as e:
        orch.submit(prompt, 4, GREEDY, ignore_eos="yes")
    assert e.value.field == "ignore_eos" and "expected True or False" in e.value.message

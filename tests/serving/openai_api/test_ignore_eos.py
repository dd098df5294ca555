"""`ignore_eos` (vLLM's extension, sent by `vllm bench serve`): the answer goes on past the
model's EOS to max_tokens; anything but a boolean is refused naming the field."""
from __future__ import annotations

import json

import httpx
import pytest

from serving.openai_api.errors import ApiError
from serving.openai_api.protocol import Limits, parse

MODEL = "demo"
PROMPT = "Hello"
"""The demo model answers this prompt greedily with one token, then its EOS."""
LIMITS = Limits(max_tokens=256, max_seq_len=256)


@pytest.fixture
def http(served):
    _, server = served
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def complete(http, **body) -> dict:
    r = http.post("/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                        **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_parsed_as_a_boolean_off_by_default():
    def completion(**body):
        return parse({"model": "m", "prompt": "Hi", **body}, "completion", "m", LIMITS)

    assert completion().ignore_eos is False and completion(ignore_eos=None).ignore_eos is False
    assert completion(ignore_eos=True).ignore_eos is True
    chat = parse({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}, "chat", "m",
                 LIMITS)
    assert chat.ignore_eos is True


@pytest.mark.parametrize("value, words", [("true", "the string 'true'"), (1, "the number 1"), ([], "a list")])
def test_a_non_boolean_is_refused(value, words):
    with pytest.raises(ApiError) as e:
        parse({"model": "m", "prompt": "Hi", "ignore_eos": value}, "completion", "m", LIMITS)
    assert e.value.status == 400 and e.value.param == "ignore_eos"
    assert e.value.message == f"ignore_eos: expected true or false, got {words}"


def test_the_answer_runs_past_eos_to_max_tokens(http):
    plain = complete(http)
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] == 1
    off = complete(http, ignore_eos=False)
    assert (off["choices"], off["usage"]) == (plain["choices"], plain["usage"])  # false: as if absent
    ignored = complete(http, ignore_eos=True)
    assert ignored["choices"][0]["finish_reason"] == "length" and ignored["usage"]["completion_tokens"] == 12
    assert ignored["choices"][0]["text"].startswith(plain["choices"][0]["text"])


def test_streamed_as_vllm_bench_serve_sends_it(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events = []
    with http.stream("POST", "/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_refused_over_http_naming_the_field(http):
    r = http.post("/completions", json={"model": MODEL, "prompt": PROMPT, "ignore_eos": "yes"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "ignore_eos" and "expected true or false" in r.json()["error"]["message"]


def test_what_vllm_bench_serve_sends_is_accepted():
    """Its completions payload: repetition_penalty 1.0 (vLLM's off value) and logprobs null beside
    ignore_eos; a repetition_penalty other than 1 is applied."""
    body = {"model": "m", "prompt": "Hi", "repetition_penalty": 1.0, "max_tokens": 8, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0}
    g = parse(body, "completion", "m", LIMITS)
    assert g.ignore_eos and g.include_usage and g.sampling.greedy
    assert g.sampling.repetition_penalty == 1.0 and not g.sampling.shapes_logits
    assert parse({**body, "repetition_penalty": 1.2}, "completion", "m", LIMITS).sampling.repetition_penalty == 1.2

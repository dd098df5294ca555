"""Request bodies -> checked Generations, without a server: defaults, the forms a prompt and a
message may take, and what maps onto what."""
from __future__ import annotations

import pytest

from serving.openai_api.errors import ApiError
from serving.openai_api.protocol import Limits, parse

LIMITS = Limits(max_tokens=256, max_seq_len=256)


def chat(**body):
    return parse({"model": "m", "messages": [{"role": "user", "content": "Hi"}], **body}, "chat", "m", LIMITS)


def completion(**body):
    return parse({"model": "m", "prompt": "Hi", **body}, "completion", "m", LIMITS)


def test_defaults_are_openais_sampling_and_the_servers_max_tokens():
    g = chat()
    assert g.sampling.temperature == 1.0 and g.sampling.top_p == 1.0 and g.sampling.seed is None
    assert g.max_tokens is None and g.stop == () and not g.stream and not g.include_usage
    assert g.messages == ({"role": "user", "content": "Hi"},)


def test_sampling_fields():
    g = completion(temperature=0.5, top_p=0.9, top_k=40, seed=3, stop="\n", max_tokens=7, stream=True,
                   stream_options={"include_usage": True})
    s = g.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.5, 0.9, 40, 3)
    assert g.stop == ("\n",) and g.max_tokens == 7 and g.stream and g.include_usage
    assert completion(top_p=0).sampling.greedy  # only the most likely token is left
    assert completion(top_k=-1).sampling.top_k == 0  # vLLM's "no limit"


def test_prompt_forms():
    assert completion(prompt=["one"]).prompt == "one"
    assert completion(prompt=[5, 6, 7]).prompt_ids == (5, 6, 7)
    assert completion(prompt=[[5, 6]]).prompt_ids == (5, 6)


def test_message_forms():
    g = chat(messages=[{"role": "developer", "content": "Be brief."},
                       {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                        "name": "ann"},
                       {"role": "assistant", "content": None}])
    assert g.messages == ({"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "a\nb", "name": "ann"},
                          {"role": "assistant", "content": ""})


def test_max_completion_tokens_is_named_in_its_errors():
    g = chat(max_completion_tokens=5, max_tokens=9)
    assert g.max_tokens == 5 and g.max_tokens_param == "max_completion_tokens"
    with pytest.raises(ApiError) as e:
        chat(max_completion_tokens=500)
    assert e.value.param == "max_completion_tokens" and "500 is outside [1, 256]" in e.value.message


def test_booleans_are_not_numbers():
    for field in ("max_tokens", "temperature", "seed", "n"):
        with pytest.raises(ApiError) as e:
            chat(**{field: True})
        assert e.value.param == field and "the boolean true" in e.value.message


def test_sizes_are_checked_before_anything_is_tokenized():
    with pytest.raises(ApiError) as e:
        chat(messages=[{"role": "user", "content": "x" * 5000}, {"role": "user", "content": "y" * 5000}])
    assert e.value.param == "messages" and e.value.code == "context_length_exceeded"
    with pytest.raises(ApiError) as e:
        completion(prompt=list(range(300)))
    assert e.value.param == "prompt" and "300 tokens; the limit is 255" in e.value.message

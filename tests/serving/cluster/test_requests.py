"""Dynamo's preprocessed request -> the orchestrator's submit arguments (serving/cluster/requests.py)."""
from __future__ import annotations

import pytest

from serving.cluster.requests import DEFAULT_TEMPERATURE, BadRequest, submission

EOS = frozenset({2})


def test_a_frontend_request_maps_field_by_field():
    sub = submission({"token_ids": [1, 5, 9], "stop_conditions": {"max_tokens": 7, "min_tokens": 2,
                                                                   "stop_token_ids_hidden": [2, 11]},
                      "sampling_options": {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": 3,
                                           "frequency_penalty": 0.1, "presence_penalty": 0.2,
                                           "repetition_penalty": 1.1}}, EOS)
    assert sub.prompt_ids == (1, 5, 9) and sub.max_tokens == 7 and not sub.ignore_eos
    s = sub.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.min_tokens) == (0.5, 0.9, 40, 3, 2)
    assert (s.frequency_penalty, s.presence_penalty, s.repetition_penalty) == (0.1, 0.2, 1.1)
    # the model's EOS is the engine's own stop; another hidden stop token becomes a stop sequence
    assert sub.stop_sequences == ((11,),)


def test_defaults_sample_as_openai_does_and_length_falls_back_to_the_context():
    sub = submission({"token_ids": [1, 2, 3]}, EOS)
    assert sub.sampling.temperature == DEFAULT_TEMPERATURE and sub.max_tokens is None
    assert sub.expected_kv_len(4096) == 4096
    assert submission({"token_ids": [1] * 100, "stop_conditions": {"max_tokens": 28}}, EOS).expected_kv_len(4096) == 128


def test_top_p_zero_is_greedy_and_ignore_eos_passes_through():
    sub = submission({"token_ids": [1], "sampling_options": {"top_p": 0.0, "temperature": 0.8},
                      "stop_conditions": {"ignore_eos": True, "stop_token_ids_visible": [7]}}, EOS)
    assert sub.sampling.temperature == 0.0 and sub.sampling.top_p == 1.0
    assert sub.ignore_eos and sub.stop_sequences == ((7,),)


@pytest.mark.parametrize("request_, field", [
    ({"token_ids": [1], "sampling_options": {"n": 2}}, "n"),
    ({"token_ids": [1], "sampling_options": {"use_beam_search": True}}, "use_beam_search"),
    ({"token_ids": [1], "sampling_options": {"guided_decoding": {"json": {}}}}, "guided_decoding"),
    ({"token_ids": [1], "output_options": {"logprobs": 2}}, "logprobs"),
    ({"token_ids": [1], "sampling_options": {"temperature": "hot"}}, "temperature"),
    ({"token_ids": [1], "sampling_options": {"temperature": float("nan")}}, "temperature"),
    ({"token_ids": [1], "sampling_options": {"top_p": 1.5}}, "top_p"),
    ({"token_ids": [1], "sampling_options": {"seed": -1}}, "seed"),
    ({"token_ids": [1], "stop_conditions": {"max_tokens": 1.5}}, "max_tokens"),
    ({"token_ids": [1], "stop_conditions": {"ignore_eos": "yes"}}, "ignore_eos"),
    ({"token_ids": [1], "stop_conditions": {"stop_token_ids_hidden": ["x"]}}, "stop_token_ids_hidden"),
    ({"token_ids": "abc"}, "token_ids"),
    ({"token_ids": [1], "sampling_options": [1]}, "sampling_options"),
])
def test_what_the_orchestrator_cannot_do_is_refused_by_name(request_, field):
    with pytest.raises(BadRequest) as e:
        submission(request_, EOS)
    assert e.value.field == field and str(e.value).startswith(field)

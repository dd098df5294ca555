"""TensorRT-LLM's Triton interfaces -> aligned_llm's, on numpy arrays shaped as NVIDIA's clients
send them (triton_backend/inflight_batcher_llm/client/end_to_end_grpc_client.py and
inflight_batcher_llm_client.py): what is honoured, what is refused by name, how answers are
shaped, and that every tensor those clients send is declared by our models of the same name."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from orchestrator.core import RequestRejected
from serving.trtllm_front import (count_outputs, logprob_outputs, text_outputs, text_request, token_outputs,
                                  token_request, upstream_error)

REPO = Path(__file__).resolve().parents[2] / "model_repo"


def e2e_client_inputs(prompt="What is ML?", **extra):
    """What end_to_end_grpc_client.py's prepare_inputs always sends ([1, 1] each), plus extras."""
    inputs = {"text_input": np.array([[prompt.encode()]], dtype=object), "max_tokens": np.array([[100]], dtype=np.int32),
              "stream": np.array([[False]]), "beam_width": np.array([[1]], dtype=np.int32),
              "temperature": np.array([[1.0]], dtype=np.float32), "exclude_input_in_output": np.array([[False]])}
    inputs.update(extra)
    return inputs


def ifb_client_inputs(ids=(1, 2, 3), **extra):
    """What inflight_batcher_llm_client.py's prepare_inputs always sends."""
    inputs = {"input_ids": np.array([list(ids)], dtype=np.int32), "input_lengths": np.array([[len(ids)]], dtype=np.int32),
              "request_output_len": np.array([[16]], dtype=np.int32), "beam_width": np.array([[1]], dtype=np.int32),
              "temperature": np.array([[1.0]], dtype=np.float32), "streaming": np.array([[False]]),
              "end_id": np.array([[2]], dtype=np.int32), "pad_id": np.array([[2]], dtype=np.int32),
              "runtime_top_k": np.array([[1]], dtype=np.int32), "runtime_top_p": np.array([[0.0]], dtype=np.float32)}
    inputs.update(extra)
    return inputs


def test_the_e2e_clients_defaults_map_to_a_sampled_request_that_echoes_the_prompt():
    front = text_request(e2e_client_inputs())
    assert front.echo and not front.stream
    assert set(front.inner) == {"text_input", "max_tokens", "stream", "temperature"}
    assert text_outputs(front, " Machine learning.")["text_output"].tolist() == [[b"What is ML? Machine learning."]]
    # Streaming answers carry only the new text; exclude_input_in_output drops the echo.
    assert not text_request(e2e_client_inputs(stream=np.array([[True]]))).echo
    assert not text_request(e2e_client_inputs(exclude_input_in_output=np.array([[True]]))).echo


def test_the_readmes_empty_word_lists_and_both_seed_names_are_taken():
    front = text_request(e2e_client_inputs(bad_words=np.array([[b""]], dtype=object),
                                           stop_words=np.array([[b""]], dtype=object),
                                           random_seed=np.array([[7]], dtype=np.uint64)))
    assert "stop_words" not in front.inner and front.inner["seed"].tolist() == [[7]]
    front = text_request(e2e_client_inputs(stop_words=np.array([[b"\n\n", b"END"]], dtype=object),
                                           seed=np.array([[9]], dtype=np.uint64), top_p=np.array([[0.0]], dtype=np.float32)))
    assert front.inner["stop_words"].tolist() == [[b"\n\n", b"END"]] and front.inner["seed"].tolist() == [[9]]
    assert "top_p" not in front.inner  # TensorRT-LLM reads top_p <= 0 as "not set"


@pytest.mark.parametrize("name, value, words", [
    ("beam_width", np.array([[2]], dtype=np.int32), "beam search is not supported"),
    ("num_return_sequences", np.array([[3]], dtype=np.int32), "one sequence per request"),
    ("return_generation_logits", np.array([[True]]), "generation logits"),
    ("return_perf_metrics", np.array([[True]]), "perf metrics"),
    ("lora_task_id", np.array([[1]], dtype=np.uint64), "LoRA"),
    ("guided_decoding_guide_type", np.array([[b"json"]], dtype=object), "guided decoding"),
])
def test_what_the_engine_cannot_honour_is_refused_by_name(name, value, words):
    with pytest.raises(RequestRejected) as e:
        text_request(e2e_client_inputs(**{name: value}))
    assert e.value.field == name and words in e.value.message


def test_penalties_min_length_and_bad_words_are_forwarded():
    front = text_request(e2e_client_inputs(repetition_penalty=np.array([[1.2]], dtype=np.float32),
                                           presence_penalty=np.array([[0.5]], dtype=np.float32),
                                           min_length=np.array([[4]], dtype=np.int32),
                                           bad_words=np.array([[b"nope", b"never"]], dtype=object)))
    assert front.inner["repetition_penalty"].tolist() == [[pytest.approx(1.2)]]
    assert front.inner["presence_penalty"].tolist() == [[0.5]] and front.inner["min_tokens"].tolist() == [[4]]
    assert front.inner["bad_words"].tolist() == [[b"nope", b"never"]]
    words = np.array([[[13, 50, -1], [1, 2, -1]]], dtype=np.int32)
    front = token_request(ifb_client_inputs(bad_words_list=words, frequency_penalty=np.array([[0.3]], dtype=np.float32)))
    assert front.inner["bad_words_list"].tolist() == [[[13, 50, -1], [1, 2, -1]]]
    assert front.inner["frequency_penalty"].tolist() == [[pytest.approx(0.3)]]


def test_return_log_probs_is_forwarded_and_answered_in_the_upstream_shapes():

    front = token_request(ifb_client_inputs(return_log_probs=np.array([[True]])))
    assert front.logprobs and front.inner["return_log_probs"].tolist() == [[True]]
    assert front.inner_outputs[-1] == "output_log_probs"
    assert not text_request(e2e_client_inputs(return_log_probs=np.array([[False]]))).logprobs
    out = logprob_outputs([-0.5, -1.25], -2.0)
    assert out["output_log_probs"].shape == (1, 1, 2) and out["cum_log_probs"].tolist() == [[-2.0]]


def test_token_counts_count_the_echoed_prompt_as_upstream_does():
    flags = dict(return_num_input_tokens=np.array([[True]]), return_num_output_tokens=np.array([[True]]))
    echoed = text_request(e2e_client_inputs(**flags))
    assert echoed.echo and echoed.inner_outputs[-1] == "num_input_tokens"
    assert {k: v.tolist() for k, v in count_outputs(echoed, 7, 3).items()} == \
        {"num_input_tokens": [[7]], "num_output_tokens": [[10]]}
    streamed = text_request(e2e_client_inputs(stream=np.array([[True]]), return_num_output_tokens=np.array([[True]])))
    assert count_outputs(streamed, 7, 3) == {"num_output_tokens": np.array([[3]], dtype=np.int32)}
    assert count_outputs(text_request(e2e_client_inputs()), 7, 3) == {}


def test_neutral_values_of_unsupported_settings_pass():
    front = text_request(e2e_client_inputs(num_return_sequences=np.array([[1]], dtype=np.int32),
                                           return_log_probs=np.array([[False]]),
                                           repetition_penalty=np.array([[1.0]], dtype=np.float32),
                                           length_penalty=np.array([[1.5]], dtype=np.float32)))  # beam search only
    assert not front.stream


def test_the_in_flight_batcher_clients_defaults_map_to_greedy_token_ids():
    front = token_request(ifb_client_inputs(ids=(5, 6, 7, 8), input_lengths=np.array([[3]], dtype=np.int32)))
    assert front.inner["input_ids"].tolist() == [[5, 6, 7]]  # input_lengths cuts the ids
    assert front.inner["max_tokens"].tolist() == [[16]] and front.inner["top_k"].tolist() == [[1]]
    assert "top_p" not in front.inner and front.inner["end_id"].tolist() == [[2]]
    out = token_outputs(front, [40, 41])
    # Non-streaming: prompt + generated ids, read as output_ids[0][0] and sequence_length[0][0].
    assert out["output_ids"].shape == (1, 1, 5) and out["output_ids"][0][0].tolist() == [5, 6, 7, 40, 41]
    assert out["sequence_length"].tolist() == [[5]]
    streaming = token_request(ifb_client_inputs(streaming=np.array([[True]])))
    assert token_outputs(streaming, [40])["output_ids"].tolist() == [[[40]]]


def test_token_inputs_are_checked_and_errors_use_the_clients_names():
    with pytest.raises(RequestRejected, match="outside") as e:
        token_request(ifb_client_inputs(input_lengths=np.array([[9]], dtype=np.int32)))
    assert e.value.field == "input_lengths"
    with pytest.raises(RequestRejected) as e:
        token_request({k: v for k, v in ifb_client_inputs().items() if k != "request_output_len"})
    assert e.value.field == "request_output_len"
    assert upstream_error("max_tokens: 9999 is outside [1, 256]", tokens=True) == "request_output_len: 9999 is outside [1, 256]"
    assert upstream_error("max_tokens: 9999 is outside [1, 256]", tokens=False) == "max_tokens: 9999 is outside [1, 256]"


def declared(model: str) -> dict[str, tuple[str, bool]]:
    """name -> (data type, optional) of the inputs model_repo/<model>/config.pbtxt declares."""
    text = (REPO / model / "config.pbtxt").read_text()
    inputs = text[text.index("input ["):text.index("output [")]
    out = {}
    for line in inputs.splitlines():
        m = re.search(r'name: "(\w+)", data_type: (\w+)', line)
        if m:
            out[m[1]] = (m[2], "optional: true" in line)
    return out


E2E_SENT = {  # end_to_end_grpc_client.py: tensor -> Triton type (always sent, or with a flag)
    "text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "stream": "TYPE_BOOL", "beam_width": "TYPE_INT32",
    "temperature": "TYPE_FP32", "num_return_sequences": "TYPE_INT32", "bad_words": "TYPE_STRING",
    "stop_words": "TYPE_STRING", "repetition_penalty": "TYPE_FP32", "presence_penalty": "TYPE_FP32",
    "frequency_penalty": "TYPE_FP32", "return_log_probs": "TYPE_BOOL", "return_context_logits": "TYPE_BOOL",
    "return_generation_logits": "TYPE_BOOL", "embedding_bias_words": "TYPE_STRING",
    "embedding_bias_weights": "TYPE_FP32", "end_id": "TYPE_INT32", "pad_id": "TYPE_INT32",
    "exclude_input_in_output": "TYPE_BOOL", "lora_task_id": "TYPE_UINT64", "return_perf_metrics": "TYPE_BOOL",
    "guided_decoding_guide_type": "TYPE_STRING", "guided_decoding_guide": "TYPE_STRING",
}
IFB_SENT = {  # inflight_batcher_llm_client.py
    "input_ids": "TYPE_INT32", "input_lengths": "TYPE_INT32", "request_output_len": "TYPE_INT32",
    "beam_width": "TYPE_INT32", "temperature": "TYPE_FP32", "streaming": "TYPE_BOOL", "end_id": "TYPE_INT32",
    "pad_id": "TYPE_INT32", "runtime_top_k": "TYPE_INT32", "runtime_top_p": "TYPE_FP32",
    "return_num_input_tokens": "TYPE_BOOL", "return_num_output_tokens": "TYPE_BOOL",
    "num_return_sequences": "TYPE_INT32", "repetition_penalty": "TYPE_FP32", "presence_penalty": "TYPE_FP32",
    "frequency_penalty": "TYPE_FP32", "return_log_probs": "TYPE_BOOL", "exclude_input_in_output": "TYPE_BOOL",
    "return_perf_metrics": "TYPE_BOOL", "stop": "TYPE_BOOL", "lora_task_id": "TYPE_UINT64",
}


@pytest.mark.parametrize("model, sent, required", [
    ("ensemble", E2E_SENT, {"text_input", "max_tokens"}),
    ("tensorrt_llm_bls", E2E_SENT, {"text_input", "max_tokens"}),
    ("tensorrt_llm", IFB_SENT, {"input_lengths", "request_output_len"}),
])
def test_every_tensor_nvidias_clients_send_is_declared_as_they_send_it(model, sent, required):
    # Triton refuses a request with an input its model does not declare, or of another type.
    ours = declared(model)
    for name, dtype in sent.items():
        assert name in ours and ours[name][0] == dtype, name
    assert {n for n, (_, optional) in ours.items() if not optional} == required

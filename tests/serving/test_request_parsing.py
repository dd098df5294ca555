"""Input tensors as Triton hands them to model.py -> checked parameters or a named error."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator.core import RequestRejected
from serving.request_parsing import parse_request


def req(**kw):
    base = {"text_input": np.array([[b"hello"]], dtype=object), "max_tokens": np.array([[8]], dtype=np.int32)}
    base.update({k: v for k, v in kw.items() if v is not None})
    return {k: v for k, v in base.items() if not (isinstance(v, str) and v == "DROP")}


def test_defaults_are_greedy_and_not_streaming():
    p = parse_request(req(), max_tokens_limit=100)
    assert p.text == "hello" and p.max_tokens == 8 and not p.stream
    assert p.sampling.greedy and p.sampling.seed is None and p.end_id is None and p.stop_words == ()


def test_all_optional_inputs():
    p = parse_request(req(stream=np.array([[True]]), temperature=np.array([[0.7]], dtype=np.float32),
                          top_k=np.array([[20]], dtype=np.int32), top_p=np.array([[0.9]], dtype=np.float32),
                          seed=np.array([[42]], dtype=np.uint64), end_id=np.array([[2]], dtype=np.int32),
                          stop_words=np.array([[b"\n\n", b"END", b""]], dtype=object)), 100)
    assert p.stream and p.sampling.temperature == pytest.approx(0.7) and p.sampling.top_k == 20
    assert p.sampling.top_p == pytest.approx(0.9) and p.sampling.seed == 42 and p.end_id == 2
    assert p.stop_words == ("\n\n", "END")


@pytest.mark.parametrize("inputs, field, words", [
    (req(text_input="DROP"), "text_input", "missing"),
    (req(text_input=np.array([[b""]], dtype=object)), "text_input", "empty"),
    (req(text_input=np.array([[b"\xff\xfe"]], dtype=object)), "text_input", "UTF-8"),
    (req(text_input=np.array([[b"a", b"b"]], dtype=object)), "text_input", "one value"),
    (req(max_tokens="DROP"), "max_tokens", "missing"),
    (req(max_tokens=np.array([[0]], dtype=np.int32)), "max_tokens", "outside [1, 100]"),
    (req(max_tokens=np.array([[-3]], dtype=np.int32)), "max_tokens", "outside [1, 100]"),
    (req(max_tokens=np.array([[101]], dtype=np.int32)), "max_tokens", "outside [1, 100]"),
    (req(temperature=np.array([[-1.0]], dtype=np.float32)), "temperature", ">= 0"),
    (req(temperature=np.array([[np.nan]], dtype=np.float32)), "temperature", "finite"),
    (req(top_p=np.array([[0.0]], dtype=np.float32)), "top_p", "(0, 1]"),
    (req(top_p=np.array([[1.5]], dtype=np.float32)), "top_p", "(0, 1]"),
    (req(top_k=np.array([[-1]], dtype=np.int32)), "top_k", "outside [0"),
    (req(end_id=np.array([[-2]], dtype=np.int32)), "end_id", "outside [0"),
])
def test_bad_inputs_name_the_field_and_limit(inputs, field, words):
    with pytest.raises(RequestRejected) as e:
        parse_request(inputs, max_tokens_limit=100)
    assert e.value.field == field and str(e.value).startswith(field + ":") and words in str(e.value)


def test_token_ids_instead_of_text_and_token_stop_words():
    # TensorRT-LLM's word-list form: [2, n], the words' ids one after another, then end offsets.
    words = np.array([[[13, 13, 50, 7, -1], [2, 3, -1, -1, -1]]], dtype=np.int32)
    p = parse_request({"input_ids": np.array([[5, 6, 7]], dtype=np.int32), "max_tokens": np.array([[4]], dtype=np.int32),
                       "stop_words_list": words}, 100, vocab_size=100)
    assert p.prompt_ids == (5, 6, 7) and p.text == "" and p.stop_sequences == ((13, 13), (50,))


@pytest.mark.parametrize("inputs, field, words", [
    ({"input_ids": np.array([[5, 100]], dtype=np.int32)}, "input_ids", "token id 100 is outside [0, 100)"),
    ({"input_ids": np.array([[-1]], dtype=np.int32)}, "input_ids", "token id -1"),
    ({"input_ids": np.zeros((1, 0), dtype=np.int32)}, "input_ids", "empty"),
    ({"input_ids": np.array([[1.5]], dtype=np.float32)}, "input_ids", "INT32"),
    ({"input_ids": np.array([[5]], dtype=np.int32), "stop_words_list": np.array([[1, 2], [3, -1]], dtype=np.int32)},
     "stop_words_list", "within the 2 ids"),
    ({"input_ids": np.array([[5]], dtype=np.int32), "stop_words_list": np.array([1, 2, 3], dtype=np.int32)},
     "stop_words_list", "[2, n]"),
])
def test_token_inputs_are_checked(inputs, field, words):
    with pytest.raises(RequestRejected) as e:
        parse_request({"max_tokens": np.array([[4]], dtype=np.int32), **inputs}, 100, vocab_size=100)
    assert e.value.field == field and words in e.value.message


def test_penalties_min_tokens_and_bad_words():
    p = parse_request(req(repetition_penalty=np.array([[1.3]], dtype=np.float32),
                          presence_penalty=np.array([[0.5]], dtype=np.float32),
                          frequency_penalty=np.array([[-0.25]], dtype=np.float32),
                          min_length=np.array([[3]], dtype=np.int32),
                          bad_words=np.array([[b"nope", b""]], dtype=object),
                          bad_words_list=np.array([[[13, 50, -1], [1, 2, -1]]], dtype=np.int32)), 100)
    s = p.sampling
    assert s.repetition_penalty == pytest.approx(1.3) and s.presence_penalty == 0.5 and s.frequency_penalty == -0.25
    assert s.min_tokens == 3 and s.bad_words == ((13,), (50,)) and p.bad_words == ("nope",)


@pytest.mark.parametrize("name, value, words", [
    ("repetition_penalty", np.array([[0.0]], dtype=np.float32), "> 0"),
    ("presence_penalty", np.array([[np.inf]], dtype=np.float32), "finite"),
    ("min_tokens", np.array([[101]], dtype=np.int32), "outside [0, 100]"),
])
def test_shaping_inputs_are_checked(name, value, words):
    with pytest.raises(RequestRejected) as e:
        parse_request(req(**{name: value}), 100)
    assert e.value.field == name and words in e.value.message


def test_a_prompt_over_max_prompt_bytes_is_refused_by_its_size_before_it_is_decoded():
    huge = np.array([[b"\xff" * 300_001]], dtype=object)  # not even UTF-8: the size is looked at first
    with pytest.raises(RequestRejected) as e:
        parse_request(req(text_input=huge), 100, max_prompt_bytes=300_000)
    assert e.value.field == "text_input"
    assert "300001 bytes is over max_prompt_bytes (300000" in e.value.message
    ok = parse_request(req(text_input=np.array([["é" * 150_000]], dtype=object)), 100, max_prompt_bytes=300_000)
    assert len(ok.text) == 150_000


def test_max_prompt_bytes_comes_from_the_tokenizers_longest_token(smollm2_engine_dir):
    """SmolLM2's longest token is 80 spaces and a newline: a text over 81 bytes a token cannot fit."""
    from serving.tokenizer import load_tokenizer, max_prompt_bytes, max_token_bytes

    tokenizer = load_tokenizer(smollm2_engine_dir)
    assert max_token_bytes(tokenizer) == 81
    assert max_prompt_bytes(tokenizer, 2048) == 165_888 and max_prompt_bytes(tokenizer, 2048, 1000) == 1000
    for text in ((" " * 80 + "\n") * 10, "Hello, world! " * 50, "日本語のテキスト" * 30, "x" * 5000):
        ids = tokenizer.encode(text, add_special_tokens=False).ids  # what the limit relies on:
        assert len(text.encode()) <= 81 * len(ids)                  # no token covers more than 81 bytes

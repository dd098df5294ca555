"""Property-based fuzz of both request parsers (issue 18): whatever a client sends, the answer is
a request within the limits or the project's own refusal naming the field, never another
exception. The OpenAI side takes any JSON value (huge and negative integers, NaN and the
infinities, lone surrogates that JSON's \\u escapes can carry); the Triton side any numpy input
(other dtypes and shapes than declared, empty arrays, UINT64 seeds over 2**63, INT32's minimum,
bytes that are not UTF-8). Derandomized: the same examples on every run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.core import RequestRejected
from serving.openai_api.errors import ApiError
from serving.openai_api.protocol import FIELDS, HARMLESS, MAX_TOP_K, UNSUPPORTED, Limits, parse
from serving.request_parsing import SEED_RANGE, WRAP_HINT, parse_request

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MODEL = "demo"
LIMITS = Limits(max_tokens=64, max_seq_len=256, max_prompt_bytes=2048)

# ---- values -----------------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, 10**400]
ints = st.integers() | st.sampled_from(EDGE_INTS)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e-300, 2.0, 1e308])
surrogates = st.sampled_from(["\ud800", "\udfff", "a\udc00b"])
texts = st.text(max_size=20) | surrogates | st.sampled_from(["", "text", "user", "system", "assistant", "tool"])
json_scalars = st.none() | st.booleans() | ints | floats | texts
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=12)

# ---- the OpenAI API ---------------------------------------------------------------------------

OK = {"chat": {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]},
      "completion": {"model": MODEL, "prompt": "hello"}}
NAMES = sorted(set().union(*FIELDS.values(), HARMLESS, *UNSUPPORTED.values()) | {"nonsense", "\ud800"})
plausible = {  # values near the edges of each field, beside any JSON value
    "messages": st.lists(st.fixed_dictionaries({"role": texts, "content": json_values},
                                               optional={"name": json_values, "x": json_values}), max_size=3),
    "prompt": json_values | st.lists(ints, max_size=4) | st.text(min_size=2000, max_size=2100),
    "stop": st.lists(texts, max_size=20),
    "stream_options": st.dictionaries(st.sampled_from(["include_usage", "x"]), json_values, max_size=2),
}


@st.composite
def openai_bodies(draw, kind):
    """A valid body with some fields replaced, added or removed."""
    body = dict(OK[kind])
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=5, unique=True)):
        if name in body and draw(st.booleans()):
            del body[name]
        else:
            body[name] = draw(plausible.get(name, json_values) | json_values)
    return body


def _generation_respects_limits(g) -> None:
    s = g.sampling  # a SamplingParams: its own checks passed
    assert g.max_tokens is None or 1 <= g.max_tokens <= LIMITS.max_tokens
    assert 0 <= s.top_k <= MAX_TOP_K and 0 <= s.min_tokens <= LIMITS.max_tokens
    assert s.seed is None or 0 <= s.seed < 2**63
    for word in g.stop:
        word.encode("utf-8")
    if g.prompt is not None:
        assert 0 < len(g.prompt.encode("utf-8")) <= LIMITS.prompt_bytes
    if g.prompt_ids is not None:
        assert 0 < len(g.prompt_ids) < LIMITS.max_seq_len and all(type(t) is int for t in g.prompt_ids)
    assert sum(len(m["content"].encode("utf-8")) for m in g.messages) <= LIMITS.prompt_bytes
    for m in g.messages:
        m.get("name", "").encode("utf-8")


def _refusal_names_the_field(e: ApiError, body: dict) -> None:
    assert 400 <= e.status < 500
    assert e.param, e.message  # every refusal of an object body names a field
    assert e.message.startswith(e.param.split("[")[0]), (e.param, e.message)
    json.dumps(e.body(), ensure_ascii=False).encode("utf-8")  # the answer can be sent


@pytest.mark.parametrize("kind", ["chat", "completion"])
@FUZZ
@given(data=st.data())
def test_openai_parser_answers_any_body_with_a_generation_or_a_named_refusal(kind, data):
    body = data.draw(openai_bodies(kind))
    try:
        g = parse(body, kind, MODEL, LIMITS)
    except ApiError as e:
        _refusal_names_the_field(e, body)
    else:
        _generation_respects_limits(g)


@FUZZ
@given(body=json_values)
def test_openai_parser_answers_any_json_value(body):
    for kind in ("chat", "completion"):
        try:
            parse(body, kind, MODEL, LIMITS)
        except ApiError as e:
            assert 400 <= e.status < 500 and (e.param or not isinstance(body, dict))


words = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)


@st.composite
def valid_openai(draw, kind):
    """A body the API must accept, and what it asked for."""
    body = dict(OK[kind])
    body.update(draw(st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(1, LIMITS.max_tokens),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True),
        "top_k": st.integers(-1, MAX_TOP_K),
        "seed": st.integers(0, 2**63 - 1),
        "min_tokens": st.integers(0, LIMITS.max_tokens),
        "stop": st.lists(words, max_size=4),
        "stream": st.booleans(),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0, 100, exclude_min=True),
    })))
    text = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200))
    if kind == "chat":
        body["messages"] = [{"role": draw(st.sampled_from(["system", "user", "assistant"])), "content": text}]
    else:
        body["prompt"] = text
    return body


@pytest.mark.parametrize("kind", ["chat", "completion"])
@FUZZ
@given(data=st.data())
def test_valid_openai_bodies_are_accepted_and_keep_their_values(kind, data):
    body = data.draw(valid_openai(kind))
    g = parse(body, kind, MODEL, LIMITS)
    s = g.sampling
    assert g.max_tokens == body.get("max_tokens") and g.stream == body.get("stream", False)
    assert g.stop == tuple(body.get("stop", ()))
    assert (s.seed, s.min_tokens, s.top_k) == (body.get("seed"), body.get("min_tokens", 0), max(body.get("top_k", 0), 0))
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (
        body.get("presence_penalty", 0), body.get("frequency_penalty", 0), body.get("repetition_penalty", 1))
    assert (s.temperature, s.top_p) == (body.get("temperature", 1.0), body.get("top_p", 1.0))
    if kind == "chat":
        assert g.messages == tuple(body["messages"])
    else:
        assert g.prompt == body["prompt"]


@pytest.mark.parametrize("body, param, words", [  # what the fuzz found: each was an exception other than ApiError
    ({"temperature": 10**400}, "temperature", "outside [0, 2]"),  # OverflowError in math.isfinite
    ({"frequency_penalty": -10**400}, "frequency_penalty", "outside [-2, 2]"),
    ({"top_k": 2**64}, "top_k", f"outside [-1, {MAX_TOP_K}]"),  # the sampler's torch.tensor overflowed
    ({"min_tokens": 2**63}, "min_tokens", "largest max_tokens (64)"),
    ({"prompt": "a\ud800"}, "prompt", "lone surrogate"),  # the tokenizer's TypeError
    ({"stop": ["\udfff"]}, "stop[0]", "lone surrogate"),
    ({"\ud800": 1}, "'\\ud800'", "unrecognized"),  # an answer that could not be encoded as UTF-8
    ({"": 1}, "''", "unrecognized"),  # the message began ": unrecognized"
])
def test_what_the_fuzz_found_is_refused_by_name(body, param, words):
    with pytest.raises(ApiError) as e:
        parse({**OK["completion"], **body}, "completion", MODEL, LIMITS)
    assert e.value.param == param and e.value.message.startswith(param) and words in e.value.message
    json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")


def test_a_lone_surrogate_in_a_message_is_refused_by_name():
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x", "name": "\udc00"}]}
    with pytest.raises(ApiError) as e:
        parse(body, "chat", MODEL, LIMITS)
    assert e.value.param == "messages[0].name" and "lone surrogate" in e.value.message


# ---- Triton (aligned_llm's input tensors) -----------------------------------------------------

MAX_TOKENS, VOCAB, PROMPT_BYTES = 64, 100, 2048
TRITON_NAMES = ["text_input", "input_ids", "max_tokens", "stream", "temperature", "top_k", "top_p", "seed", "end_id",
                "stop_words", "stop_words_list", "bad_words", "bad_words_list", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "min_tokens", "min_length", "return_log_probs"]
SHAPES = [(1, 1), (1,), (), (0,), (1, 0), (1, 2), (2, 1), (1, 2, 3), (2, 3)]


@st.composite
def arrays(draw):
    """Any of the dtypes Triton has (and str), any small shape, values at the edges."""
    shape = draw(st.sampled_from(SHAPES))
    n = int(np.prod(shape))
    kind = draw(st.sampled_from(["int32", "int64", "uint64", "float32", "float64", "bool", "bytes", "str"]))
    if kind == "bytes":
        values = draw(st.lists(st.binary(max_size=12) | st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"ok"]),
                               min_size=n, max_size=n))
        return np.array(values, dtype=object).reshape(shape)
    if kind == "str":
        return np.array(draw(st.lists(texts, min_size=n, max_size=n)), dtype=object).reshape(shape)
    dtype = np.dtype(kind)
    if kind == "bool":
        elements = st.booleans()
    elif dtype.kind == "f":
        elements = st.floats(width=32 if kind == "float32" else 64, allow_nan=True, allow_infinity=True)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(int(info.min), int(info.max)) | st.sampled_from(
            [int(info.min), int(info.max), 0, 1, 2**31 - 1, int(info.max) // 2 + 1] if kind != "int32"
            else [int(info.min), int(info.max), 0, 1, -1])
    return np.array(draw(st.lists(elements, min_size=n, max_size=n)), dtype=dtype).reshape(shape)


@st.composite
def triton_inputs(draw):
    inputs = {"text_input": np.array([[b"hello"]], dtype=object), "max_tokens": np.array([[8]], dtype=np.int32)}
    for name in draw(st.lists(st.sampled_from(TRITON_NAMES), max_size=5, unique=True)):
        if name in inputs and draw(st.booleans()):
            del inputs[name]
        else:
            inputs[name] = draw(arrays())
    return inputs


def _parse(inputs):
    return parse_request(inputs, MAX_TOKENS, VOCAB, PROMPT_BYTES)


@FUZZ
@given(inputs=triton_inputs())
def test_triton_parser_answers_any_tensors_with_params_or_a_named_refusal(inputs):
    try:
        p = _parse(inputs)
    except RequestRejected as e:
        assert e.field in inputs or e.field in ("text_input", "max_tokens"), e  # the input, or a missing one
        assert str(e).startswith(f"{e.field}: ")
        str(e).encode("utf-8")  # Triton sends it as the error message
    else:
        s = p.sampling
        assert 1 <= p.max_tokens <= MAX_TOKENS and isinstance(p.stream, bool)
        assert (p.text and len(p.text.encode("utf-8")) <= PROMPT_BYTES) or p.prompt_ids
        assert all(0 <= t < VOCAB for t in p.prompt_ids)
        assert s.seed is None or 0 <= s.seed < SEED_RANGE
        assert 0 <= s.min_tokens <= MAX_TOKENS and s.top_k >= 0
        assert all(w.encode("utf-8") for w in p.stop_words + p.bad_words)


@st.composite
def valid_triton(draw):
    """Inputs as a TensorRT-LLM client sends them, all within the limits."""
    inputs = {"text_input": np.array([[draw(words).encode()]], dtype=object),
              "max_tokens": np.array([[draw(st.integers(1, MAX_TOKENS))]], dtype=np.int32)}
    optional = {
        "stream": (st.booleans(), bool), "temperature": (st.floats(0, 2, width=32), np.float32),
        "top_k": (st.integers(0, 2**31 - 1), np.int32), "top_p": (st.floats(0, 1, width=32, exclude_min=True), np.float32),
        "seed": (st.integers(0, 2**64 - 1), np.uint64), "end_id": (st.integers(0, 2**31 - 1), np.int32),
        "min_tokens": (st.integers(0, MAX_TOKENS), np.int32),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
        values, dtype = optional[name]
        inputs[name] = np.array([[draw(values)]], dtype=dtype)
    return inputs


@FUZZ
@given(inputs=valid_triton())
def test_valid_triton_inputs_are_accepted_and_keep_their_values(inputs):
    p = _parse(inputs)
    one = {k: v.reshape(-1)[0] for k, v in inputs.items()}
    assert p.text.encode() == one["text_input"] and p.max_tokens == one["max_tokens"]
    assert p.stream == bool(one.get("stream", False)) and p.end_id == one.get("end_id")
    s = p.sampling
    assert s.temperature == one.get("temperature", 0.0) and s.top_p == one.get("top_p", 1.0)
    assert s.top_k == one.get("top_k", 0) and s.min_tokens == one.get("min_tokens", 0)
    assert s.seed == (None if "seed" not in one else int(one["seed"]) % SEED_RANGE)


def _inputs(**kw):
    return {"text_input": np.array([[b"hello"]], dtype=object), "max_tokens": np.array([[8]], dtype=np.int32), **kw}


@pytest.mark.parametrize("seed, used", [(0, 0), (2**63 - 1, 2**63 - 1), (2**63, 0), (2**63 + 5, 5),
                                        (2**64 - 1, 2**63 - 1)])
def test_the_whole_declared_uint64_seed_range_is_taken(seed, used):
    """seed is UINT64 in every model's config; the engines take [0, 2**63): the top half is used as
    seed - 2**63, deterministically (was: refused)."""
    assert _parse(_inputs(seed=np.array([[seed]], dtype=np.uint64))).sampling.seed == used


def test_a_wrapped_int32_max_tokens_says_how_it_came_about():
    """Triton's HTTP front end turns "max_tokens": 2147483648 into INT32 -2147483648."""
    with pytest.raises(RequestRejected) as e:
        _parse(_inputs(max_tokens=np.array([[-2**31]], dtype=np.int32)))
    assert str(e.value) == f"max_tokens: -2147483648 is outside [1, {MAX_TOKENS}]{WRAP_HINT}"


@pytest.mark.parametrize("name, value, words", [  # what the fuzz found: each was another exception
    ("temperature", np.array([[b"hot"]], dtype=object), "expected a number (FP32), got bytes b'hot'"),  # ValueError
    ("top_p", np.array([["0.5"]], dtype=object), "expected a number (FP32), got str '0.5'"),  # was taken as 0.5
    ("repetition_penalty", np.array([[b"1"]], dtype=object), "expected a number (FP32)"),
    ("text_input", np.array([["a\ud800"]], dtype=object), "not valid Unicode"),  # UnicodeEncodeError
    ("stream", np.array([[b"yes"]], dtype=object), "expected true or false (BOOL)"),  # was taken as true
    ("max_tokens", np.array([[b"12"]], dtype=object), "expected an integer, got bytes b'12'"),  # was taken as 12
])
def test_what_the_fuzz_found_on_triton_is_refused_by_name(name, value, words):
    with pytest.raises(RequestRejected) as e:
        _parse(_inputs(**{name: value}))
    assert e.value.field == name and words in str(e.value)

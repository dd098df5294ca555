"""Turn the input tensors of one Triton request into checked generation parameters.

Works on plain numpy arrays so it is tested without a server. Every error (`RequestRejected`,
as the orchestrator raises for limits it checks) names the input tensor and the limit, and is sent back to the
client as a Triton error response. Any dtype or shape is answered so, not only the declared ones
(tests/serving/test_parser_fuzz.py).

Two things Triton's front end does before the model sees a value are made explicit here:
- `seed` is declared UINT64, but the engines' generators take seeds in [0, 2**63): a seed in
  [2**63, 2**64) is used as `seed - 2**63` (SEED_RANGE), so the whole declared range is accepted
  and the same seed always samples the same tokens (seed and seed + 2**63 sample alike);
- over HTTP, a JSON number over 2**31 - 1 for an INT32 input wraps around to a negative value,
  so a negative value's message says how it may have come about (WRAP_HINT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from engines.base import SamplingParams
from orchestrator.core import RequestRejected

SEED_RANGE = 2**63
"""Seeds the engines take: [0, 2**63). A UINT64 seed at or over it is used modulo it."""
WRAP_HINT = ("; a JSON number over 2**31 - 1 wraps around to a negative one in Triton's INT32 conversion "
             "(HTTP generate)")
"""Added to the message of a negative INT32 value that should have been positive."""


@dataclass(frozen=True)
class GenerateParams:
    """One request's parameters, in the orchestrator's terms."""

    text: str
    """The prompt's text ("" where the client sent token ids)."""
    max_tokens: int
    stream: bool
    sampling: SamplingParams
    end_id: int | None
    stop_words: tuple[str, ...]
    """Matched on the generated text (serving/stop_strings.py), not on token ids: a word that
    tokenizes differently after other text still stops the output."""
    prompt_ids: tuple[int, ...] = ()
    """The prompt as token ids, where the client sent `input_ids` instead of text."""
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    """Token-id stop sequences (`stop_words_list`, TensorRT-LLM's [2, n] form), kept in the output."""
    bad_words: tuple[str, ...] = ()
    """Words never generated, as text (`bad_words`); the model tokenizes them into
    `sampling.bad_words` beside the token-id ones of `bad_words_list`."""


def scalar(inputs: Mapping[str, np.ndarray], name: str):
    """The one value of input `name` (None when it was not sent)."""
    arr = inputs.get(name)
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size != 1:
        raise RequestRejected(name, f"expected one value, got {flat.size}")
    return flat[0]


def _text(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestRejected(name, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestRejected(name, f"not valid Unicode ({e.reason} at character {e.start})") from None
        return str(value)
    raise RequestRejected(name, f"expected a string (BYTES), got {_kind(value)}")


def _int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RequestRejected(name, f"expected an integer, got {_kind(value)}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        hint = WRAP_HINT if v < 0 <= lo and isinstance(value, np.int32) else ""
        raise RequestRejected(name, f"{v} is outside [{lo}, {hi if hi is not None else 'inf'}]{hint}")
    return v


def _float(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RequestRejected(name, f"expected a number (FP32), got {_kind(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer past float's range
        return math.inf if value > 0 else -math.inf


def _bool(value, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise RequestRejected(name, f"expected true or false (BOOL), got {_kind(value)}")


def _kind(value) -> str:
    """A value as an error message shows it: short, and sendable as UTF-8."""
    if isinstance(value, (bytes, np.bytes_, str)):
        shown = repr(value[:40]) + ("..." if len(value) > 40 else "")
        return f"{type(value).__name__} {shown}"
    return f"{type(value).__name__} {str(value)[:40]}"


def parse_request(inputs: Mapping[str, np.ndarray], max_tokens_limit: int, vocab_size: int | None = None,
                  max_prompt_bytes: int | None = None) -> GenerateParams:
    """Check the tensors of one request (names as in TensorRT-LLM's Triton ensemble). The prompt is
    `text_input`, or `input_ids` (token ids, each in [0, vocab_size)) where that is sent instead.
    A text prompt over `max_prompt_bytes` is refused before anything decodes or tokenizes it."""
    text, prompt_ids = "", ()
    if inputs.get("input_ids") is not None and inputs.get("text_input") is None:
        prompt_ids = _token_ids(inputs["input_ids"], "input_ids", vocab_size)
    else:
        raw = scalar(inputs, "text_input")
        if raw is None:
            raise RequestRejected("text_input", "required input is missing (send text_input, or input_ids)")
        size = len(raw) if isinstance(raw, (bytes, np.bytes_)) else len(str(raw).encode("utf-8", "surrogatepass"))
        if max_prompt_bytes is not None and size > max_prompt_bytes:
            raise RequestRejected("text_input", f"{size} bytes is over max_prompt_bytes ({max_prompt_bytes}: more "
                                  "than the model's max_seq_len tokens can hold); shorten the prompt")
        text = _text(raw, "text_input")
        if not text:
            raise RequestRejected("text_input", "the prompt is empty; send at least one character")

    raw = scalar(inputs, "max_tokens")
    if raw is None:
        raise RequestRejected("max_tokens", "required input is missing")
    max_tokens = _int(raw, "max_tokens", 1, max_tokens_limit)

    stream = scalar(inputs, "stream")
    stream = False if stream is None else _bool(stream, "stream")
    temperature = scalar(inputs, "temperature")
    if temperature is not None:
        temperature = _float(temperature, "temperature")
        if not math.isfinite(temperature) or temperature < 0:
            raise RequestRejected("temperature", f"{temperature} must be a finite number >= 0 (0 = greedy)")
    top_k = scalar(inputs, "top_k")
    top_k = 0 if top_k is None else _int(top_k, "top_k", 0)
    top_p = scalar(inputs, "top_p")
    if top_p is not None:
        top_p = _float(top_p, "top_p")
        if not (0.0 < top_p <= 1.0):
            raise RequestRejected("top_p", f"{top_p} is outside (0, 1]")
    seed = scalar(inputs, "seed")
    seed = None if seed is None else _int(seed, "seed", 0, 2**64 - 1) % SEED_RANGE
    end_id = scalar(inputs, "end_id")
    end_id = None if end_id is None else _int(end_id, "end_id", 0)

    stop_words: tuple[str, ...] = ()
    if inputs.get("stop_words") is not None:
        words = [_text(w, "stop_words") for w in np.asarray(inputs["stop_words"]).reshape(-1)]
        stop_words = tuple(w for w in words if w)

    shaping = _shaping(inputs, max_tokens_limit)
    sampling = SamplingParams(
        temperature=0.0 if temperature is None else temperature,
        top_k=top_k,
        top_p=1.0 if top_p is None else top_p,
        seed=seed,
        **shaping,
    )
    stop_sequences = _words_list(inputs["stop_words_list"], "stop_words_list") if inputs.get("stop_words_list") is not None else ()
    bad_words: tuple[str, ...] = ()
    if inputs.get("bad_words") is not None:
        bad_words = tuple(w for w in (_text(x, "bad_words") for x in np.asarray(inputs["bad_words"]).reshape(-1)) if w)
    return GenerateParams(text, max_tokens, stream,
                          sampling, end_id, stop_words, prompt_ids, stop_sequences, bad_words)


def _shaping(inputs: Mapping[str, np.ndarray], max_tokens_limit: int) -> dict:
    """The penalties, min_tokens (TensorRT-LLM's older name: min_length) and token-id bad words
    (`bad_words_list`, the [2, n] form), as SamplingParams fields."""
    out: dict = {}
    value = scalar(inputs, "repetition_penalty")
    if value is not None:
        value = _float(value, "repetition_penalty")
        if not (math.isfinite(value) and value > 0):
            raise RequestRejected("repetition_penalty", f"{value} must be a finite number > 0 (1 = off)")
        out["repetition_penalty"] = value
    for name in ("presence_penalty", "frequency_penalty"):
        value = scalar(inputs, name)
        if value is not None:
            value = _float(value, name)
            if not math.isfinite(value):
                raise RequestRejected(name, f"{value} must be a finite number (0 = off)")
            out[name] = value
    for name in ("min_tokens", "min_length"):
        value = scalar(inputs, name)
        if value is not None:
            out["min_tokens"] = _int(value, name, 0, max_tokens_limit)
    if inputs.get("bad_words_list") is not None:
        out["bad_words"] = _words_list(inputs["bad_words_list"], "bad_words_list")
    value = scalar(inputs, "return_log_probs")
    if value is not None:
        out["logprobs"] = _bool(value, "return_log_probs")
    return out


def _words_list(arr: np.ndarray, name: str) -> tuple[tuple[int, ...], ...]:
    """TensorRT-LLM's word list (tensorrt_llm_bls/1/lib/triton_decoder.py, `_to_word_list_format`):
    [2, n] int32, row 0 every word's token ids one after another, row 1 each word's end offset
    into row 0, both padded with -1 (a leading batch dimension of 1 is allowed)."""
    a = np.asarray(arr)
    if a.dtype.kind not in "iu" or a.ndim < 2 or a.shape[-2] != 2 or (a.ndim == 3 and a.shape[0] != 1) or a.ndim > 3:
        raise RequestRejected(name, f"expected INT32 [2, n] (ids, end offsets), got {a.dtype} {list(a.shape)}")
    ids, ends = a.reshape(2, -1)
    ends = [int(e) for e in ends if e >= 0]
    if any(b >= e for b, e in zip([0] + ends, ends)) or (ends and ends[-1] > ids.size):
        raise RequestRejected(name, f"end offsets {ends} must increase, within the {ids.size} ids")
    words = tuple(tuple(int(t) for t in ids[b:e]) for b, e in zip([0] + ends, ends))
    if any(t < 0 for w in words for t in w):
        raise RequestRejected(name, "a word has a negative token id")
    return words


def _token_ids(arr: np.ndarray, name: str, vocab_size: int | None) -> tuple[int, ...]:
    a = np.asarray(arr)
    if a.dtype.kind not in "iu":
        raise RequestRejected(name, f"expected integer token ids (INT32), got {a.dtype}")
    flat = a.reshape(-1)
    if not flat.size:
        raise RequestRejected(name, "the prompt is empty; send at least one token id")
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        raise RequestRejected(name, f"token id {bad} is outside [0, {vocab_size if vocab_size is not None else 'inf'})")
    return tuple(int(x) for x in flat)

"""Turn the input tensors of one Triton request into checked generation parameters.

Works on plain numpy arrays so it is tested without a server. Every error (`RequestRejected`,
as the orchestrator raises for limits it checks) names the input tensor and the limit, and is sent back to the
client as a Triton error response.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from engines.base import SamplingParams
from orchestrator.core import RequestRejected


@dataclass(frozen=True)
class GenerateParams:
    """One request's parameters, in the orchestrator's terms."""

    text: str
    max_tokens: int
    stream: bool
    sampling: SamplingParams
    end_id: int | None
    stop_words: tuple[str, ...]
    """Matched on the generated text (serving/stop_strings.py), not on token ids: a word that
    tokenizes differently after other text still stops the output."""


def _scalar(inputs: Mapping[str, np.ndarray], name: str):
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
        return value
    raise RequestRejected(name, f"expected a string (BYTES), got {type(value).__name__}")


def _int(value, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise RequestRejected(name, f"expected an integer, got {value}")
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise RequestRejected(name, f"expected an integer, got {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise RequestRejected(name, f"{v} is outside [{lo}, {hi if hi is not None else 'inf'}]")
    return v


def parse_request(inputs: Mapping[str, np.ndarray], max_tokens_limit: int) -> GenerateParams:
    """Check the tensors of one request (names as in TensorRT-LLM's Triton ensemble)."""
    raw = _scalar(inputs, "text_input")
    if raw is None:
        raise RequestRejected("text_input", "required input is missing")
    text = _text(raw, "text_input")
    if not text:
        raise RequestRejected("text_input", "the prompt is empty; send at least one character")

    raw = _scalar(inputs, "max_tokens")
    if raw is None:
        raise RequestRejected("max_tokens", "required input is missing")
    max_tokens = _int(raw, "max_tokens", 1, max_tokens_limit)

    stream = _scalar(inputs, "stream")
    temperature = _scalar(inputs, "temperature")
    if temperature is not None:
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise RequestRejected("temperature", f"{temperature} must be a finite number >= 0 (0 = greedy)")
    top_k = _scalar(inputs, "top_k")
    top_k = 0 if top_k is None else _int(top_k, "top_k", 0)
    top_p = _scalar(inputs, "top_p")
    if top_p is not None:
        top_p = float(top_p)
        if not (0.0 < top_p <= 1.0):
            raise RequestRejected("top_p", f"{top_p} is outside (0, 1]")
    seed = _scalar(inputs, "seed")
    seed = None if seed is None else _int(seed, "seed", 0, 2**63 - 1)
    end_id = _scalar(inputs, "end_id")
    end_id = None if end_id is None else _int(end_id, "end_id", 0)

    stop_words: tuple[str, ...] = ()
    if inputs.get("stop_words") is not None:
        words = [_text(w, "stop_words") for w in np.asarray(inputs["stop_words"]).reshape(-1)]
        stop_words = tuple(w for w in words if w)

    sampling = SamplingParams(
        temperature=0.0 if temperature is None else temperature,
        top_k=top_k,
        top_p=1.0 if top_p is None else top_p,
        seed=seed,
    )
    return GenerateParams(text, max_tokens, bool(stream) if stream is not None else False,
                          sampling, end_id, stop_words)

"""Dynamo's preprocessed request (tokens in) as the orchestrator's submit arguments.

Dynamo's frontend applies the chat template, tokenizes, and sends each worker a dict:
`token_ids`, `stop_conditions` (max_tokens, min_tokens, ignore_eos, stop_token_ids_hidden /
_visible; stop strings it matches itself on the text), `sampling_options` (temperature, top_p,
top_k, seed, the penalties, n), `output_options` (logprobs). This module maps that dict and
refuses what the orchestrator cannot do, naming the field: Dynamo turns the `InvalidArgument`
the worker raises into a 400 for the client.

Pure: no `dynamo` import, tested without a runtime (tests/serving/cluster/test_requests.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from engines.base import SamplingParams
from serving.cluster.routing import expected_len

DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default, as this project's own OpenAI API (a request without a temperature samples)."""


class BadRequest(ValueError):
    """A field the orchestrator cannot take; `str()` names the field and the limit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Submission:
    """The arguments of one `Orchestrator.submit`."""

    prompt_ids: tuple[int, ...]
    max_tokens: int | None
    sampling: SamplingParams
    stop_sequences: tuple[tuple[int, ...], ...]
    ignore_eos: bool

    def expected_kv_len(self, max_seq_len: int) -> int:
        """The KV length this request reaches if it runs to max_tokens: what a length-aware router
        groups by (its max_seq_len where max_tokens is not given)."""
        return expected_len(len(self.prompt_ids), self.max_tokens, max_seq_len)


def _section(request: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = request.get(name) or {}
    if not isinstance(value, Mapping):
        raise BadRequest(name, f"expected an object, got {type(value).__name__}")
    return value


def _number(section: Mapping[str, Any], name: str, default: float) -> float:
    value = section.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(name, f"expected a finite number, got {value!r}")
    return float(value)


def _int(section: Mapping[str, Any], name: str) -> int | None:
    value = section.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(name, f"expected an integer, got {value!r}")
    return value


def _token_ids(section: Mapping[str, Any], name: str) -> tuple[int, ...]:
    value = section.get(name) or ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise BadRequest(name, f"expected a list of token ids, got {value!r}")
    return tuple(value)


def submission(request: Mapping[str, Any], eos_token_ids: frozenset[int]) -> Submission:
    """Map one Dynamo request; raises BadRequest naming the field. The orchestrator checks the
    engine's limits (prompt length, max_tokens, KV blocks) itself when it is submitted."""
    prompt = _token_ids(request, "token_ids")
    stop = _section(request, "stop_conditions")
    sampling = _section(request, "sampling_options")
    output = _section(request, "output_options")
    n = _int(sampling, "n")
    if n not in (None, 1):
        raise BadRequest("n", f"{n} choices asked; this server returns one (n = 1)")
    if sampling.get("use_beam_search"):
        raise BadRequest("use_beam_search", "beam search is not implemented; leave it out")
    if sampling.get("guided_decoding"):
        raise BadRequest("guided_decoding", "guided decoding (JSON schema, regex, grammar) is not implemented")
    if output.get("logprobs") is not None or output.get("prompt_logprobs") is not None:
        raise BadRequest("logprobs", "log probabilities are not returned through Dynamo yet; leave out logprobs")
    temperature = _number(sampling, "temperature", DEFAULT_TEMPERATURE)
    top_p = _number(sampling, "top_p", 1.0)
    top_k = _int(sampling, "top_k") or 0
    seed = _int(sampling, "seed")
    min_tokens = _int(stop, "min_tokens") or 0
    if top_p == 0.0:  # only the most likely token is left: greedy, as the OpenAI API here
        temperature, top_p = 0.0, 1.0
    if seed is not None and seed < 0:
        raise BadRequest("seed", f"{seed} is negative; seeds are in [0, 2**63)")
    try:
        params = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
            seed=None if seed is None else seed % 2**63,
            repetition_penalty=_number(sampling, "repetition_penalty", 1.0),
            presence_penalty=_number(sampling, "presence_penalty", 0.0),
            frequency_penalty=_number(sampling, "frequency_penalty", 0.0),
            min_tokens=min_tokens)
    except ValueError as e:  # SamplingParams names the field first ("top_p must be in (0, 1] ...")
        raise BadRequest(str(e).split(" ", 1)[0], str(e)) from None
    # Stop tokens other than the model's EOS (which the engine leaves out of the output itself)
    # end the request as one-token stop sequences; they stay in the token stream, and Dynamo's
    # decoder hides the "hidden" ones from the text as it does for every backend.
    extra = (set(_token_ids(stop, "stop_token_ids_hidden")) - eos_token_ids) | set(_token_ids(stop, "stop_token_ids_visible"))
    ignore_eos = stop.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos", f"expected true or false, got {ignore_eos!r}")
    return Submission(prompt_ids=prompt, max_tokens=_int(stop, "max_tokens"), sampling=params,
                      stop_sequences=tuple((t,) for t in sorted(extra)), ignore_eos=bool(ignore_eos))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The final chunk's `completion_usage`."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

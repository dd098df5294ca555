"""TensorRT-LLM's Triton model interfaces over AlignedServe's one orchestrator.

NVIDIA's clients talk to the models of tensorrtllm_backend's `inflight_batcher_llm` repository:
`ensemble` and `tensorrt_llm_bls` (text in, text out) and `tensorrt_llm` (token ids in and out).
This repository serves models of those names (model_repo/<name>/config.pbtxt, inputs and outputs
declared as upstream, names, data types, dims and optional flags) whose Python models forward
each request to `aligned_llm` with a BLS call, so every request lands in the one orchestrator.
This module is their logic, on plain numpy arrays so it is tested without a server:

- `text_request` / `token_request` turn one request's upstream tensors into `aligned_llm`'s,
  honouring what the engine can do and refusing, with an error that names the input, any value
  it cannot honour (beam_width > 1, num_return_sequences > 1, LoRA, guided decoding, ...);
- `text_outputs` / `token_outputs` shape each answer as upstream does: `text_output` one string
  per beam (`[1, 1]` with the batch dimension), `output_ids` `[1, beam, tokens]` and
  `sequence_length` `[1, beam]`; a non-streaming answer echoes the prompt before the generated
  text or ids unless `exclude_input_in_output` (postprocessing decodes prompt + output there).

Sources (read 2026-12-05): NVIDIA/TensorRT-LLM `triton_backend/all_models/inflight_batcher_llm/
{ensemble,tensorrt_llm_bls,tensorrt_llm}/config.pbtxt` and `tensorrt_llm_bls/1/lib/decode.py`,
`triton_backend/inflight_batcher_llm/client/{end_to_end_grpc_client,inflight_batcher_llm_client}.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from orchestrator.core import RequestRejected
from serving.request_parsing import scalar

INNER_MODEL = "aligned_llm"
INNER_OUTPUTS = ("text_output", "output_ids", "finish_reason")

# Inputs whose presence asks for something AlignedServe does not do: refused whatever the value
# (an empty string or tensor counts as absent).
_NOT_SUPPORTED = {
    "lora_task_id": "LoRA adapters are not supported",
    "lora_weights": "LoRA adapters are not supported",
    "lora_config": "LoRA adapters are not supported",
    "guided_decoding_guide_type": "guided decoding is not supported",
    "guided_decoding_guide": "guided decoding is not supported",
    "prompt_embedding_table": "prompt tuning (p-tuning tables) is not supported",
    "prompt_vocab_size": "prompt tuning (p-tuning tables) is not supported",
    "prompt_table_extra_id": "prompt tuning (p-tuning tables) is not supported",
    "prompt_table_extra_ids": "prompt tuning (p-tuning tables) is not supported",
    "embedding_bias_words": "embedding bias is not supported",
    "embedding_bias_weights": "embedding bias is not supported",
    "embedding_bias": "embedding bias is not supported",
    "decoder_text_input": "encoder-decoder models are not supported",
    "decoder_input_ids": "encoder-decoder models are not supported",
    "decoder_input_lengths": "encoder-decoder models are not supported",
    "encoder_input_features": "encoder-decoder models are not supported",
    "encoder_output_lengths": "encoder-decoder models are not supported",
    "cross_attention_mask": "encoder-decoder models are not supported",
    "skip_cross_attn_blocks": "encoder-decoder models are not supported",
    "image_input": "multimodal inputs are not supported",
    "image_bytes_input": "multimodal inputs are not supported",
    "image_url_input": "multimodal inputs are not supported",
    "video_bytes_input": "multimodal inputs are not supported",
    "mrope_rotary_cos_sin": "multimodal inputs are not supported",
    "mrope_position_deltas": "multimodal inputs are not supported",
    "draft_input_ids": "speculative decoding (draft tokens) is not supported",
    "draft_logits": "speculative decoding (draft tokens) is not supported",
    "draft_acceptance_threshold": "speculative decoding (draft tokens) is not supported",
    "lookahead_window_size": "lookahead decoding is not supported",
    "lookahead_ngram_size": "lookahead decoding is not supported",
    "lookahead_verification_set_size": "lookahead decoding is not supported",
    "context_phase_params": "disaggregated context/generation phases are not supported over Triton",
    "retention_token_range_starts": "KV cache retention hints are not supported",
    "retention_token_range_ends": "KV cache retention hints are not supported",
    "retention_token_range_priorities": "KV cache retention hints are not supported",
    "retention_token_range_durations_ms": "KV cache retention hints are not supported",
    "retention_decode_priority": "KV cache retention hints are not supported",
    "retention_decode_duration_ms": "KV cache retention hints are not supported",
    "runtime_top_p_min": "top-p decay is not supported",
    "runtime_top_p_decay": "top-p decay is not supported",
    "runtime_top_p_reset_ids": "top-p decay is not supported",
}

# Scalar inputs allowed at their neutral value only: (neutral, why any other is refused).
_NEUTRAL_ONLY = {
    "beam_width": (1, "beam search is not supported: AlignedServe decodes one sequence per request (beam_width 1)"),
    "num_return_sequences": (1, "one sequence per request (num_return_sequences 1): send n requests instead"),
    "num_draft_tokens": (0, "speculative decoding (draft tokens) is not supported"),
    "use_draft_logits": (False, "speculative decoding (draft tokens) is not supported"),
    "return_context_logits": (False, "context logits are not returned"),
    "return_generation_logits": (False, "generation logits are not returned"),
    "return_perf_metrics": (False, "per-request perf metrics are not returned yet (the dashboard and /metrics have them)"),
    "return_kv_cache_reuse_stats": (False, "KV cache reuse stats are not returned"),
}
# Beam-search-only settings: without beam search TensorRT-LLM ignores them too.
_BEAM_ONLY = ("length_penalty", "len_penalty", "early_stopping", "beam_search_diversity_rate")


@dataclass
class FrontRequest:
    """One upstream request, translated."""

    inner: dict[str, np.ndarray]
    """The `aligned_llm` inputs (with the batch dimension), ready for a BLS call. aligned_llm always
    streams to the front model, which gathers a non-streaming answer: its first answer tells the
    front that the request is live there, and so can be stopped by id."""
    stream: bool
    echo: bool
    """A non-streaming answer starts with the prompt (exclude_input_in_output false)."""
    prompt_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    """return_log_probs: the answers carry output_log_probs and cum_log_probs."""
    counts: tuple[bool, bool] = (False, False)
    """return_num_input_tokens, return_num_output_tokens: the answers carry those counts."""

    @property
    def inner_outputs(self) -> list[str]:
        """The aligned_llm outputs to ask for (the prompt's token count also counts an echo)."""
        return (list(INNER_OUTPUTS) + (["output_log_probs"] if self.logprobs else [])
                + (["num_input_tokens"] if any(self.counts) else []))


def _present(arr) -> bool:
    if arr is None:
        return False
    a = np.asarray(arr)
    if a.size == 0:
        return False
    if a.dtype == object or a.dtype.kind in "SU":  # an empty string is "not sent" (README's "bad_words": "")
        return any(bytes(x) if isinstance(x, (bytes, np.bytes_)) else str(x) for x in a.reshape(-1))
    return True


def _refuse_unsupported(inputs: Mapping[str, np.ndarray]) -> None:
    for name, why in _NOT_SUPPORTED.items():
        if _present(inputs.get(name)):
            raise RequestRejected(name, why)
    for name, (neutral, why) in _NEUTRAL_ONLY.items():
        value = scalar(inputs, name)
        if value is not None and value != neutral:
            raise RequestRejected(name, f"got {value.item() if hasattr(value, 'item') else value!r}; {why}")


def _words_present(inputs: Mapping[str, np.ndarray], name: str) -> bool:
    arr = inputs.get(name)
    if arr is None:
        return False
    a = np.asarray(arr)
    if a.dtype.kind in "iu":  # the [2, n] token-id form: any id in the first row
        return bool((a.reshape(-1, 2, a.shape[-1])[:, 0] >= 0).any()) if a.size else False
    return _present(a)


def _bool(inputs: Mapping[str, np.ndarray], name: str, default: bool) -> bool:
    value = scalar(inputs, name)
    return default if value is None else bool(value)


def _batch(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


def _common(inputs: Mapping[str, np.ndarray], inner: dict[str, np.ndarray], *, top_k: str, top_p: str) -> None:
    """The sampling inputs both interfaces share, under their upstream names."""
    _refuse_unsupported(inputs)
    for name in ("temperature", "end_id", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        if inputs.get(name) is not None:
            inner[name] = np.asarray(inputs[name]).reshape(1, -1)
    lengths = [n for n in ("min_tokens", "min_length") if inputs.get(n) is not None]
    if lengths:  # 1.x renamed min_length to min_tokens; either is taken
        inner["min_tokens"] = np.asarray(inputs[lengths[0]]).astype(np.int32).reshape(1, -1)
    if _words_present(inputs, "bad_words"):
        inner["bad_words"] = np.asarray(inputs["bad_words"]).reshape(1, -1)
    if _words_present(inputs, "bad_words_list"):
        inner["bad_words_list"] = np.asarray(inputs["bad_words_list"]).astype(np.int32).reshape(1, 2, -1)
    for src, dst in ((top_k, "top_k"), (top_p, "top_p")):
        value = scalar(inputs, src)
        if value is None or (dst == "top_p" and value <= 0):  # TensorRT-LLM: top_p <= 0 is "not set"
            continue
        inner[dst] = _batch(value, np.int32 if dst == "top_k" else np.float32)
    seeds = [n for n in ("seed", "random_seed") if inputs.get(n) is not None]
    if seeds:  # 1.x renamed random_seed to seed; either is taken
        inner["seed"] = np.asarray(inputs[seeds[0]]).astype(np.uint64).reshape(1, -1)
    if _bool(inputs, "return_log_probs", False):
        inner["return_log_probs"] = _batch(True, bool)


def text_request(inputs: Mapping[str, np.ndarray]) -> FrontRequest:
    """`ensemble` / `tensorrt_llm_bls`: text_input, max_tokens, stream, stop_words, ..."""
    inner: dict[str, np.ndarray] = {}
    for name in ("text_input", "max_tokens"):
        if inputs.get(name) is None:
            raise RequestRejected(name, "required input is missing")
        inner[name] = np.asarray(inputs[name]).reshape(1, -1)
    _common(inputs, inner, top_k="top_k", top_p="top_p")
    if _present(inputs.get("stop_words")):
        inner["stop_words"] = np.asarray(inputs["stop_words"]).reshape(1, -1)
    stream = _bool(inputs, "stream", False)
    inner["stream"] = _batch(True, bool)  # always: the first answer says the request is live there
    raw = scalar(inputs, "text_input")
    prompt = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return FrontRequest(inner, stream, echo=not stream and not _bool(inputs, "exclude_input_in_output", False),
                        prompt_text=prompt, logprobs="return_log_probs" in inner, counts=_counts(inputs))


def token_request(inputs: Mapping[str, np.ndarray]) -> FrontRequest:
    """`tensorrt_llm`: input_ids, input_lengths, request_output_len, streaming, runtime_top_k, ..."""
    for name in ("input_ids", "input_lengths", "request_output_len"):
        if inputs.get(name) is None:
            raise RequestRejected(name, "required input is missing")
    ids = np.asarray(inputs["input_ids"]).reshape(-1)
    length = scalar(inputs, "input_lengths")
    if not 0 < int(length) <= ids.size:
        raise RequestRejected("input_lengths", f"{length} is outside [1, {ids.size}] (the ids sent)")
    ids = ids[: int(length)]
    inner: dict[str, np.ndarray] = {"input_ids": ids.astype(np.int32).reshape(1, -1),
                                    "max_tokens": np.asarray(inputs["request_output_len"]).astype(np.int32).reshape(1, -1)}
    _common(inputs, inner, top_k="runtime_top_k", top_p="runtime_top_p")
    if _words_present(inputs, "stop_words_list"):
        inner["stop_words_list"] = np.asarray(inputs["stop_words_list"]).astype(np.int32).reshape(1, 2, -1)
    stream = _bool(inputs, "streaming", False)
    inner["stream"] = _batch(True, bool)
    return FrontRequest(inner, stream, echo=not stream and not _bool(inputs, "exclude_input_in_output", False),
                        prompt_ids=[int(x) for x in ids], logprobs="return_log_probs" in inner, counts=_counts(inputs))


# Field names of aligned_llm's errors as the upstream interface calls them.
_TOKEN_NAMES = {"max_tokens": "request_output_len", "top_k": "runtime_top_k", "top_p": "runtime_top_p",
                "stream": "streaming", "text_input": "input_ids"}


def upstream_error(message: str, tokens: bool) -> str:
    """An aligned_llm error ("field: why") with the field named as the client named it."""
    name, sep, rest = message.partition(": ")
    if tokens and sep and name in _TOKEN_NAMES:
        return f"{_TOKEN_NAMES[name]}: {rest}"
    return message


def text_outputs(front: FrontRequest, text: str) -> dict[str, np.ndarray]:
    """`text_output` of one answer: the piece (streaming) or the whole text, after the prompt
    where it is echoed. One string per beam, with the batch dimension: [1, 1]."""
    if front.echo:
        text = front.prompt_text + text
    return {"text_output": np.array([[text.encode("utf-8")]], dtype=np.object_)}


def token_outputs(front: FrontRequest, ids: list[int]) -> dict[str, np.ndarray]:
    """`output_ids` [1, beam, tokens] and `sequence_length` [1, beam] of one answer."""
    if front.echo:
        ids = front.prompt_ids + list(ids)
    return {"output_ids": np.array([[ids]], dtype=np.int32).reshape(1, 1, len(ids)),
            "sequence_length": np.array([[len(ids)]], dtype=np.int32)}


def logprob_outputs(logprobs: list[float], cumulative: float) -> dict[str, np.ndarray]:
    """`output_log_probs` [1, beam, tokens] (this answer's generated tokens; the echoed prompt has
    none) and `cum_log_probs` [1, beam] (the sum over every token generated so far), as
    TensorRT-LLM answers return_log_probs."""
    return {"output_log_probs": np.array(logprobs, dtype=np.float32).reshape(1, 1, len(logprobs)),
            "cum_log_probs": np.array([[cumulative]], dtype=np.float32)}


def _counts(inputs: Mapping[str, np.ndarray]) -> tuple[bool, bool]:
    return _bool(inputs, "return_num_input_tokens", False), _bool(inputs, "return_num_output_tokens", False)


def count_outputs(front: FrontRequest, num_input_tokens: int, generated: int) -> dict[str, np.ndarray]:
    """`num_input_tokens` and `num_output_tokens` [1, 1] where asked for: the prompt's tokens, and
    the tokens of this answer's output_ids (the echoed prompt's included, as upstream counts them)."""
    out = {}
    if front.counts[0]:
        out["num_input_tokens"] = np.array([[num_input_tokens]], dtype=np.int32)
    if front.counts[1]:
        out["num_output_tokens"] = np.array([[generated + (num_input_tokens if front.echo else 0)]], dtype=np.int32)
    return out

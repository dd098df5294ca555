"""Peer prefetch through disaggregated requests: the supported way to move KV between GPUs.

A *context* instance (on the helper GPU) runs a request `context_only`: it prefills, returns
the first token and a hand-off (`DisaggregatedParams` with `ctx_request_id` and `opaque_state`),
and keeps the KV. The *decode* instance then receives the same request `generation_only` with
that hand-off; its cache transceiver (`CacheTransceiverConfig(backend="NIXL"|"UCX")`) pulls the
KV from the context instance device to device (NVLink where present) and decoding continues.
TensorRT-LLM frees the context side's blocks once the transfer is done.
"""
from __future__ import annotations

from engines.base import EngineError

CONTEXT_ONLY = "context_only"
GENERATION_ONLY = "generation_only"
GEN_ONLY_REPEATS_FIRST_TOKEN = True
"""The generation-only request's output starts with the context side's first token, which the
orchestrator already has, so the engine skips it (by position in the cumulative token list, not
by trusting a streamed diff). NVIDIA's tests/integration/defs/disaggregated/
test_disaggregated_single_gpu.py asserts this for non-streaming outputs; 1.1+ dropped the special
case that hid the repeat while streaming. Still to verify on a GPU host for streaming and for the
C++ Executor (docs/tensorrt-llm.md)."""


def context_only(api):
    """Hand-off parameters of the prefill on the context instance."""
    return api.DisaggregatedParams(request_type=CONTEXT_ONLY)


def generation_only(api, ctx_params, request_id: str):
    """Hand-off parameters of the same request on the decode instance, from the context side's result."""
    if ctx_params is None or getattr(ctx_params, "ctx_request_id", None) is None:
        raise EngineError(f"move: request {request_id!r} has no context-phase hand-off from the prefetch "
                          "instance (its context_only prefill did not finish or returned no disaggregated_params)")
    return api.DisaggregatedParams(request_type=GENERATION_ONLY, first_gen_tokens=ctx_params.first_gen_tokens,
                                   ctx_request_id=ctx_params.ctx_request_id, opaque_state=ctx_params.opaque_state,
                                   draft_tokens=getattr(ctx_params, "draft_tokens", None))

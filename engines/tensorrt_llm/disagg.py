"""Peer prefetch through disaggregated requests: the supported way to move KV between GPUs.

A *context* instance (on the helper GPU) runs a request `context_only`: it prefills, returns
the first token and a hand-off (`DisaggregatedParams` with `ctx_request_id` and `opaque_state`),
and keeps the KV. The *decode* instance then receives the same request `generation_only` with
that hand-off; its cache transceiver (`CacheTransceiverConfig(backend="NIXL"|"UCX")`) pulls the
KV from the context instance device to device (NVLink where present) and decoding continues.
TensorRT-LLM frees the context side's blocks once the transfer is done.
"""
from __future__ import annotations

import copy

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


def generation_only(ctx_params, request_id: str):
    """Hand-off parameters of the same request on the decode instance: the context side's own
    `DisaggregatedParams` with `request_type` set, as NVIDIA's
    tests/integration/defs/disaggregated/test_disaggregated_single_gpu.py does, so every field the
    context phase filled (`disagg_request_id`, `ctx_dp_rank`, `ctx_info_endpoint`, ... in
    tensorrt_llm/executor/params/disaggregation.py) reaches the generation side. A copy: the
    context side's object stays as it was returned."""
    if ctx_params is None or getattr(ctx_params, "ctx_request_id", None) is None:
        raise EngineError(f"move: request {request_id!r} has no context-phase hand-off from the prefetch "
                          "instance (its context_only prefill did not finish or returned no disaggregated_params)")
    params = copy.copy(ctx_params)
    params.request_type = GENERATION_ONLY
    return params

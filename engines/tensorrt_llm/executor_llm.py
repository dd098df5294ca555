"""`ExecutorLLM`: TensorRT-LLM's C++ Executor (1.2.x TensorRT engines) behind the LLM-API calls the engine makes.

On 1.2.x a `trtllm-build` engine directory is served by `tensorrt_llm.bindings.executor.Executor`
(removed after 1.2 with the TensorRT backend). `TrtllmEngine` speaks the LLM API:
`generate_async(tokens, sampling_params, streaming=True, kv_cache_retention_config,
disaggregated_params)` returning an async-iterable output with `abort()`. This class gives the
Executor that surface, so the engine has one code path for both flavours:

- `SamplingParams` -> `Request(max_tokens)` + `SamplingConfig`; `end_id=-1` (no token ends a
  request: the orchestrator decides when one stops, as `ignore_eos` does on the LLM API).
- `DisaggregatedParams` -> `Request(type=REQUEST_TYPE_CONTEXT_ONLY | GENERATION_ONLY,
  context_phase_params=ContextPhaseParams(...))`, and a context-only result's
  `context_phase_params` back into `DisaggregatedParams` for the hand-off.
- Streaming responses carry only the new tokens; the output accumulates them, as the LLM API's
  `token_ids` does.
- `abort()` -> `cancel_request(id)`; the Executor answers with a final response (CANCELLED), and with
  block reuse on it keeps the request's blocks as reusable cache (offloaded to `host_cache_size`
  at priority >= `secondary_offload_min_priority`), which is what parking relies on here.

One thread waits on `await_responses` and routes each response to its request's output, on the
event loop that submitted it.
"""
from __future__ import annotations

import abc
import asyncio
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from engines.tensorrt_llm.disagg import CONTEXT_ONLY, GENERATION_ONLY
from engines.tensorrt_llm.llm_settings import TrtllmSettings

BINDINGS = "tensorrt_llm.bindings.executor"
POLL = timedelta(milliseconds=20)
"""How long the router waits for responses before checking for shutdown."""
NO_END_ID = -1
"""`Request.end_id` that matches no token."""


@dataclass(slots=True)
class Completion:
    """`CompletionOutput`'s fields the engine reads."""

    token_ids: list[int] = field(default_factory=list)
    disaggregated_params: Any = None


class RoutedOutput(abc.ABC):
    """A request's streaming output fed by a router thread: `outputs[0]` grows with each item
    delivered, `finished` says the last came; async-iterable on the event loop that submitted it
    (the LLM API's `RequestOutput` as the engine reads it). Subclasses read their items (`_take`)
    and abort their way."""

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.outputs = [Completion()]
        self.finished = False
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    @abc.abstractmethod
    def abort(self) -> None:
        """Ask the executor to end the request (its final item still comes)."""

    def deliver(self, item: Any) -> None:
        """From the router thread: hand an item to the output's event loop (gone: nobody reads it)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop closed: the engine is shutting down
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> "RoutedOutput":
        if self.finished:
            raise StopAsyncIteration
        self._take(await self._queue.get())
        return self

    @abc.abstractmethod
    def _take(self, item: Any) -> None:
        """Apply one delivered item to `outputs` and `finished`; raise the request's error."""


class ExecutorOutput(RoutedOutput):
    """One Executor request's output: each response carries new tokens, accumulated here."""

    def __init__(self, llm: "ExecutorLLM", request_id: int, loop: asyncio.AbstractEventLoop):
        super().__init__(request_id, loop)
        self._llm = llm

    def abort(self) -> None:
        if not self.finished:
            self._llm.executor.cancel_request(self.request_id)

    def _take(self, response: Any) -> None:
        if response.has_error():
            self.finished = True
            raise RuntimeError(f"TensorRT-LLM executor request {self.request_id}: {response.error_msg}")
        result = response.result
        done = self.outputs[0]
        done.token_ids = done.token_ids + [int(t) for t in result.output_token_ids[0]]
        if result.context_phase_params is not None:
            done.disaggregated_params = self._llm.handoff(result.context_phase_params)
        self.finished = bool(result.is_final)


class ExecutorLLM:
    """A C++ `Executor` over one engine directory, on one GPU, with the LLM-API subset the engine uses."""

    def __init__(self, engine_dir: str | Path, settings: TrtllmSettings, *, llmapi: Any, bindings: Any = None,
                 device_index: int | None = None, transceiver: bool = False):
        if bindings is None:
            from engines.tensorrt_llm import lazy_import

            bindings = lazy_import.module(BINDINGS, f"serving {engine_dir}")
        self.b, self.llmapi = bindings, llmapi
        self.model = str(engine_dir)
        self.config = executor_config(bindings, settings, device_index=device_index, transceiver=transceiver)
        self.executor = bindings.Executor(Path(engine_dir), bindings.ModelType.DECODER_ONLY, self.config)
        self._outputs: dict[int, ExecutorOutput] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._router = threading.Thread(target=self._route, name="trtllm-executor-responses", daemon=True)
        self._router.start()

    def generate_async(self, inputs, sampling_params, streaming: bool = True, kv_cache_retention_config=None,
                       disaggregated_params=None) -> ExecutorOutput:
        """Enqueue one request; call from a running event loop (its responses are delivered there)."""
        if not streaming:
            raise ValueError("ExecutorLLM streams only (the engine reads tokens as they come)")
        loop = asyncio.get_running_loop()
        request = self._request(list(inputs), sampling_params, kv_cache_retention_config, disaggregated_params)
        with self._lock:  # a response can only be routed once its output is registered
            rid = self.executor.enqueue_request(request)
            out = self._outputs[rid] = ExecutorOutput(self, rid, loop)
        return out

    def handoff(self, params: Any) -> Any:
        """A context-only result's `ContextPhaseParams` as the LLM API's `DisaggregatedParams`."""
        return self.llmapi.DisaggregatedParams(
            request_type=CONTEXT_ONLY, first_gen_tokens=list(params.first_gen_tokens), ctx_request_id=params.req_id,
            opaque_state=params.opaque_state, draft_tokens=params.draft_tokens)

    def shutdown(self) -> None:
        self._stop.set()
        self._router.join(timeout=5)
        self.executor.shutdown()

    # ------------------------------------------------------------------ internals
    def _request(self, tokens: list[int], sp: Any, retention: Any, disagg: Any) -> Any:
        b = self.b
        greedy = sp.top_k == 1 or not sp.temperature
        sampling = b.SamplingConfig(beam_width=1, top_k=1 if greedy else sp.top_k,
                                    top_p=None if greedy else sp.top_p,
                                    temperature=None if greedy else sp.temperature, seed=sp.seed)
        kw: dict[str, Any] = dict(streaming=True, sampling_config=sampling, end_id=NO_END_ID,
                                  kv_cache_retention_config=retention)
        kind = getattr(disagg, "request_type", None)
        if kind == CONTEXT_ONLY:
            kw["type"] = b.RequestType.REQUEST_TYPE_CONTEXT_ONLY
        elif kind == GENERATION_ONLY:
            kw["type"] = b.RequestType.REQUEST_TYPE_GENERATION_ONLY
            # positional: the pybind build of ContextPhaseParams has no argument names
            kw["context_phase_params"] = b.ContextPhaseParams(list(disagg.first_gen_tokens), disagg.ctx_request_id,
                                                              disagg.opaque_state, disagg.draft_tokens)
        elif kind is not None:
            raise ValueError(f"disaggregated request_type must be {CONTEXT_ONLY!r} or {GENERATION_ONLY!r}, "
                             f"got {kind!r}")
        return b.Request(tokens, sp.max_tokens, **kw)

    def _route(self) -> None:
        while not self._stop.is_set():
            responses = self.executor.await_responses(timeout=POLL)
            with self._lock:
                for r in responses:
                    out = self._outputs.get(r.request_id)
                    if out is None:
                        continue
                    out.deliver(r)
                    if r.has_error() or r.result.is_final:
                        del self._outputs[r.request_id]


def executor_config(b: Any, s: TrtllmSettings, *, device_index: int | None, transceiver: bool) -> Any:
    """The `ExecutorConfig` of externally formed batches (`llm_settings` explains each setting)."""
    kv = b.KvCacheConfig(enable_block_reuse=s.enable_block_reuse, max_tokens=s.kv_max_tokens,
                         free_gpu_memory_fraction=s.free_gpu_memory_fraction,
                         host_cache_size=s.host_cache_bytes or None)
    kw: dict[str, Any] = dict(
        max_beam_width=1, kv_cache_config=kv, enable_chunked_context=False, max_batch_size=s.max_batch_size,
        scheduler_config=b.SchedulerConfig(capacity_scheduler_policy=b.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT))
    if device_index is not None:
        kw["parallel_config"] = b.ParallelConfig(device_ids=[device_index])
    if transceiver:
        kw["cache_transceiver_config"] = b.CacheTransceiverConfig(
            backend=getattr(b.CacheTransceiverBackendType, s.cache_transceiver_backend))
    return b.ExecutorConfig(**kw)

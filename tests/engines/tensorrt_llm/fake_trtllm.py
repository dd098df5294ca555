"""A FAKE of the TensorRT-LLM surface the adapter uses. It is not TensorRT-LLM and runs no model.

It exists so the adapter's own logic (admission, connector bookkeeping, disaggregated hand-off,
build and manifest) can be tested on machines without the package. Every name and parameter in
`engines/tensorrt_llm/api_surface.py` exists here (checked by test_api_surface.py); behaviour is
modelled only as far as the adapter depends on it:

- `FakeLLM` runs iterations on a background thread like the executor: admits waiting requests
  while slots and blocks are free (GUARANTEED_NO_EVICT: a request reserves blocks for its whole
  length up front), decodes every running request each iteration, streams outputs.
- Its "KV" is a tensor `[blocks, tokens_per_block]` holding each position's token id, and the next
  token is a hash of the request's KV values, so a request whose KV was loaded wrongly by the
  connector produces different tokens than one that never left.
- It calls a configured KV connector at the moments TensorRT-LLM does: get_num_new_matched_tokens
  and update_state_after_alloc on admission, build_connector_meta / start_load_kv /
  wait_for_layer_load / save_kv_layer / wait_for_save each iteration, request_finished when a
  request ends (holding its blocks while the worker saves), get_finished to release them.
- context_only requests keep their blocks after the first token until a generation_only request
  on another FakeLLM pulls them (the cache transceiver), which then frees them.
- `FakeExecutor` is the 1.2.x C++ `Executor` (`tensorrt_llm.bindings.executor`) over the same run
  loop: requests in, streaming responses (new tokens only) out through `await_responses`,
  `cancel_request` answered by a final CANCELLED response; it reads its limits from a fake engine
  directory's config.json.

`install(monkeypatch)` puts it into sys.modules under the real module names, only inside a test.
"""
from __future__ import annotations

import abc
import asyncio
import collections
import enum
import importlib
import itertools
import json
import os
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

VERSION = "1.2.1"
VOCAB = 259
"""The demo checkpoint's vocabulary, so engine directories built from it run on the fake."""
_INSTANCES: dict[int, "FakeLLM"] = {}
_ids = itertools.count(1)


# ----------------------------------------------------------------------------- config objects
class CapacitySchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = "MAX_UTILIZATION"
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    STATIC_BATCH = "STATIC_BATCH"


@dataclass
class KvCacheConfig:
    free_gpu_memory_fraction: Optional[float] = 0.9
    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    host_cache_size: Optional[int] = None
    max_tokens: Optional[int] = None
    use_kv_cache_manager_v2: Any = "auto"
    """As on `main` (llm_args.py): "auto" takes the model's preference (llm_utils.py,
    `_resolve_kv_cache_manager_v2_auto`); the fake's model prefers V2, the case where
    `KvCacheRetentionConfig` is ignored (FakeLLM.kv_manager_v2)."""


@dataclass
class SchedulerConfig:
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    context_chunking_policy: Any = None


@dataclass
class CacheTransceiverConfig:
    backend: Optional[str] = None
    max_tokens_in_buffer: Optional[int] = None


@dataclass
class KvCacheConnectorConfig:
    connector_module: str
    connector_scheduler_class: str
    connector_worker_class: str


@dataclass
class DisaggregatedParams:
    """The fields of tensorrt_llm/executor/params/disaggregation.py the fake fills or reads (more exist)."""

    request_type: Optional[str] = None
    first_gen_tokens: Optional[list] = None
    ctx_request_id: Optional[int] = None
    opaque_state: Any = None
    draft_tokens: Optional[list] = None
    disagg_request_id: Optional[int] = None
    ctx_dp_rank: Optional[int] = None
    ctx_info_endpoint: Optional[str] = None


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    ignore_eos: bool = False
    detokenize: bool = True


class KvCacheRetentionConfig:
    class TokenRangeRetentionConfig:
        def __init__(self, token_start: int, token_end: Optional[int] = None, priority: int = 35,
                     duration_ms: Optional[int] = None):
            self.token_start, self.token_end = token_start, token_end
            self.priority, self.duration_ms = priority, duration_ms

    def __init__(self, token_range_retention_configs: list, decode_retention_priority: int = 35,
                 decode_duration_ms: Optional[int] = None):
        for p in [decode_retention_priority] + [c.priority for c in token_range_retention_configs]:
            if not 0 <= p <= 100:
                raise ValueError(f"retention priority {p} outside [0, 100]")
        self.token_range_retention_configs = token_range_retention_configs
        self.decode_retention_priority = decode_retention_priority
        self.decode_duration_ms = decode_duration_ms


# ----------------------------------------------------------------------------- outputs
@dataclass
class CompletionOutput:
    token_ids: list = field(default_factory=list)
    disaggregated_params: Any = None


class RequestOutput:
    """Streams snapshots; async-iterable like the real one."""

    outputs: list
    finished: bool

    def __init__(self, request: "LlmRequest"):
        self._request = request
        self.outputs = [CompletionOutput()]
        self.finished = False
        self._snapshots: collections.deque = collections.deque()
        self._closed = False

    def _push(self, token_ids: list, finished: bool, disagg: Any = None) -> None:
        snap = types.SimpleNamespace(outputs=[CompletionOutput(list(token_ids), disagg)], finished=finished)
        self._snapshots.append(snap)
        if finished:
            self._snapshots.append(None)

    def _push_error(self, error: Exception) -> None:
        self._snapshots.append(error)

    def abort(self) -> None:
        self._request.aborted = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        while True:
            if self._snapshots:
                snap = self._snapshots.popleft()
                if snap is None:
                    raise StopAsyncIteration
                if isinstance(snap, Exception):
                    raise snap
                self.outputs, self.finished = snap.outputs, snap.finished
                return self
            await asyncio.sleep(0.0005)


# ----------------------------------------------------------------------------- connector bases
@dataclass
class SchedulerOutput:
    new_requests: list = field(default_factory=list)
    cached_requests: list = field(default_factory=list)


class KvCacheConnectorScheduler(abc.ABC):
    """Abstract, as TensorRT-LLM's own base class: the adapter's subclass implements every method."""

    def __init__(self, llm_args):
        self._llm_args = llm_args

    @abc.abstractmethod
    def build_connector_meta(self, scheduler_output):
        ...

    @abc.abstractmethod
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        ...

    @abc.abstractmethod
    def request_finished(self, request, cache_block_ids):
        ...

    @abc.abstractmethod
    def update_state_after_alloc(self, request, block_ids):
        ...


class KvCacheConnectorWorker(abc.ABC):
    """Abstract, as TensorRT-LLM's own base class: the adapter's subclass implements the abstract methods."""

    def __init__(self, llm_args):
        self._llm_args = llm_args
        self._metadata = None

    def bind_connector_meta(self, metadata):
        self._metadata = metadata

    def get_connector_meta(self):
        return self._metadata

    @abc.abstractmethod
    def register_kv_caches(self, kv_cache_tensor):
        ...

    @abc.abstractmethod
    def start_load_kv(self, stream):
        ...

    @abc.abstractmethod
    def wait_for_layer_load(self, layer_idx, stream):
        ...

    @abc.abstractmethod
    def save_kv_layer(self, layer_idx, stream):
        ...

    @abc.abstractmethod
    def wait_for_save(self, stream):
        ...

    @abc.abstractmethod
    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        ...


# ----------------------------------------------------------------------------- the executor
class LlmRequest:
    request_id: int

    def __init__(self, tokens: list, sampling: SamplingParams, disagg: Any, retention: Any, honoured: bool = True):
        self.request_id = next(_ids)
        self.tokens = list(tokens)
        self.prompt_len = len(tokens)
        self.sampling, self.disagg, self.retention = sampling, disagg, retention
        self.honoured_retention = retention if honoured else None
        """What the KV cache manager acts on: nothing under V2."""
        self.blocks: list[int] = []
        self.generated: list[int] = []
        self.aborted = False
        self.output = RequestOutput(self)
        self.computed = 0  # positions whose KV is written

    def get_tokens(self, beam: int) -> list:
        return list(self.tokens)


def _next_token(values: torch.Tensor) -> int:
    h = 0
    for v in values.tolist():
        h = (h * 1000003 + int(v) + 1) % (2**61 - 1)
    return h % VOCAB


class FakeLLM:
    """The fake `tensorrt_llm.LLM` (see the module docstring)."""

    NUM_BLOCKS = 64
    """KV blocks of every fake instance (tests lower it to exercise GUARANTEED_NO_EVICT waits)."""
    TICK_S = 0.0005
    BLOCK_BYTES = 1024
    """Bytes of one fake KV block (the tests' BYTES_PER_BLOCK): sizes the host tier in blocks."""

    def __init__(self, model: str, *, dtype: str = "auto", max_batch_size: int = 8, max_seq_len: int = 256,
                 max_num_tokens: int = 8192,
                 kv_cache_config: Optional[KvCacheConfig] = None, scheduler_config: Optional[SchedulerConfig] = None,
                 enable_chunked_prefill: bool = False,
                 cache_transceiver_config: Optional[CacheTransceiverConfig] = None,
                 kv_connector_config: Optional[KvCacheConnectorConfig] = None, **kwargs):
        self.model = model
        self.kwargs = dict(dtype=dtype, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                           max_num_tokens=max_num_tokens,
                           kv_cache_config=kv_cache_config or KvCacheConfig(), scheduler_config=scheduler_config,
                           enable_chunked_prefill=enable_chunked_prefill,
                           cache_transceiver_config=cache_transceiver_config, kv_connector_config=kv_connector_config,
                           **kwargs)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.max_num_tokens, self.enable_chunked_prefill = max_num_tokens, enable_chunked_prefill
        self.block_size = self.kwargs["kv_cache_config"].tokens_per_block
        self.kv_manager_v2 = self.kwargs["kv_cache_config"].use_kv_cache_manager_v2 in (True, "auto")
        # The worker's GPU: `global_rank % torch.cuda.device_count()` of the devices the process sees
        # (tensorrt_llm/executor/base_worker.py, `_get_comm_ranks_device_id`); a single-process
        # worker is rank 0, so visible device 0 whatever torch.cuda.set_device said.
        self.gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        self.kv = torch.zeros((self.NUM_BLOCKS, self.block_size), dtype=torch.float64)
        self.free_blocks = list(range(self.NUM_BLOCKS - 1, -1, -1))
        self.waiting: collections.deque[LlmRequest] = collections.deque()
        self.running: list[LlmRequest] = []
        self.saving: dict[int, LlmRequest] = {}
        self.ctx_kept: dict[int, LlmRequest] = {}
        self.max_running_seen = 0
        kv_cfg = self.kwargs["kv_cache_config"]
        self.reuse: collections.OrderedDict = collections.OrderedDict()
        self.reuse_capacity = (kv_cfg.host_cache_size or 0) // self.BLOCK_BYTES if kv_cfg.enable_block_reuse else 0
        self.reused_tokens = 0
        self.reuse_dropped = 0
        self.kv_waits = 0
        """Iterations in which a request with a free slot waited for KV blocks (GUARANTEED_NO_EVICT)."""
        self.submitted: list[LlmRequest] = []
        self.connector_calls: list[str] = []
        self.sched = self.worker = None
        if kv_connector_config is not None:
            mod = importlib.import_module(kv_connector_config.connector_module)
            args = types.SimpleNamespace(**self.kwargs)
            self.sched = getattr(mod, kv_connector_config.connector_scheduler_class)(args)
            self.worker = getattr(mod, kv_connector_config.connector_worker_class)(args)
            self.worker.register_kv_caches(self.kv)
        self.lock = threading.RLock()
        self._stop = threading.Event()
        _INSTANCES[id(self)] = self
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-trtllm-executor")
        self._thread.start()

    # --- public surface ---
    def generate_async(self, inputs, sampling_params: Optional[SamplingParams] = None, streaming: bool = False,
                       kv_cache_retention_config: Any = None, disaggregated_params: Any = None, **kwargs):
        if not streaming:
            raise TypeError("fake generate_async: only streaming=True is modelled (the adapter always streams)")
        if not inputs or max(inputs) >= VOCAB:
            raise ValueError("fake LLM: bad input tokens")
        gen_only = getattr(disaggregated_params, "request_type", None) == "generation_only"
        if not self.enable_chunked_prefill and not gen_only and len(inputs) > self.max_num_tokens:
            # tensorrt_llm/llmapi/llm.py, LLM._check_arguments (PyTorch backend, chunked prefill off)
            raise ValueError(f"The sum of prompt length ({float(len(inputs))}), query length (0) should not exceed "
                             f"max_num_tokens ({self.max_num_tokens})")
        req = LlmRequest(inputs, sampling_params or SamplingParams(), disaggregated_params, kv_cache_retention_config,
                         honoured=not self.kv_manager_v2)
        with self.lock:
            self.waiting.append(req)
            self.submitted.append(req)
        return req.output

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        _INSTANCES.pop(id(self), None)

    # --- for tests ---
    def blocks_in_use(self) -> int:
        with self.lock:
            return self.NUM_BLOCKS - len(self.free_blocks)

    def idle(self) -> bool:
        with self.lock:
            return not (self.waiting or self.running or self.saving)

    # --- the executor loop ---
    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                self._step()
            time.sleep(self.TICK_S)

    def _call(self, obj, name, *args):
        self.connector_calls.append(name)
        return getattr(obj, name)(*args)

    def _step(self) -> None:
        """One executor iteration, with the connector calls where TensorRT-LLM's PyExecutor makes them
        (tensorrt_llm/_torch/pyexecutor/py_executor.py, `_executor_loop`): build_connector_meta,
        start_load_kv, the per-layer hooks and wait_for_save only in an iteration that forwards a
        scheduled batch; get_finished on every pass of the loop, but a loop with no active and no
        waiting request blocks on its request queue (`_fetch_and_enqueue_requests`: idle ->
        `get_from_request_queue(timeout=None)`), and requests held by the connector for a save are
        not active. So a save ordered as the last request ends waits for the next request."""
        self._admit()
        work = bool(self.running)
        if not work and not self.waiting:
            return  # blocked on the request queue
        if self.sched is not None and work:
            meta = self._call(self.sched, "build_connector_meta", SchedulerOutput())
            self.worker.bind_connector_meta(meta)
            self._call(self.worker, "start_load_kv", None)
            for layer in range(2):
                self._call(self.worker, "wait_for_layer_load", layer, None)
                self._call(self.worker, "save_kv_layer", layer, None)
        ended = [r for r in self.running if r.aborted]
        for r in self.running:
            if r.aborted:
                continue
            self._forward(r)
            ctx_only = r.disagg is not None and r.disagg.request_type == "context_only"
            done = len(r.generated) >= r.sampling.max_tokens or len(r.tokens) >= self.max_seq_len or ctx_only
            disagg = None
            if ctx_only:
                kv = [float(self.kv[r.blocks[p // self.block_size], p % self.block_size]) for p in range(r.computed)]
                state = json.dumps({"endpoint": self.endpoint, "kv": kv}).encode()
                disagg = DisaggregatedParams("context_only", [r.generated[0]], r.request_id, state,
                                             ctx_dp_rank=0, ctx_info_endpoint=self.endpoint)
            shown = r.generated if not (r.disagg and r.disagg.request_type == "generation_only") \
                else list(r.disagg.first_gen_tokens) + r.generated
            r.output._push(shown, done, disagg)
            if done:
                ended.append(r)
        if self.sched is not None and work:
            self._call(self.worker, "wait_for_save", None)
        for r in ended:
            self.running.remove(r)
            if r.aborted:
                r.output._push(r.generated, True)
            if r.disagg is not None and r.disagg.request_type == "context_only" and not r.aborted:
                self.ctx_kept[r.request_id] = r
                continue
            if self.sched is not None and self._call(self.sched, "request_finished", r, list(r.blocks)):
                self.saving[r.request_id] = r
            else:
                self._release(r)
        if self.sched is not None:
            saved, _ = self._call(self.worker, "get_finished", list(self.saving), [])
            for rid in saved:
                self._release(self.saving.pop(rid))

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            r = self.waiting[0]
            if r.aborted:
                self.waiting.popleft()
                r.output._push(r.generated, True)
                continue
            # GUARANTEED_NO_EVICT reserves prompt + max_tokens on admission (cpp/tensorrt_llm/batch_manager/
            # kvCacheManager.cpp, getRemainingBlocksToCompletion: ceilDiv(promptLen + maxNewTokens,
            # tokensPerBlock); max_tokens is cut to max_seq_len - prompt by llmRequest.h `validate`)
            total = min(len(r.tokens) + r.sampling.max_tokens, self.max_seq_len)
            need = -(-total // self.block_size)
            if need > len(self.free_blocks):
                self.kv_waits += 1
                return  # wait until a request ends
            self.waiting.popleft()
            r.blocks = [self.free_blocks.pop() for _ in range(need)]
            gen_only = r.disagg is not None and r.disagg.request_type == "generation_only"
            if gen_only and self.sched is not None:  # as TensorRT-LLM's KvCacheConnectorManager
                self._release(r)
                r.output._push_error(RuntimeError("Connector API is not supported for generation-only requests!"))
                continue
            if gen_only:
                try:
                    self._pull_from_context(r)
                except RuntimeError as err:
                    self._release(r)
                    r.output._push_error(err)
                    continue
            elif self.sched is not None:
                matched, _async = self._call(self.sched, "get_num_new_matched_tokens", r, 0)
                self._call(self.sched, "update_state_after_alloc", r, list(r.blocks))
                r.computed = matched
            elif self.reuse_capacity:
                self._onboard(r)
            self.running.append(r)
            self.max_running_seen = max(self.max_running_seen, len(self.running))

    @property
    def endpoint(self) -> str:
        """Names the GPU this instance runs on and the instance."""
        return f"fake-ctx://gpu{self.gpu}/{id(self)}"

    def _pull_from_context(self, r: LlmRequest) -> None:
        """The cache transceiver: copy the context instance's KV, then it frees its blocks. The KV
        travels in the hand-off's `opaque_state` (so a context instance in another process works),
        and the generation side needs `ctx_info_endpoint` (a field newer than the four the C++
        ContextPhaseParams carries: it reads the object it is given). A context instance in another
        process keeps its blocks (nothing tells it the pull happened; tests do not count them)."""
        if r.disagg.ctx_info_endpoint is None:
            raise RuntimeError("generation_only request without ctx_info_endpoint: the cache transceiver cannot "
                               "reach the context instance (pass the context phase's DisaggregatedParams on)")
        kv = json.loads(r.disagg.opaque_state)["kv"]
        for p, value in enumerate(kv):
            self.kv[r.blocks[p // self.block_size], p % self.block_size] = value
        ctx = _INSTANCES.get(int(r.disagg.ctx_info_endpoint.rsplit("/", 1)[1]))
        if ctx is not None:
            with ctx.lock:
                ctx._release(ctx.ctx_kept.pop(r.disagg.ctx_request_id))
        r.tokens = r.tokens + list(r.disagg.first_gen_tokens)
        r.computed = len(kv)

    def _forward(self, r: LlmRequest) -> None:
        """Write the KV of every position not yet computed (prompt, or the last token), then sample."""
        for p in range(r.computed, len(r.tokens)):
            self.kv[r.blocks[p // self.block_size], p % self.block_size] = r.tokens[p]
        r.computed = len(r.tokens)
        values = torch.stack([self.kv[r.blocks[p // self.block_size], p % self.block_size]
                              for p in range(len(r.tokens))])
        tok = _next_token(values)
        r.generated.append(tok)
        r.tokens.append(tok)

    def _release(self, r: LlmRequest) -> None:
        if self.reuse_capacity:
            self._store_for_reuse(r)
        self.free_blocks.extend(r.blocks)
        r.blocks = []

    def _store_for_reuse(self, r: LlmRequest) -> None:
        """Block reuse with a host tier (`host_cache_size`): an ended or cancelled request's full
        blocks stay reusable (kvCacheManager.cpp, `releaseBlocks` -> `storeBlocks`); evicted from the
        GPU they go to host memory while it has room, and the oldest host blocks are dropped for
        newer ones (`WindowBlockManager::getFreeBlock`: no free secondary block, no offload). The
        fake keeps them in host memory only, the tier the adapter's parking relies on."""
        for i in range(r.computed // self.block_size):
            key = tuple(r.tokens[:(i + 1) * self.block_size])
            self.reuse[key] = self.kv[r.blocks[i]].clone()
            self.reuse.move_to_end(key)
        while len(self.reuse) > self.reuse_capacity:
            self.reuse.popitem(last=False)
            self.reuse_dropped += 1

    def _onboard(self, r: LlmRequest) -> None:
        """A new request finds its leading full blocks in the reuse cache (all but its last token)."""
        n = 0
        while (n + 1) * self.block_size < len(r.tokens) and tuple(r.tokens[:(n + 1) * self.block_size]) in self.reuse:
            self.kv[r.blocks[n]] = self.reuse[tuple(r.tokens[:(n + 1) * self.block_size])]
            n += 1
        r.computed = n * self.block_size
        self.reused_tokens += r.computed


def reference_tokens(prompt: list, n: int) -> list:
    """The tokens the fake model generates for `prompt` when nothing interferes."""
    tokens, out = list(prompt), []
    for _ in range(n):
        t = _next_token(torch.tensor(tokens, dtype=torch.float64))
        out.append(t)
        tokens.append(t)
    return out


# ----------------------------------------------------------------------------- the C++ Executor (1.2.x)
class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class RequestType(enum.Enum):
    REQUEST_TYPE_CONTEXT_AND_GENERATION = 0
    REQUEST_TYPE_CONTEXT_ONLY = 1
    REQUEST_TYPE_GENERATION_ONLY = 2


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


class CacheTransceiverBackendType(enum.Enum):
    DEFAULT = 0
    MPI = 1
    UCX = 2
    NIXL = 3


class CommunicationType(enum.Enum):
    MPI = 0


class CommunicationMode(enum.Enum):
    LEADER = 0
    ORCHESTRATOR = 1


@dataclass
class ExecKvCacheConfig:
    """The bindings' KvCacheConfig (no tokens_per_block: a TensorRT engine fixes it at build time)."""

    enable_block_reuse: bool = True
    max_tokens: Optional[int] = None
    max_attention_window: Any = None
    sink_token_length: Optional[int] = None
    free_gpu_memory_fraction: Optional[float] = None
    host_cache_size: Optional[int] = None
    onboard_blocks: bool = True
    cross_kv_cache_fraction: Optional[float] = None
    secondary_offload_min_priority: Optional[int] = None
    event_buffer_max_size: int = 0


@dataclass
class ExecSchedulerConfig:
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    context_chunking_policy: Any = None
    dynamic_batch_config: Any = None


@dataclass
class ParallelConfig:
    communication_type: CommunicationType = CommunicationType.MPI
    communication_mode: CommunicationMode = CommunicationMode.LEADER
    device_ids: Optional[list] = None
    participant_ids: Optional[list] = None
    orchestrator_config: Any = None
    num_nodes: Optional[int] = None


class ExecCacheTransceiverConfig:
    def __init__(self, backend: Optional[CacheTransceiverBackendType] = None, max_tokens_in_buffer=None,
                 kv_transfer_timeout_ms=None):
        if backend is not None and not isinstance(backend, CacheTransceiverBackendType):
            raise TypeError(f"backend must be a CacheTransceiverBackendType, got {backend!r}")
        self.backend, self.max_tokens_in_buffer = backend, max_tokens_in_buffer
        self.kv_transfer_timeout_ms = kv_transfer_timeout_ms


@dataclass
class ExecutorConfig:
    max_beam_width: int = 1
    scheduler_config: Optional[ExecSchedulerConfig] = None
    kv_cache_config: Optional[ExecKvCacheConfig] = None
    enable_chunked_context: bool = False
    normalize_log_probs: bool = True
    iter_stats_max_iterations: int = 1000
    request_stats_max_iterations: int = 0
    batching_type: Any = None
    max_batch_size: Optional[int] = None
    max_num_tokens: Optional[int] = None
    parallel_config: Optional[ParallelConfig] = None
    cache_transceiver_config: Optional[ExecCacheTransceiverConfig] = None


class SamplingConfig:
    def __init__(self, beam_width: int = 1, *, top_k=None, top_p=None, top_p_min=None, seed=None, temperature=None,
                 min_tokens=None, **kwargs):
        self.beam_width, self.top_k, self.top_p, self.seed, self.temperature = beam_width, top_k, top_p, seed, \
            temperature


class ContextPhaseParams:
    def __init__(self, first_gen_tokens, req_id, opaque_state, draft_tokens, /):  # positional, as the pybind build
        self.first_gen_tokens, self.req_id = list(first_gen_tokens), req_id
        self.opaque_state, self.draft_tokens = opaque_state, draft_tokens


class Request:
    def __init__(self, input_token_ids, max_tokens, *, streaming: bool = False, sampling_config=None,
                 output_config=None, end_id=None, pad_id=None, kv_cache_retention_config=None,
                 return_all_generated_tokens: bool = False, priority: float = 0.5,
                 type: RequestType = RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION, context_phase_params=None,
                 **kwargs):
        self.input_token_ids, self.max_tokens = list(input_token_ids), max_tokens
        self.streaming, self.sampling_config, self.end_id = streaming, sampling_config, end_id
        self.kv_cache_retention_config = kv_cache_retention_config
        self.request_type, self.context_phase_params = type, context_phase_params


@dataclass
class Result:
    output_token_ids: list
    is_final: bool
    finish_reasons: list
    context_phase_params: Any = None


@dataclass
class Response:
    request_id: int
    result: Optional[Result] = None
    error_msg: Optional[str] = None

    def has_error(self) -> bool:
        return self.error_msg is not None


class _ResponseSink:
    """Turns the core's cumulative snapshots into the Executor's streaming responses (new tokens only)."""

    def __init__(self, executor: "FakeExecutor", request: LlmRequest):
        self.executor, self.request, self.sent = executor, request, 0

    def _push(self, token_ids: list, finished: bool, disagg: Any = None) -> None:
        new, self.sent = list(token_ids[self.sent:]), len(token_ids)
        reason = FinishReason.NOT_FINISHED
        if finished:
            reason = FinishReason.CANCELLED if self.request.aborted else FinishReason.LENGTH
        cpp = None if disagg is None else ContextPhaseParams(disagg.first_gen_tokens, disagg.ctx_request_id,
                                                             disagg.opaque_state, None)
        self.executor._respond(Response(self.request.request_id, Result([new], finished, [reason], cpp)))


class FakeExecutor(FakeLLM):
    """The fake `tensorrt_llm.bindings.executor.Executor` over a (fake) TensorRT engine directory.

    max_seq_len, max_batch_size, tokens_per_block and max_input_len come from the engine directory's
    config.json (`build_config`, as the fake trtllm-build in the tests writes it; max_input_len
    1,024 where absent, trtllm-build's default in tensorrt_llm/commands/build.py); the run loop is
    FakeLLM's. A prompt longer than max_input_len gets an error response, as the real executor's
    validation answers (cpp/include/tensorrt_llm/batch_manager/llmRequest.h, `validate`:
    "Prompt length (%d) exceeds maximum input length (%d). ...")."""

    def __init__(self, model_path, model_type: ModelType, executor_config: ExecutorConfig):
        if model_type is not ModelType.DECODER_ONLY:
            raise ValueError(f"fake Executor: only DECODER_ONLY is modelled, got {model_type}")
        cfg_path = Path(model_path) / "config.json"
        if not cfg_path.is_file():
            raise RuntimeError(f"[TensorRT-LLM][ERROR] engine config {cfg_path} not found")
        build = json.loads(cfg_path.read_text())["build_config"]
        cfg = executor_config
        slots = cfg.max_batch_size or build["max_batch_size"]
        if slots > build["max_batch_size"]:
            raise ValueError(f"max_batch_size {slots} exceeds the engine's {build['max_batch_size']}")
        kv = cfg.kv_cache_config or ExecKvCacheConfig()
        self.config = cfg
        self._responses: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._by_id: dict[int, LlmRequest] = {}
        self.max_input_len = build.get("max_input_len", 1024)
        super().__init__(str(model_path), max_batch_size=slots, max_seq_len=build["max_seq_len"],
                         kv_cache_config=KvCacheConfig(tokens_per_block=build["tokens_per_block"],
                                                       enable_block_reuse=kv.enable_block_reuse,
                                                       host_cache_size=kv.host_cache_size, max_tokens=kv.max_tokens,
                                                       use_kv_cache_manager_v2=False),  # the C++ Executor: V1
                         scheduler_config=cfg.scheduler_config, enable_chunked_prefill=cfg.enable_chunked_context,
                         cache_transceiver_config=cfg.cache_transceiver_config)
        if cfg.parallel_config is not None and cfg.parallel_config.device_ids:
            self.gpu = str(cfg.parallel_config.device_ids[0])  # the C++ Executor takes its device ids

    def enqueue_request(self, request: Request) -> int:
        if not request.streaming:
            raise TypeError("fake Executor: only streaming requests are modelled (the adapter always streams)")
        if len(request.input_token_ids) > self.max_input_len:
            rid = next(_ids)
            self._respond(Response(rid, error_msg=(
                f"Prompt length ({len(request.input_token_ids)}) exceeds maximum input length ({self.max_input_len}). "
                "Set log level to info and check TRTGptModel logs for how maximum input length is set")))
            return rid
        disagg = None
        if request.request_type is RequestType.REQUEST_TYPE_CONTEXT_ONLY:
            disagg = DisaggregatedParams("context_only")
        elif request.request_type is RequestType.REQUEST_TYPE_GENERATION_ONLY:
            c = request.context_phase_params
            disagg = DisaggregatedParams("generation_only", c.first_gen_tokens, c.req_id, c.opaque_state,
                                         ctx_info_endpoint=json.loads(c.opaque_state)["endpoint"])  # C++: all in it
        sampling = SamplingParams(max_tokens=request.max_tokens, temperature=request.sampling_config.temperature,
                                  top_k=request.sampling_config.top_k, seed=request.sampling_config.seed,
                                  ignore_eos=request.end_id == -1)
        with self.lock:  # the run loop must not step the request before its sink is in place
            out = self.generate_async(request.input_token_ids, sampling, streaming=True,
                                      kv_cache_retention_config=request.kv_cache_retention_config,
                                      disaggregated_params=disagg)
            req = out._request
            req.output = _ResponseSink(self, req)
            self._by_id[req.request_id] = req
        return req.request_id

    def await_responses(self, timeout=None) -> list:
        if isinstance(timeout, int):  # the real overload await_responses(id) takes an int request id
            raise TypeError("fake Executor: an int is a request id; pass the timeout as a timedelta")
        seconds = timeout.total_seconds() if timeout is not None else None
        with self._ready:
            self._ready.wait_for(lambda: self._responses, timeout=seconds)
            out, self._responses = list(self._responses), collections.deque()
        return out

    def cancel_request(self, id: int) -> None:
        req = self._by_id.get(id)
        if req is not None:
            req.aborted = True

    def _respond(self, response: Response) -> None:
        with self._ready:
            self._responses.append(response)
            self._ready.notify_all()


# ----------------------------------------------------------------------------- building
class PretrainedModel:
    """The fake base of TensorRT-LLM's models: saves a checkpoint (config and a marker weight file).
    As in the real one, `from_hugging_face` belongs to the concrete models, not to this base."""

    def __init__(self, hf_dir: str, dtype: str):
        self.hf_dir, self.dtype = hf_dir, dtype

    def save_checkpoint(self, output_dir, save_config: bool = True) -> None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text('{"fake": "tensorrt_llm checkpoint", "dtype": "%s"}\n' % self.dtype)
        (out / "rank0.safetensors").write_bytes(b"fake")


class LLaMAForCausalLM(PretrainedModel):
    """The fake converter of Llama-family checkpoints (MODEL_MAP's value for LlamaForCausalLM)."""

    @classmethod
    def from_hugging_face(cls, hf_model_or_dir, dtype: str = "auto", mapping=None, quant_config=None, **kwargs):
        return cls(str(hf_model_or_dir), dtype)


# ----------------------------------------------------------------------------- installing
def modules(version: str = VERSION) -> dict[str, types.ModuleType]:
    """The fake's modules, by the real module names."""
    def mod(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name, "FAKE TensorRT-LLM module for tests (tests/engines/tensorrt_llm/fake_trtllm.py)")
        m.__dict__.update(attrs)
        return m

    configs = dict(KvCacheConfig=KvCacheConfig, SchedulerConfig=SchedulerConfig,
                   CapacitySchedulerPolicy=CapacitySchedulerPolicy, CacheTransceiverConfig=CacheTransceiverConfig)
    llmapi = mod("tensorrt_llm.llmapi", LLM=FakeLLM, RequestOutput=RequestOutput, CompletionOutput=CompletionOutput,
                 SamplingParams=SamplingParams, KvCacheRetentionConfig=KvCacheRetentionConfig,
                 DisaggregatedParams=DisaggregatedParams, **configs)
    ms = {
        "tensorrt_llm": mod("tensorrt_llm", __version__=version, LLM=FakeLLM, SamplingParams=SamplingParams,
                            __fake__=True),
        "tensorrt_llm.llmapi": llmapi,
        "tensorrt_llm.llmapi.llm_args": mod("tensorrt_llm.llmapi.llm_args",
                                            KvCacheConnectorConfig=KvCacheConnectorConfig, **configs),
        "tensorrt_llm._torch": mod("tensorrt_llm._torch"),
        "tensorrt_llm._torch.pyexecutor": mod("tensorrt_llm._torch.pyexecutor"),
        "tensorrt_llm._torch.pyexecutor.kv_cache_connector": mod(
            "tensorrt_llm._torch.pyexecutor.kv_cache_connector", KvCacheConnectorScheduler=KvCacheConnectorScheduler,
            KvCacheConnectorWorker=KvCacheConnectorWorker, SchedulerOutput=SchedulerOutput),
        "tensorrt_llm.bindings": mod("tensorrt_llm.bindings"),
        "tensorrt_llm.bindings.executor": mod(
            "tensorrt_llm.bindings.executor", Executor=FakeExecutor, ExecutorConfig=ExecutorConfig,
            ModelType=ModelType, Request=Request, RequestType=RequestType, Response=Response, Result=Result,
            FinishReason=FinishReason, SamplingConfig=SamplingConfig, ContextPhaseParams=ContextPhaseParams,
            KvCacheConfig=ExecKvCacheConfig, SchedulerConfig=ExecSchedulerConfig,
            CapacitySchedulerPolicy=CapacitySchedulerPolicy, ParallelConfig=ParallelConfig,
            CacheTransceiverConfig=ExecCacheTransceiverConfig, CacheTransceiverBackendType=CacheTransceiverBackendType,
            KvCacheRetentionConfig=KvCacheRetentionConfig),
        "tensorrt_llm.bindings.internal": mod("tensorrt_llm.bindings.internal"),
        "tensorrt_llm.bindings.internal.batch_manager": mod("tensorrt_llm.bindings.internal.batch_manager",
                                                            LlmRequest=LlmRequest),
        "tensorrt_llm.models": mod("tensorrt_llm.models", MODEL_MAP={"LlamaForCausalLM": LLaMAForCausalLM},
                                   PretrainedModel=PretrainedModel, LLaMAForCausalLM=LLaMAForCausalLM),
    }
    return ms


def install(monkeypatch, version: str = VERSION) -> dict[str, types.ModuleType]:
    """Put the fake into sys.modules for one test (monkeypatch undoes it)."""
    from engines.tensorrt_llm import connector_classes

    ms = modules(version)
    for name, m in ms.items():
        monkeypatch.setitem(sys.modules, name, m)
    connector_classes.reset()
    monkeypatch.setattr(FakeLLM, "NUM_BLOCKS", FakeLLM.NUM_BLOCKS)
    return ms


def install_in_child() -> None:
    """The fake as `tensorrt_llm` in a child process (engines/tensorrt_llm/context_process.py's
    preload), under the module name the parent's pickled objects name."""
    import importlib.util

    name = "alignedserve_tests_fake_trtllm"
    spec = importlib.util.spec_from_file_location(name, __file__)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    sys.modules.update(mod.modules())

"""The `LLM()` settings the orchestrator needs, written by the build and read by the engine.

`make build-engine BACKEND=trtllm` writes them to `llm_settings.json` in the engine directory
(and into the manifest's `extra`), so what is served is what was built. At serve time `llm_kwargs`
turns them into `LLM()` arguments (LLM-API flavour) and `executor_llm.executor_config` into an
`ExecutorConfig` (engine flavour).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from engines.tensorrt_llm.api_surface import ENGINE, LLM_API

SETTINGS_FILE = "llm_settings.json"
DEFAULT_MAX_NUM_TOKENS = 8192
"""TensorRT-LLM's default max_num_tokens (trtllm-build's, tensorrt_llm/commands/build.py, and the LLM
API's, BaseLlmArgs in llm_args.py): the most tokens one iteration takes. With chunked prefill off a
prompt (or a resumed request's prompt + generated tokens) longer than it is refused ("The sum of
prompt length ... should not exceed max_num_tokens", `LLM._check_arguments` in llm.py), so both
flavours raise it to max_seq_len where that is longer."""
DRIVER_SLOTS = 1
"""Executor slots (and KV blocks) beyond the orchestrator's when the KV connector is on: the
one-token request that drives the iteration a park's save needs (`TrtllmEngine._drive`)."""
TRANSCEIVER_BACKENDS = ("NIXL", "UCX")


@dataclass(frozen=True, slots=True)
class TrtllmSettings:
    """Executor settings; each one is what makes externally formed batches work."""

    max_batch_size: int
    """Executor slots = the orchestrator's batch capacity (running plus staged requests)."""
    max_seq_len: int
    """Longest prompt + output of one request (the manifest's max_seq_len)."""
    tokens_per_block: int
    """Tokens per KV block (the manifest's kv_block_size); the connector copies whole blocks."""
    flavour: str = LLM_API
    """LLM_API: Hugging Face checkpoint on the PyTorch backend; ENGINE: a trtllm-build engine (1.2.x)."""
    dtype: str = "auto"
    free_gpu_memory_fraction: float = 0.9
    """Upper bound on the share of free GPU memory TensorRT-LLM takes for its KV pool."""
    kv_max_tokens: int | None = None
    """`KvCacheConfig.max_tokens`: the KV pool in tokens (the manifest's kv_blocks_device x
    tokens_per_block), so the orchestrator's block accounting matches the executor's pool."""
    host_cache_bytes: int = 0
    """`KvCacheConfig.host_cache_size`: TensorRT-LLM's own host tier for evicted reusable blocks
    (priorities in `retention`). The engine flavour parks requests there (`host_cache`); 0 turns it off."""
    host_pool_blocks: int = 0
    """LLM-API flavour: blocks of the orchestrator's host pool served by the KV connector; 0: no
    connector, no offload."""
    enable_block_reuse: bool = True
    """Needed for host_cache_size to onboard offloaded blocks again."""
    cache_transceiver_backend: str | None = None
    """"NIXL" or "UCX" to hand KV between a context and a generation instance (peer prefetch); None: off."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_seq_len", "tokens_per_block"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.flavour not in (LLM_API, ENGINE):
            raise ValueError(f"flavour must be {LLM_API!r} or {ENGINE!r}, got {self.flavour!r}")
        if not 0 < self.free_gpu_memory_fraction <= 1:
            raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {self.free_gpu_memory_fraction}")
        if self.host_cache_bytes < 0 or self.host_pool_blocks < 0:
            raise ValueError("host_cache_bytes and host_pool_blocks must be >= 0")
        if self.host_pool_blocks and self.flavour == ENGINE:
            raise ValueError("host_pool_blocks needs the KV connector, which only the LLM-API (PyTorch) flavour has")
        if self.cache_transceiver_backend not in (None, *TRANSCEIVER_BACKENDS):
            raise ValueError(f"cache_transceiver_backend must be one of {TRANSCEIVER_BACKENDS} or None, "
                             f"got {self.cache_transceiver_backend!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = SETTINGS_FILE) -> "TrtllmSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{where}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def write(self, engine_dir: Path) -> None:
        (Path(engine_dir) / SETTINGS_FILE).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


V2_FIELD = "use_kv_cache_manager_v2"
"""`KvCacheConfig` field of newer TensorRT-LLM (`main`, 2026; default "auto": the model's preference).
KV cache manager V2 honours no `KvCacheRetentionConfig` (tensorrt_llm/_torch/pyexecutor/connectors/
kv_cache_connector.py: "Set kv_cache_config.use_kv_cache_manager_v2=False to keep retention
priorities"), and the staged/running/parked priorities (`retention`) are how parked KV stays in
TensorRT-LLM's host tier, so the adapter sets it False wherever the field exists."""


def has_field(cls, name: str) -> bool:
    """Whether a TensorRT-LLM config class (pydantic on the LLM API; a dataclass in the fake) has a field."""
    return name in (getattr(cls, "model_fields", None) or getattr(cls, "__dataclass_fields__", None) or ())


def llm_kwargs(api, settings: TrtllmSettings, model: str, *, connector: bool, transceiver: bool) -> dict:
    """Keyword arguments of `LLM(...)` on the LLM-API flavour (`api` is `tensorrt_llm.llmapi`, or the
    fake in tests).

    connector: add the AlignedServe KV connector (needs host_pool_blocks).
    transceiver: add the cache transceiver (context/generation instances of peer prefetch)."""
    kv_kw = dict(free_gpu_memory_fraction=settings.free_gpu_memory_fraction, max_tokens=settings.kv_max_tokens,
                 tokens_per_block=settings.tokens_per_block, enable_block_reuse=settings.enable_block_reuse,
                 host_cache_size=settings.host_cache_bytes or None)
    if has_field(api.KvCacheConfig, V2_FIELD):
        kv_kw[V2_FIELD] = False
    kwargs = dict(model=model, dtype=settings.dtype,
                  max_batch_size=settings.max_batch_size + (DRIVER_SLOTS if connector else 0),
                  max_seq_len=settings.max_seq_len, max_num_tokens=max(settings.max_seq_len, DEFAULT_MAX_NUM_TOKENS),
                  kv_cache_config=api.KvCacheConfig(**kv_kw),
                  scheduler_config=api.SchedulerConfig(
                      capacity_scheduler_policy=api.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT),
                  enable_chunked_prefill=False)
    if connector:
        from engines.tensorrt_llm import lazy_import
        from engines.tensorrt_llm.connector_classes import SCHEDULER_CLASS, WORKER_CLASS

        args = lazy_import.module("tensorrt_llm.llmapi.llm_args", "the AlignedServe KV connector")
        kwargs["kv_connector_config"] = args.KvCacheConnectorConfig(
            connector_module="engines.tensorrt_llm.connector_classes",
            connector_scheduler_class=SCHEDULER_CLASS, connector_worker_class=WORKER_CLASS)
    if transceiver:
        kwargs["cache_transceiver_config"] = api.CacheTransceiverConfig(backend=settings.cache_transceiver_backend)
    return kwargs


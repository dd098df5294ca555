"""What an engine directory opens into: the TensorRT-LLM instances and the host tier.

`make build-engine BACKEND=trtllm` wrote the settings (`llm_settings`) and, for 1.2.x, a
TensorRT engine. Opening it gives `TrtllmEngine` its parts: the decode instance (an `LLM` on the
LLM-API flavour, an `ExecutorLLM` on the engine flavour), with a helper device a context instance
for peer prefetch, the host tier (`host_tier`), and the model's description from the manifest.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from engines.base import CapabilityError, EngineError, ModelInfo
from engines.tensorrt_llm import host_pool, lazy_import
from engines.tensorrt_llm.api_surface import ENGINE, LLM_API
from engines.tensorrt_llm.host_cache import HostCacheBooks
from engines.tensorrt_llm.host_pool import HostKvPool
from engines.tensorrt_llm.llm_settings import TrtllmSettings, llm_kwargs

SINGLE_PROCESS_ENV = "TLLM_WORKER_USE_SINGLE_PROCESS"
"""Runs TensorRT-LLM's executor in this process, where the connector finds the bound host pool."""


def open_engine_dir(engine_dir: str | Path, manifest, *, device: str = "auto", dtype: str | None = None,
                    kv_blocks: int | None = None, host_kv_blocks: int | None = None,
                    helper_devices: Sequence[str] = ()) -> dict[str, Any]:
    """Import TensorRT-LLM, start the instances `engine_dir` asks for, and return the keyword
    arguments of `TrtllmEngine(...)` (see `TrtllmEngine.from_engine_dir`)."""
    engine_dir = Path(engine_dir)
    lazy_import.imported(f"serving {engine_dir}")
    api = lazy_import.llmapi(f"serving {engine_dir}")
    settings = TrtllmSettings.from_dict(dict(manifest.extra.get("llm_settings", {})), where=str(engine_dir))
    if dtype and dtype != manifest.dtype:
        raise EngineError(f"{engine_dir} was built for {manifest.dtype}; rebuild it with --dtype {dtype} "
                          "to serve in another dtype")
    overrides = {}
    if host_kv_blocks is not None and settings.flavour == ENGINE:
        overrides["host_cache_bytes"] = host_kv_blocks * manifest.bytes_per_block
    elif host_kv_blocks is not None:
        overrides["host_pool_blocks"] = host_kv_blocks
    if kv_blocks is not None:
        overrides["kv_max_tokens"] = kv_blocks * settings.tokens_per_block
    settings = TrtllmSettings.from_dict({**settings.to_dict(), **overrides})
    if len(helper_devices) > 1:
        raise EngineError(f"the TensorRT-LLM engine takes one helper (context) device, got {list(helper_devices)}")
    if helper_devices and settings.cache_transceiver_backend is None:
        raise CapabilityError("peer prefetch needs cache_transceiver_backend (NIXL or UCX) in the engine's "
                              "llm_settings; rebuild with --cache-transceiver NIXL")
    decode_device = "cuda:0" if device == "auto" else device
    peer = bool(helper_devices)
    ctx_llm = None
    if settings.flavour == LLM_API and peer and settings.host_pool_blocks:
        # engine.CONNECTOR_REFUSES_HANDOFF: the same host memory becomes TensorRT-LLM's own host cache
        settings = dataclasses.replace(settings, host_pool_blocks=0,
                                       host_cache_bytes=settings.host_pool_blocks * manifest.bytes_per_block)
    pool = host_tier(settings, manifest.bytes_per_block)
    if settings.flavour == ENGINE:
        from engines.tensorrt_llm.executor_llm import ExecutorLLM

        llm = ExecutorLLM(engine_dir / "engine", settings, llmapi=api, device_index=_cuda_index(decode_device),
                          transceiver=peer)
        if peer:
            ctx_llm = ExecutorLLM(engine_dir / "engine", settings, llmapi=api,
                                  device_index=_cuda_index(helper_devices[0]), transceiver=True)
    else:
        if decode_device != "cuda:0":
            raise EngineError(
                f"the LLM-API flavour decodes on visible device cuda:0 only, got {decode_device!r}: TensorRT-LLM's "
                "worker takes its GPU from its rank (global_rank % device_count), not from the caller; start the "
                "server with CUDA_VISIBLE_DEVICES=<that GPU> instead")
        connector = isinstance(pool, HostKvPool)
        if connector:
            os.environ.setdefault(SINGLE_PROCESS_ENV, "1")
            host_pool.bind(pool)
        llm = api.LLM(**llm_kwargs(api, settings, str(engine_dir), connector=connector, transceiver=peer))
        if peer:  # its own process, where the helper GPU is visible device 0 (context_process)
            from engines.tensorrt_llm.context_process import ContextProcessLLM

            ctx_llm = ContextProcessLLM(engine_dir, settings, helper_devices[0])
    return dict(api=api, llm=llm, settings=settings, model=_model_info(manifest),
                bytes_per_block=manifest.bytes_per_block, kv_blocks=kv_blocks or manifest.kv_blocks_device,
                device=decode_device, pool=pool, ctx_llm=ctx_llm, helper_device=helper_devices[0] if peer else None)


def host_tier(settings: TrtllmSettings, bytes_per_block: int) -> HostKvPool | HostCacheBooks | None:
    """The orchestrator's host pool behind the KV connector, else TensorRT-LLM's own host cache, else none."""
    if settings.host_pool_blocks:
        return HostKvPool(settings.host_pool_blocks, settings.tokens_per_block)
    blocks = settings.host_cache_bytes // bytes_per_block
    return HostCacheBooks(blocks, settings.tokens_per_block) if blocks else None


def _model_info(manifest) -> ModelInfo:
    m = manifest.extra.get("model", {})
    return ModelInfo(architecture=manifest.architecture, vocab_size=m["vocab_size"], max_seq_len=manifest.max_seq_len,
                     num_layers=m["num_layers"], num_kv_heads=m["num_kv_heads"], head_dim=m["head_dim"],
                     dtype=manifest.dtype, num_params=manifest.num_params, eos_token_ids=manifest.eos_token_ids,
                     bos_token_id=manifest.bos_token_id)


def _cuda_index(device: str) -> int:
    """The GPU ordinal of "cuda:N" (the Executor's `ParallelConfig(device_ids=[N])`)."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or not index.isdigit():
        raise EngineError(f"the TensorRT-LLM engine runs on CUDA devices named cuda:N, got {device!r}")
    return int(index)


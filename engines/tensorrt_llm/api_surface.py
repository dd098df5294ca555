"""Every TensorRT-LLM name this adapter uses, with the parameters it passes and a source link.

This list is the adapter's whole dependency on TensorRT-LLM. The test fake
(`tests/engines/tensorrt_llm/fake_trtllm.py`) is checked against it: each name must exist there
with at least the parameters listed, so the adapter cannot start using a name or a parameter
without it being written down here, with the place in NVIDIA's public source that documents it.

Links point at the v1.2.1 tag (the newest PyPI release, 2026), which has both flavours; the
LLM-API names are unchanged on `main` unless `flavour` says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

SRC = "https://github.com/NVIDIA/TensorRT-LLM/blob/v1.2.1/"
DOCS = "https://nvidia.github.io/TensorRT-LLM/"

LLM_API = "llm_api"
"""Flavour: `tensorrt_llm.LLM` on the PyTorch backend (1.0 and later)."""
ENGINE = "engine"
"""Flavour: a TensorRT engine directory built by `trtllm-build`, served by the C++ Executor
(1.2.x and earlier 1.x only; the TensorRT backend and the Executor were removed after 1.2)."""


@dataclass(frozen=True, slots=True)
class ApiName:
    """One TensorRT-LLM name the adapter touches."""

    module: str
    """Import path of the module that defines or exports it."""
    name: str
    """Attribute name in `module`; "Class.method" for a method, "Enum.MEMBER" for a member."""
    kind: str
    """"class", "method", "enum", "attribute" (fields read from an object), "env" (an environment
    variable it sets) or "cli" (a command it runs)."""
    params: tuple[str, ...]
    """Keyword parameters the adapter passes (for "attribute": the fields it reads)."""
    source: str
    """Where the public source or documentation defines it."""
    flavour: tuple[str, ...] = (LLM_API,)
    """Flavours that use it."""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


_LLMAPI = "tensorrt_llm.llmapi"
_ARGS = SRC + "tensorrt_llm/llmapi/llm_args.py"
_LLM = SRC + "tensorrt_llm/llmapi/llm.py"
_CONNECTOR = "tensorrt_llm._torch.pyexecutor.kv_cache_connector"
"""1.x; `main` moved it to `...pyexecutor.connectors.kv_cache_connector` (connector_classes tries both)."""
_CONNECTOR_SRC = SRC + "tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py"
_BOTH = (LLM_API, ENGINE)
_EXEC = "tensorrt_llm.bindings.executor"
_NB = SRC + "cpp/tensorrt_llm/nanobind/executor/"
"""1.2 builds its bindings with nanobind (pybind has the same names; see `ContextPhaseParams`)."""

API_SURFACE: tuple[ApiName, ...] = (
    # --- running requests: the LLM API ---
    ApiName(_LLMAPI, "LLM", "class",
            ("model", "dtype", "max_batch_size", "max_seq_len", "max_num_tokens", "kv_cache_config", "scheduler_config",
             "enable_chunked_prefill", "cache_transceiver_config", "kv_connector_config"), _LLM),
    ApiName(_LLMAPI, "LLM.generate_async", "method",
            ("inputs", "sampling_params", "streaming", "kv_cache_retention_config", "disaggregated_params"), _LLM),
    ApiName(_LLMAPI, "LLM.shutdown", "method", (), _LLM),
    ApiName(_LLMAPI, "RequestOutput", "attribute", ("outputs", "finished", "__aiter__"),
            SRC + "tensorrt_llm/executor/result.py"),
    ApiName(_LLMAPI, "RequestOutput.abort", "method", (), SRC + "tensorrt_llm/executor/result.py"),
    ApiName(_LLMAPI, "CompletionOutput", "attribute", ("token_ids", "disaggregated_params"),
            SRC + "tensorrt_llm/executor/result.py"),
    # (the engine flavour builds SamplingParams too; executor_llm reads these fields back)
    ApiName(_LLMAPI, "SamplingParams", "class",
            ("max_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos", "detokenize"),
            SRC + "tensorrt_llm/sampling_params.py", _BOTH),
    # --- running requests: the C++ Executor over a TensorRT engine (1.2.x; executor_llm.py) ---
    ApiName(_EXEC, "Executor", "class", ("model_path", "model_type", "executor_config"), _NB + "executor.cpp",
            (ENGINE,)),
    ApiName(_EXEC, "Executor.enqueue_request", "method", ("request",), _NB + "executor.cpp", (ENGINE,)),
    ApiName(_EXEC, "Executor.await_responses", "method", ("timeout",), _NB + "executor.cpp", (ENGINE,)),
    ApiName(_EXEC, "Executor.cancel_request", "method", ("id",), _NB + "executor.cpp", (ENGINE,)),
    ApiName(_EXEC, "Executor.shutdown", "method", (), _NB + "executor.cpp", (ENGINE,)),
    ApiName(_EXEC, "ModelType.DECODER_ONLY", "enum", (), _NB + "bindings.cpp", (ENGINE,)),
    ApiName(_EXEC, "Request", "class",
            ("input_token_ids", "max_tokens", "streaming", "sampling_config", "end_id", "kv_cache_retention_config",
             "type", "context_phase_params"), _NB + "request.cpp", (ENGINE,)),
    ApiName(_EXEC, "RequestType.REQUEST_TYPE_CONTEXT_ONLY", "enum", (), _NB + "bindings.cpp", (ENGINE,)),
    ApiName(_EXEC, "RequestType.REQUEST_TYPE_GENERATION_ONLY", "enum", (), _NB + "bindings.cpp", (ENGINE,)),
    ApiName(_EXEC, "SamplingConfig", "class", ("beam_width", "top_k", "top_p", "temperature", "seed"),
            _NB + "request.cpp", (ENGINE,)),
    ApiName(_EXEC, "Response", "attribute", ("request_id", "has_error", "error_msg", "result"), _NB + "request.cpp",
            (ENGINE,)),
    ApiName(_EXEC, "Result", "attribute", ("output_token_ids", "is_final", "context_phase_params"),
            _NB + "request.cpp", (ENGINE,)),
    # positional: the pybind build names no arguments (nanobind: first_gen_tokens, req_id, opaque_state, draft_tokens)
    ApiName(_EXEC, "ContextPhaseParams", "class", ("first_gen_tokens", "req_id", "opaque_state", "draft_tokens"),
            _NB + "request.cpp", (ENGINE,)),
    # --- admission of externally formed batches ---
    ApiName(_LLMAPI, "KvCacheConfig", "class",
            ("free_gpu_memory_fraction", "max_tokens", "tokens_per_block", "enable_block_reuse", "host_cache_size"),
            _ARGS),
    # newer versions only (main, 2026): passed where the field exists (llm_settings.V2_FIELD)
    ApiName(_LLMAPI, "KvCacheConfig", "class", ("use_kv_cache_manager_v2",),
            "https://github.com/NVIDIA/TensorRT-LLM/blob/main/tensorrt_llm/llmapi/llm_args.py"),
    ApiName(_LLMAPI, "SchedulerConfig", "class", ("capacity_scheduler_policy",), _ARGS),
    ApiName(_LLMAPI, "CapacitySchedulerPolicy.GUARANTEED_NO_EVICT", "enum", (), _ARGS),
    ApiName(_EXEC, "ExecutorConfig", "class",
            ("max_beam_width", "scheduler_config", "kv_cache_config", "enable_chunked_context", "max_batch_size",
             "parallel_config", "cache_transceiver_config"), _NB + "executorConfig.cpp", (ENGINE,)),
    ApiName(_EXEC, "KvCacheConfig", "class",
            ("enable_block_reuse", "max_tokens", "free_gpu_memory_fraction", "host_cache_size"),
            _NB + "executorConfig.cpp", (ENGINE,)),
    ApiName(_EXEC, "SchedulerConfig", "class", ("capacity_scheduler_policy",), _NB + "executorConfig.cpp", (ENGINE,)),
    ApiName(_EXEC, "CapacitySchedulerPolicy.GUARANTEED_NO_EVICT", "enum", (), _NB + "bindings.cpp", (ENGINE,)),
    ApiName(_EXEC, "ParallelConfig", "class", ("device_ids",), _NB + "executorConfig.cpp", (ENGINE,)),
    # --- retention priorities (staged batch stays resident) ---
    ApiName(_LLMAPI, "KvCacheRetentionConfig", "class",
            ("token_range_retention_configs", "decode_retention_priority"),
            SRC + "cpp/tensorrt_llm/pybind/executor/request.cpp", _BOTH),
    ApiName(_LLMAPI, "KvCacheRetentionConfig.TokenRangeRetentionConfig", "class",
            ("token_start", "token_end", "priority"),
            SRC + "cpp/tensorrt_llm/pybind/executor/request.cpp", _BOTH),
    # --- host KV pool through the KV Cache Connector (PyTorch backend only) ---
    ApiName("tensorrt_llm.llmapi.llm_args", "KvCacheConnectorConfig", "class",
            ("connector_module", "connector_scheduler_class", "connector_worker_class"), _ARGS),
    ApiName(_CONNECTOR, "KvCacheConnectorScheduler", "class", ("llm_args",), _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorScheduler.get_num_new_matched_tokens", "method",
            ("request", "num_computed_tokens"), _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorScheduler.update_state_after_alloc", "method",
            ("request", "block_ids"), _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorScheduler.build_connector_meta", "method",
            ("scheduler_output",), _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorScheduler.request_finished", "method",
            ("request", "cache_block_ids"), _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorWorker", "class", ("llm_args",), _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorWorker.get_connector_meta", "method", (), _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorWorker.register_kv_caches", "method", ("kv_cache_tensor",),
            _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorWorker.start_load_kv", "method", ("stream",), _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorWorker.wait_for_layer_load", "method", ("layer_idx", "stream"),
            _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorWorker.save_kv_layer", "method", ("layer_idx", "stream"),
            _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorWorker.wait_for_save", "method", ("stream",), _CONNECTOR_SRC),
    ApiName(_CONNECTOR, "KvCacheConnectorWorker.get_finished", "method",
            ("finished_gen_req_ids", "started_loading_req_ids"), _CONNECTOR_SRC),
    # read once (cached) by the first LLM of the process; tensor-parallel size 1 only
    ApiName("os.environ", "TLLM_WORKER_USE_SINGLE_PROCESS", "env", ("1",), SRC + "tensorrt_llm/llmapi/utils.py"),
    # request_id is the executor's internal id (the same in every connector call); the adapter never
    # compares it with RequestOutput ids: it recognises its requests by their tokens
    ApiName("tensorrt_llm.bindings.internal.batch_manager", "LlmRequest", "attribute",
            ("request_id", "get_tokens"), SRC + "tensorrt_llm/_torch/pyexecutor/llm_request.py"),
    # --- peer prefetch: disaggregated context-only / generation-only requests ---
    ApiName(_LLMAPI, "DisaggregatedParams", "class",
            ("request_type", "first_gen_tokens", "ctx_request_id", "opaque_state", "draft_tokens"),
            SRC + "tensorrt_llm/disaggregated_params.py", _BOTH),
    ApiName(_LLMAPI, "CacheTransceiverConfig", "class", ("backend",), _ARGS),
    ApiName(_EXEC, "CacheTransceiverConfig", "class", ("backend",), _NB + "executorConfig.cpp", (ENGINE,)),
    ApiName(_EXEC, "CacheTransceiverBackendType.NIXL", "enum", (), _NB + "executorConfig.cpp", (ENGINE,)),
    ApiName(_EXEC, "CacheTransceiverBackendType.UCX", "enum", (), _NB + "executorConfig.cpp", (ENGINE,)),
    # --- building (make build-engine BACKEND=trtllm) ---
    ApiName("tensorrt_llm.models", "MODEL_MAP", "attribute", ("__getitem__",),
            SRC + "tensorrt_llm/models/__init__.py", (ENGINE,)),
    # a classmethod of each concrete model (MODEL_MAP's values), not of PretrainedModel; its first
    # parameter's name differs between models, so the adapter passes it positionally
    ApiName("tensorrt_llm.models", "LLaMAForCausalLM.from_hugging_face", "method", ("hf_model_or_dir", "dtype"),
            SRC + "tensorrt_llm/models/llama/model.py", (ENGINE,)),
    ApiName("tensorrt_llm.models", "PretrainedModel.save_checkpoint", "method", ("output_dir",),
            SRC + "tensorrt_llm/models/modeling_utils.py", (ENGINE,)),
    ApiName("trtllm-build", "trtllm-build", "cli",
            ("--checkpoint_dir", "--output_dir", "--max_batch_size", "--max_seq_len", "--max_input_len",
             "--max_num_tokens", "--kv_cache_type", "--tokens_per_block", "--gemm_plugin"),
            SRC + "tensorrt_llm/commands/build.py", (ENGINE,)),
)
"""Every name, in the order the adapter's layers use them."""

DISTRIBUTION = "tensorrt-llm"
"""The package's distribution name; its version is read with importlib.metadata, without importing it."""


def names(kind: str | None = None, flavour: str | None = None) -> tuple[ApiName, ...]:
    """The listed names of one kind and/or flavour."""
    return tuple(a for a in API_SURFACE if (kind is None or a.kind == kind)
                 and (flavour is None or flavour in a.flavour))

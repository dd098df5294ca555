"""The TensorRT-LLM backend: the engine contract over NVIDIA's TensorRT-LLM (docs/tensorrt-llm.md).

Nothing in this package imports `tensorrt_llm` when it is imported: the package is reached only
through `engines.tensorrt_llm.lazy_import`, at the moment an engine is built or served, so the
orchestrator and the tests run on machines without it.

One file per concept:
- `api_surface`: every TensorRT-LLM name the adapter uses, with a source link per name.
- `lazy_import`: the lazy import, the error when it is missing, and the flavour picked by version.
- `llm_settings`: the `LLM()` keyword arguments the orchestrator needs.
- `admission`: slots of the externally formed batch.
- `host_pool`: the orchestrator's host KV pool (which request's KV sits in which host blocks).
- `kv_connector`: the connector's decisions (scheduler side) and copies (worker side).
- `connector_classes`: those two, as subclasses of TensorRT-LLM's connector base classes.
- `host_cache`: the Executor flavour's host tier, TensorRT-LLM's own host cache, and the books on it.
- `executor_llm`: `ExecutorLLM`, the 1.2.x C++ Executor behind the LLM-API calls the engine makes.
- `retention`: `KvCacheRetentionConfig` priorities per request role.
- `token_streams`: draining each request's output stream into a queue of tokens.
- `disagg`: the context-only / generation-only hand-off between two instances (peer prefetch).
- `sampling`: the orchestrator's sampling settings as TensorRT-LLM's `SamplingParams`.
- `request_state`: the engine's books on each request and each move in flight.
- `instances`: what an engine directory opens into (the LLM or Executor instances, the host tier).
- `engine`: `TrtllmEngine`, the contract itself.

Its build, `make build-engine BACKEND=trtllm`, is a build script: `build_scripts/trtllm_build.py`.
"""

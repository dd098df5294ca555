"""The context instance's own process (engines/tensorrt_llm/context_process.py): which GPU it is
given, how a failed start is reported, and that it never outlives the engine's process."""
from __future__ import annotations

import pytest

from engines.base import EngineError
from engines.tensorrt_llm.context_process import PRELOAD_ENV, ContextProcessLLM, physical_gpu
from engines.tensorrt_llm.llm_settings import TrtllmSettings

SETTINGS = TrtllmSettings(max_batch_size=2, max_seq_len=64, tokens_per_block=8, cache_transceiver_backend="NIXL")


def test_the_helper_gpu_is_named_as_the_engine_process_sees_it(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert physical_gpu("cuda:3") == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5, 7")
    assert physical_gpu("cuda:1") == "7"
    with pytest.raises(EngineError, match="not one of the 2 devices"):
        physical_gpu("cuda:2")
    with pytest.raises(EngineError, match="cuda:N"):
        physical_gpu("cpu")


def test_a_child_without_tensorrt_llm_fails_to_start_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    with pytest.raises(EngineError, match="context instance on cuda:1 failed to start: .*TensorRT-LLM"):
        ContextProcessLLM(tmp_path, SETTINGS, "cuda:1", start_timeout_s=120)


def test_the_child_exits_when_the_engine_process_goes(fake, tmp_path, monkeypatch):
    """Its pipe closes when the engine's process dies (any signal): the child shuts its LLM down."""
    monkeypatch.setenv(PRELOAD_ENV, f"{fake.__file__}:install_in_child")
    llm = ContextProcessLLM(tmp_path, SETTINGS, "cuda:0", start_timeout_s=120)
    assert llm._proc.is_alive()
    llm._conn.close()  # what the engine process's death does to the pipe
    llm._proc.join(timeout=30)
    assert llm._proc.exitcode == 0

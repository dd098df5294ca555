"""The context instance's own process (engines/tensorrt_llm/context_process.py): which GPU it is
given, how a failed start is reported, and that it never outlives the engine's process."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines.base import EngineError
from engines.tensorrt_llm.context_process import PRELOAD_ENV, ContextProcessLLM, physical_gpu
from engines.tensorrt_llm.llm_settings import TrtllmSettings
from serving.lifecycle import alive

REPO = Path(__file__).resolve().parents[3]
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


def test_the_child_exits_when_the_engine_process_is_killed(fake, tmp_path):
    """SIGKILL of the engine's process (nothing runs there to shut the child down): the child sees
    its parent go and exits, freeing the helper GPU."""
    script = tmp_path / "engine_process.py"
    script.write_text(
        "import sys, time\n"
        "from engines.tensorrt_llm.context_process import ContextProcessLLM\n"
        "from engines.tensorrt_llm.llm_settings import TrtllmSettings\n"
        "if __name__ == '__main__':\n"
        "    s = TrtllmSettings(max_batch_size=2, max_seq_len=64, tokens_per_block=8, cache_transceiver_backend='NIXL')\n"
        f"    llm = ContextProcessLLM({str(tmp_path)!r}, s, 'cuda:0', start_timeout_s=120)\n"
        "    print(llm._proc.pid, flush=True)\n"
        "    time.sleep(600)\n")
    env = {**os.environ, PRELOAD_ENV: f"{fake.__file__}:install_in_child",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        child = int(proc.stdout.readline())
        assert alive(child)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child)
    finally:
        proc.kill()

"""Fixtures of the TensorRT-LLM adapter tests: the fake TensorRT-LLM, installed only per test."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from engines.base import ModelInfo
from engines.tensorrt_llm import host_pool
from engines.tensorrt_llm.api_surface import ENGINE, LLM_API
from engines.tensorrt_llm.llm_settings import TrtllmSettings, llm_kwargs

_FAKE_PATH = Path(__file__).with_name("fake_trtllm.py")


def _load_fake():
    name = "alignedserve_tests_fake_trtllm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _FAKE_PATH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture
def fake():
    """The fake module itself (not installed as tensorrt_llm)."""
    return _load_fake()


@pytest.fixture
def trtllm(fake, monkeypatch):
    """The fake installed as `tensorrt_llm` for this test; returns the fake module."""
    fake.install(monkeypatch)
    yield fake
    host_pool.bind(None)


BYTES_PER_BLOCK = 1024
MODEL = ModelInfo(architecture="LlamaForCausalLM", vocab_size=128, max_seq_len=128, num_layers=2, num_kv_heads=2,
                  head_dim=8, dtype="bfloat16", num_params=1000, eos_token_ids=(2,), bos_token_id=1)


@pytest.fixture(params=[LLM_API, ENGINE])
def flavour(request):
    """Both flavours: the LLM API (PyTorch backend) and the 1.2.x C++ Executor."""
    return request.param


@pytest.fixture
def core():
    """The fake executor under an engine's `llm` (FakeLLM itself, or the FakeExecutor in an ExecutorLLM)."""
    return lambda llm: getattr(llm, "executor", llm)


@pytest.fixture
def make_engine(trtllm, tmp_path):
    """Build a TrtllmEngine over fake instances of either flavour; every engine is closed after the test."""
    from engines.tensorrt_llm.engine import TrtllmEngine
    from engines.tensorrt_llm.instances import host_tier
    from engines.tensorrt_llm.executor_llm import ExecutorLLM

    made = []

    def make(*, slots: int = 4, host_blocks: int = 0, peer: bool = False, block_size: int = 4, timeout_s: float = 10,
             flavour: str = LLM_API, max_seq_len: int = MODEL.max_seq_len):
        engine_flavour = flavour == ENGINE
        model = dataclasses.replace(MODEL, max_seq_len=max_seq_len)
        settings = TrtllmSettings(max_batch_size=slots, max_seq_len=max_seq_len, tokens_per_block=block_size,
                                  flavour=flavour, host_pool_blocks=0 if engine_flavour else host_blocks,
                                  host_cache_bytes=host_blocks * BYTES_PER_BLOCK if engine_flavour else 0,
                                  cache_transceiver_backend="NIXL" if peer else None)
        api = sys.modules["tensorrt_llm.llmapi"]
        pool = host_tier(settings, BYTES_PER_BLOCK)
        if engine_flavour:
            engine_dir = tmp_path / f"engine{len(made)}"
            engine_dir.mkdir()
            (engine_dir / "config.json").write_text(json.dumps({"build_config": {
                "max_batch_size": slots, "max_seq_len": max_seq_len, "tokens_per_block": block_size}}))
            bindings = sys.modules["tensorrt_llm.bindings.executor"]
            llm = ExecutorLLM(engine_dir, settings, llmapi=api, bindings=bindings, device_index=0, transceiver=peer)
            ctx = ExecutorLLM(engine_dir, settings, llmapi=api, bindings=bindings, device_index=1,
                              transceiver=True) if peer else None
        else:
            host_pool.bind(pool)
            llm = api.LLM(**llm_kwargs(api, settings, "fake-model", connector=pool is not None, transceiver=peer))
            ctx = api.LLM(**llm_kwargs(api, settings, "fake-model", connector=False, transceiver=True)) if peer else None
        engine = TrtllmEngine(api, llm, settings, model, bytes_per_block=BYTES_PER_BLOCK,
                              kv_blocks=trtllm.FakeLLM.NUM_BLOCKS, pool=pool, ctx_llm=ctx,
                              helper_device="cuda:1" if peer else None, timeout_s=timeout_s)
        made.append(engine)
        return engine

    yield make
    for e in made:
        e.close()

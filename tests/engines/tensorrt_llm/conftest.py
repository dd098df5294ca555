"""Fixtures of the TensorRT-LLM adapter tests: the fake TensorRT-LLM, installed only per test."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from engines.base import ModelInfo
from engines.tensorrt_llm import host_pool
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


MODEL = ModelInfo(architecture="LlamaForCausalLM", vocab_size=128, max_seq_len=128, num_layers=2, num_kv_heads=2,
                  head_dim=8, dtype="bfloat16", num_params=1000, eos_token_ids=(2,), bos_token_id=1)


@pytest.fixture
def make_engine(trtllm):
    """Build a TrtllmEngine over fake LLM instances; every engine is closed after the test."""
    from engines.tensorrt_llm.engine import TrtllmEngine
    from engines.tensorrt_llm.host_pool import HostKvPool

    made = []

    def make(*, slots: int = 4, host_blocks: int = 0, peer: bool = False, block_size: int = 4, timeout_s: float = 10):
        settings = TrtllmSettings(max_batch_size=slots, max_seq_len=MODEL.max_seq_len, tokens_per_block=block_size,
                                  host_pool_blocks=host_blocks, cache_transceiver_backend="NIXL" if peer else None)
        api = sys.modules["tensorrt_llm.llmapi"]
        pool = HostKvPool(host_blocks, block_size) if host_blocks else None
        host_pool.bind(pool)
        llm = api.LLM(**llm_kwargs(api, settings, "fake-model", connector=pool is not None, transceiver=peer))
        ctx = api.LLM(**llm_kwargs(api, settings, "fake-model", connector=False, transceiver=True)) if peer else None
        engine = TrtllmEngine(api, llm, settings, MODEL, bytes_per_block=1024, kv_blocks=trtllm.FakeLLM.NUM_BLOCKS,
                              pool=pool, ctx_llm=ctx, helper_device="cuda:1" if peer else None, timeout_s=timeout_s)
        made.append(engine)
        return engine

    yield make
    for e in made:
        e.close()

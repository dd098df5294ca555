"""A tiny random Llama shared by the engine tests (2 layers, GQA 4/2, vocab 128)."""
from __future__ import annotations

import pytest

from build_scripts.random_checkpoint import write_random_checkpoint
from tests.engines import torch_probe

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "bos_token_id": 1, "eos_token_id": 2,
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Checkpoint directory of the tiny Llama (seed 0)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    write_random_checkpoint(path, TINY_LLAMA, seed=0)
    return path


def _fail_next_copy(engine, disarm: bool = False) -> None:
    """Make the engine's next KV copy fail halfway: once the copy worker reaches it, it fills the
    destination blocks with garbage and reports a failure (so it stays pending while the worker is
    held, and an engine that kept the destination would show the garbage). disarm: undo it."""
    if disarm:
        torch_probe.disarm_copy_failure(engine)
    else:
        torch_probe.fail_next_copy(engine, garbage=True)


@pytest.fixture(scope="session")
def fail_next_copy():
    """`fail_next_copy(engine)`: the engine's next KV copy fails (see `_fail_next_copy`)."""
    return _fail_next_copy


@pytest.fixture(scope="module")
def hf(model_dir):
    """transformers' model on the tiny Llama checkpoint, float32: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def float32_engine(model_dir):
    """The torch engine on the same checkpoint, float32, blocks of 4 tokens."""
    from engines.torch.engine import TorchEngine

    return TorchEngine(model_dir, device="cpu", block_size=4, dtype="float32")

"""A tiny random Llama shared by the engine tests (2 layers, GQA 4/2, vocab 128)."""
from __future__ import annotations

import pytest

from build_scripts.random_checkpoint import write_random_checkpoint

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
    import torch

    from engines.torch.kv_transfer import PendingCopy

    copier = engine._copier
    copier.__dict__.pop("start", None)
    if disarm:
        return

    def failing_start(src, src_blocks, dst, dst_blocks):
        del copier.start  # one failure only

        def fail():
            # Finite: freed blocks' tails are read (masked) by later attention, and NaN * 0 is NaN.
            garbage = torch.full_like(src.gather(src_blocks, dst.device), 123.0)
            dst.scatter(dst_blocks, garbage)
            raise RuntimeError("injected copy failure")
        return PendingCopy(future=copier._worker.submit(fail))

    copier.start = failing_start


@pytest.fixture(scope="session")
def fail_next_copy():
    """`fail_next_copy(engine)`: the engine's next KV copy fails (see `_fail_next_copy`)."""
    return _fail_next_copy

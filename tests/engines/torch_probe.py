"""Test-side views into a `TorchEngine`, kept out of the production class.

The tests compare the logits behind the engine's tokens with transformers, read a request's KV
back from whichever tier holds it, and hold or fail KV copies. Each helper takes the engine as
its first argument, so it works on any instance, one opened by `engines.loader.load_engine`
included:

    result, logits = decode_with_logits(engine, ["a", "b"])
    assert torch.equal(kv_contents(engine, "a"), before)
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Sequence

import torch

from engines.base import IN_FLIGHT, EngineError, PrefillChunk, PrefillRequest, StepResult
from engines.torch.engine import TorchEngine
from engines.torch.kv_cache import PagedKVCache
from engines.torch.kv_transfer import BlockCopier, PendingCopy


def prefill_with_logits(engine: TorchEngine, requests: Sequence[PrefillRequest], device: str | None = None,
                        all_positions: bool = False) -> tuple[StepResult, torch.Tensor]:
    """`engine.prefill`, also returning the float32 logits: [B, vocab] of each prompt's last
    token, or [B, longest prompt, vocab] of every position (pads hold garbage) when all_positions."""
    return engine._run_prefill(requests, device, all_positions)


def decode_with_logits(engine: TorchEngine, request_ids: Sequence[str]) -> tuple[StepResult, torch.Tensor]:
    """`engine.decode`, also returning the float32 logits [B, vocab] the tokens were sampled from."""
    return engine._run_decode(request_ids)


def mixed_step_with_logits(engine: TorchEngine, request_ids: Sequence[str],
                           chunks: Sequence[PrefillChunk]) -> tuple[StepResult, torch.Tensor]:
    """`engine.mixed_step`, also returning the float32 logits [B, vocab] of each sequence's last
    position: the decoded requests first, then the chunks, in call order."""
    return engine._run_mixed(request_ids, chunks)


def kv_contents(engine: TorchEngine, request_id: str) -> torch.Tensor:
    """A CPU copy of the request's KV, [num_layers, 2 (K, V), kv_len, kv_heads, head_dim], read
    from whichever tier holds it."""
    tier = engine.tier_of(request_id)
    if tier == IN_FLIGHT:
        raise EngineError(f"kv_contents: request {request_id!r} is {IN_FLIGHT}; wait on its move first")
    pool = engine._tiers.pools[tier]
    # Gathered where the pool is, then a blocking .cpu(): no copy still in the air when read.
    blocks = pool.gather(pool.tables[request_id], pool.device).movedim(0, 2)  # [L, 2, n, block, heads, dim]
    layers, two, n, block, heads, dim = blocks.shape
    return blocks.reshape(layers, two, n * block, heads, dim)[:, :, : engine._seqs[request_id].kv_len].cpu()


def kv_len(engine: TorchEngine, request_id: str) -> int:
    """Tokens of KV the request holds now."""
    return engine._seqs[request_id].kv_len


def cache_of(engine: TorchEngine, tier: str) -> PagedKVCache:
    """The KV cache of one device tier."""
    return engine._devices[tier].cache


def copier_of(engine: TorchEngine) -> BlockCopier:
    """The copier every move of the engine goes through."""
    return engine._tiers.copier


def hold_copies(engine: TorchEngine, until) -> None:
    """Queue `until` (e.g. a threading.Event's wait) on the copy worker: copies started after it
    wait for it to return, so their moves stay in flight."""
    copier_of(engine)._worker.submit(until)


def fail_next_copy(engine: TorchEngine, garbage: bool = False) -> None:
    """Make the engine's next KV copy fail, once. The move still starts (its destination blocks
    are taken); then the copy reports a failure, and the engine must give those blocks back and
    keep the KV where it was.

    garbage=False: the copy has failed by the time it is started. garbage=True: the copy runs on
    the copy worker (so it stays pending while the worker is held), fills the destination blocks
    with garbage and then fails, so an engine that kept the destination would show the garbage."""
    copier = copier_of(engine)

    def failing_start(src, src_blocks, dst, dst_blocks):
        del copier.start  # one failure only
        if not garbage:
            failed = Future()
            failed.set_exception(RuntimeError("injected copy failure"))
            return PendingCopy(future=failed)

        def fail():
            # Finite: freed blocks' tails are read (masked) by later attention, and NaN * 0 is NaN.
            dst.scatter(dst_blocks, torch.full_like(src.gather(src_blocks, dst.device), 123.0))
            raise RuntimeError("injected copy failure")
        return PendingCopy(future=copier._worker.submit(fail))

    copier.start = failing_start


def disarm_copy_failure(engine: TorchEngine) -> None:
    """Undo `fail_next_copy` if its copy has not been started yet."""
    copier_of(engine).__dict__.pop("start", None)

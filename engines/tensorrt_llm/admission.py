"""Slots and KV of the externally formed batch: admission control is how batches are formed under TensorRT-LLM.

TensorRT-LLM has no call that puts chosen requests into one iteration. With
`max_batch_size` = the slots here, `GUARANTEED_NO_EVICT` and chunked context off, every request
the engine submits is scheduled in the next iteration and stays until it ends, so submitting the
orchestrator's aligned batch when slots are free *is* running that batch.

That holds only while the executor can also reserve the request's KV: GUARANTEED_NO_EVICT admits a
request once the blocks for its prompt plus its whole `max_tokens` are free
(`KVCacheManager::getRemainingBlocksToCompletion`, cpp/tensorrt_llm/batch_manager/kvCacheManager.cpp:
ceilDiv(promptLen + maxNewTokens, tokensPerBlock)); until then it queues the request silently. This
gate books the same reservation per request and refuses a submission that would exceed the slots
or the KV pool before anything is submitted, so the orchestrator never believes a request runs
that the executor is holding back.
"""
from __future__ import annotations

from typing import Mapping

from engines.base import EngineError


def reserved_blocks(tokens: int, max_tokens: int, max_seq_len: int, block_size: int) -> int:
    """Blocks GUARANTEED_NO_EVICT reserves for a request of `tokens` input tokens asking for
    `max_tokens` more (bounded by max_seq_len, as the executor's `validate` bounds max_tokens)."""
    return -(-min(tokens + max_tokens, max_seq_len) // block_size)


class AdmissionGate:
    """Which requests occupy the executor's slots, and the KV blocks it reserves for each."""

    def __init__(self, slots: int, blocks: int):
        if slots <= 0:
            raise ValueError(f"slots (max_batch_size) must be > 0, got {slots}")
        if blocks <= 0:
            raise ValueError(f"blocks (the executor's KV pool) must be > 0, got {blocks}")
        self.slots, self.blocks = slots, blocks
        self._held: dict[str, int] = {}

    def admit(self, reservations: Mapping[str, int], op: str) -> None:
        """Take a slot and the reserved blocks for each request (request id -> blocks), or refuse
        all of them (EngineError) if they do not fit."""
        new = {r: b for r, b in reservations.items() if r not in self._held}
        if len(self._held) + len(new) > self.slots:
            raise EngineError(
                f"{op}: {len(new)} more requests need slots but {len(self._held)} of max_batch_size={self.slots} "
                "are taken; free or park running requests first (TensorRT-LLM runs every admitted request)")
        need, free = sum(new.values()), self.blocks - self.reserved
        if need > free:
            raise EngineError(
                f"{op}: {len(new)} more requests reserve {need} KV blocks (prompt + max_tokens, as TensorRT-LLM's "
                f"GUARANTEED_NO_EVICT does) but {free} of {self.blocks} are free; TensorRT-LLM would queue them "
                "instead of running them")
        self._held.update(new)

    def release(self, request_ids) -> None:
        for r in request_ids:
            self._held.pop(r, None)

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    @property
    def used(self) -> int:
        return len(self._held)

    @property
    def reserved(self) -> int:
        """KV blocks the executor holds for the admitted requests."""
        return sum(self._held.values())

"""Slots of the externally formed batch: admission control is how batches are formed under TensorRT-LLM.

TensorRT-LLM has no call that puts chosen requests into one iteration. With
`max_batch_size` = the slots here, `GUARANTEED_NO_EVICT` and chunked context off, every request
the engine submits is scheduled in the next iteration and stays until it ends, so submitting the
orchestrator's aligned batch when slots are free *is* running that batch. This gate refuses a
submission that would exceed the slots before anything is submitted.
"""
from __future__ import annotations

from typing import Iterable

from engines.base import EngineError


class AdmissionGate:
    """Which requests occupy the executor's slots."""

    def __init__(self, slots: int):
        if slots <= 0:
            raise ValueError(f"slots (max_batch_size) must be > 0, got {slots}")
        self.slots = slots
        self._held: set[str] = set()

    def admit(self, request_ids: Iterable[str], op: str) -> None:
        """Take a slot for each request, or refuse all of them (EngineError) if they do not fit."""
        new = [r for r in request_ids if r not in self._held]
        if len(self._held) + len(new) > self.slots:
            raise EngineError(
                f"{op}: {len(new)} more requests need slots but {len(self._held)} of max_batch_size={self.slots} "
                "are taken; free or park running requests first (TensorRT-LLM runs every admitted request)")
        self._held.update(new)

    def release(self, request_ids: Iterable[str]) -> None:
        self._held.difference_update(request_ids)

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    @property
    def used(self) -> int:
        return len(self._held)

"""The host tier of the Executor flavour: TensorRT-LLM's own `host_cache_size`, and the books kept on it.

The C++ Executor has no KV connector, so nothing of ours copies KV there. What it has is block
reuse with a host tier: a request that ends (or is cancelled) leaves its blocks as reusable
cache; when the GPU needs them back, blocks whose retention priority is at least
`secondary_offload_min_priority` (30 by default; every AlignedServe priority is higher) are
copied to host memory instead of dropped, and a later request with the same tokens gets them
onboarded again instead of recomputed. Parking is therefore cancel, and resuming is resubmitting
the same tokens.

These books are what the orchestrator is told: each parked request's blocks, against the host
tier's size, so it never parks more than fits. TensorRT-LLM may still drop a parked request's
blocks (other cached prefixes compete for the same host tier); its resume then recomputes the
missing part: the same tokens, later. Same engine-facing calls as `HostKvPool`.
"""
from __future__ import annotations

import threading


class HostCacheBooks:
    """Blocks parked requests are expected to hold in TensorRT-LLM's host tier."""

    def __init__(self, blocks: int, block_size: int):
        if blocks < 0 or block_size <= 0:
            raise ValueError(f"host cache needs blocks >= 0 and block_size > 0, got {blocks}, {block_size}")
        self.blocks, self.block_size = blocks, block_size
        self._held: dict[str, int] = {}
        self._ended: set[str] = set()
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()

    def order_park(self, request_id: str, tokens: tuple[int, ...]) -> None:
        """Book the blocks of all tokens but the last (generated, never fed); full: the park fails."""
        need = -(-(len(tokens) - 1) // self.block_size)
        with self._lock:
            free = self.blocks - sum(self._held.values())
            if need > free:
                self._failed[request_id] = f"host KV pool full: {need} blocks needed, {free} of {self.blocks} free"
                return
            self._held[request_id] = need

    def mark_saved(self, request_id: str) -> None:
        """TensorRT-LLM ended the cancelled request: its blocks are reusable cache from now on."""
        with self._lock:
            if request_id in self._held:
                self._ended.add(request_id)

    def state(self, request_id: str) -> str:
        """"saving", "saved", "failed: <why>" or "none" (as `HostKvPool.state`)."""
        with self._lock:
            if request_id in self._failed:
                return "failed: " + self._failed[request_id]
            if request_id not in self._held:
                return "none"
            return "saved" if request_id in self._ended else "saving"

    def order_resume(self, request_id: str, tokens: tuple[int, ...]) -> None:
        """The request is resubmitted: TensorRT-LLM onboards what it kept, so the books close."""
        self.release(request_id)

    def release(self, request_id: str) -> None:
        with self._lock:
            self._held.pop(request_id, None)
            self._ended.discard(request_id)
            self._failed.pop(request_id, None)

    def used(self) -> int:
        with self._lock:
            return sum(self._held.values())

    def parked(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._held)

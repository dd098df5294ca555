"""The orchestrator's host KV pool under TensorRT-LLM: which parked request holds which host blocks.

TensorRT-LLM has no call that moves a chosen request's KV (docs/tensorrt-llm.md). What it does
offer is the KV Cache Connector, which it instantiates itself from a module path: a scheduler
side asked "how many of this new request's tokens can you load?" and told "this request
finished, here are its blocks", and a worker side that copies blocks. Parking and resuming are
built on those two moments:

- park: the engine leaves an *order* here (`order_park`) and aborts the request; when
  TensorRT-LLM reports it finished, the connector saves its blocks into host slots reserved here.
- resume: the engine leaves an order (`order_resume`) and submits the request again with its
  prompt plus the tokens generated so far; the connector recognises the tokens and loads the
  saved blocks instead of recomputing them, then the host slots are released.

The connector classes are built by TensorRT-LLM with its own arguments only, so engine and
connector meet through `bind` / `bound` (one pool per process: one decode engine per process).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(slots=True)
class ParkedKv:
    """One request's KV in the host pool (or on its way there)."""

    request_id: str
    kv_tokens: tuple[int, ...]
    """Tokens whose KV the slots hold, in order (prompt first)."""
    slots: list[int]
    saved: bool = False
    """The copy into `slots` has finished."""
    released: bool = False
    """Freed while its save was still running: the slots go back when the save ends."""


@dataclass(slots=True)
class _Orders:
    park: dict[str, tuple[int, ...]] = field(default_factory=dict)
    resume: dict[str, tuple[int, ...]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class HostKvPool:
    """Host block slots and the park/resume orders between the engine and the connector.

    Thread-safe: the engine calls it from the orchestrator's thread, the connector from
    TensorRT-LLM's executor thread."""

    def __init__(self, blocks: int, block_size: int):
        if blocks < 0 or block_size <= 0:
            raise ValueError(f"host pool needs blocks >= 0 and block_size > 0, got {blocks}, {block_size}")
        self.blocks = blocks
        self.block_size = block_size
        self._free = list(range(blocks - 1, -1, -1))
        self._entries: dict[str, ParkedKv] = {}
        self._orders = _Orders()
        self._lock = threading.Lock()

    # --- the engine's side ---
    def order_park(self, request_id: str, tokens: tuple[int, ...]) -> None:
        """Save this request's KV when TensorRT-LLM reports it finished (the engine aborts it next)."""
        with self._lock:
            self._orders.failed.pop(request_id, None)
            self._orders.park[request_id] = tuple(tokens)

    def order_resume(self, request_id: str, tokens: tuple[int, ...]) -> None:
        """Load this request's saved KV when a request with exactly these tokens is admitted."""
        with self._lock:
            self._orders.resume[request_id] = tuple(tokens)

    def state(self, request_id: str) -> str:
        """"saving", "saved", "failed: <why>" or "none"."""
        with self._lock:
            if request_id in self._orders.failed:
                return "failed: " + self._orders.failed[request_id]
            e = self._entries.get(request_id)
            if e is None:
                return "saving" if request_id in self._orders.park else "none"
            return "saved" if e.saved else "saving"

    def release(self, request_id: str) -> None:
        """Forget the request: its orders and its host slots (later, if a save is still running).
        Unknown ids are ignored."""
        with self._lock:
            self._orders.park.pop(request_id, None)
            self._orders.resume.pop(request_id, None)
            self._orders.failed.pop(request_id, None)
            e = self._entries.get(request_id)
            if e is None:
                return
            if e.saved:
                self._drop(e)
            else:
                e.released = True

    def used(self) -> int:
        """Host slots held right now (saved, or reserved for a save in progress)."""
        with self._lock:
            return self.blocks - len(self._free)

    def parked(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._entries)

    # --- the connector's side ---
    def claim_park(self, tokens: list[int] | tuple[int, ...]) -> ParkedKv | None:
        """For a request TensorRT-LLM just ended: if the engine parked it (its known tokens begin
        `tokens`), take the order and reserve host slots for the KV of all tokens but the last
        (generated, never fed). None for a request that simply finished, or when the pool is full
        (then `state` says why). One step under the lock, so a `release` racing it cannot leak."""
        with self._lock:
            rid = next((r for r, known in self._orders.park.items() if tuple(tokens[:len(known)]) == known), None)
            if rid is None:
                return None
            del self._orders.park[rid]
            kv_tokens = tuple(tokens[:-1])
            need = -(-len(kv_tokens) // self.block_size)
            if need > len(self._free):
                self._orders.failed[rid] = (f"host KV pool full: {need} blocks needed, {len(self._free)} of "
                                            f"{self.blocks} free")
                return None
            e = ParkedKv(rid, kv_tokens, [self._free.pop() for _ in range(need)])
            self._entries[rid] = e
            return e

    def fail(self, request_id: str, why: str) -> None:
        """A park could not save: the request's KV is gone; `state` reports why."""
        with self._lock:
            self._orders.failed[request_id] = why
            e = self._entries.get(request_id)
            if e is not None:
                self._drop(e)

    def mark_saved(self, request_id: str) -> None:
        with self._lock:
            e = self._entries.get(request_id)
            if e is None:
                return
            e.saved = True
            if e.released:
                self._drop(e)

    def match_resume(self, tokens: list[int] | tuple[int, ...]) -> ParkedKv | None:
        """The saved KV to load for a newly admitted request with these tokens, taking the order."""
        key = tuple(tokens)
        with self._lock:
            for rid, want in self._orders.resume.items():
                e = self._entries.get(rid)
                if want == key and e is not None and e.saved:
                    del self._orders.resume[rid]
                    return e
        return None

    def loaded(self, request_id: str) -> None:
        """The saved KV is back on the device: its host slots are free again."""
        with self._lock:
            e = self._entries.get(request_id)
            if e is not None:
                self._drop(e)

    def _drop(self, e: ParkedKv) -> None:
        del self._entries[e.request_id]
        self._free.extend(e.slots)
        e.slots = []


_bound: HostKvPool | None = None


def bind(pool: HostKvPool | None) -> None:
    """Make `pool` the one the connector classes of this process use (None: unbind)."""
    global _bound
    _bound = pool


def bound() -> HostKvPool:
    if _bound is None:
        raise RuntimeError("no host KV pool is bound in this process: the AlignedServe KV connector runs only in "
                           "the process of a TrtllmEngine (the executor must run in-process; docs/tensorrt-llm.md)")
    return _bound

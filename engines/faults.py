"""Fault injection: an engine whose next calls fail on purpose, so soak and fault tests can show
what a failure costs (only the requests it touches end, with a final error; no KV block leaks;
the server goes on serving).

Off unless asked for: the server wraps its engine in `FaultInjectingEngine` only with
`ServeConfig.fault_injection` (ALIGNED_FAULT_INJECTION=1, `make serve ... --fault-injection`), and
faults are armed through the admin API (`POST /api/faults`, behind the admin token) or by tests:

    engine = FaultInjectingEngine(load_engine(dir), hang_s=5.0)
    engine.faults.arm("decode_error")      # the next decode step raises
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Sequence

from engines.base import (HOST, Engine, EngineError, EngineInfo, OutOfKVBlocks, PrefillChunk, PrefillHandle,
                          PrefillRequest, StepResult, TransferHandle)

FAULTS = {
    "decode_error": "the next decode step (with or without prompt chunks) raises: every request in it ends "
                    "with an error",
    "prefill_error": "the next prefill raises: its requests end with an error",
    "copy_error": "the next KV copy between two tiers fails: the requests it moves end with an error",
    "copy_hang": "the next KV copy between two tiers hangs past the transfer timeout: the requests it moves "
                 "end with an error when it expires; its blocks are held until the copy ends",
    "host_full": "the next move to the host pool is refused as if the pool were out of blocks: the requests "
                 "it moves end with an error",
}
"""Fault kinds and what each does."""

MAX_ARMED = 1000
"""Most faults of one kind armed at once."""


class FaultInjector:
    """Faults armed and fired, by kind; armed from any thread, fired on the run loop's."""

    def __init__(self, kinds: Sequence[str] = tuple(FAULTS)):
        self.kinds = tuple(kinds)
        """The kinds this engine can fire."""
        self._armed: Counter[str] = Counter()
        self._fired: Counter[str] = Counter()
        self._lock = threading.Lock()

    def arm(self, kind: str, count: int = 1) -> None:
        """Make the next `count` chances of `kind` fail; ValueError names what is wrong."""
        if kind not in FAULTS:
            raise ValueError(f"kind: unknown fault {kind!r}; one of {', '.join(FAULTS)}")
        if kind not in self.kinds:
            raise ValueError(f"kind: this engine cannot inject {kind!r}; it can: {', '.join(self.kinds)}")
        if not 1 <= count <= MAX_ARMED:
            raise ValueError(f"count: must be in [1, {MAX_ARMED}], got {count}")
        with self._lock:
            self._armed[kind] += count

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def take(self, kind: str) -> bool:
        """Whether this chance of `kind` fails (and counts it fired)."""
        with self._lock:
            if self._armed[kind] <= 0:
                return False
            self._armed[kind] -= 1
            self._fired[kind] += 1
            return True

    def snapshot(self) -> dict:
        """{"kinds": [...], "armed": {kind: n}, "fired": {kind: n}}."""
        with self._lock:
            return {"kinds": list(self.kinds), "armed": {k: n for k, n in self._armed.items() if n},
                    "fired": dict(self._fired)}


class FaultInjectingEngine(Engine):
    """Another engine, unchanged until a fault is armed in `faults`. Copy faults need the engine's
    own hook (`inject_copy_fault(fault, hang_s)`: the torch and sim engines have one)."""

    def __init__(self, engine: Engine, hang_s: float = 60.0):
        """hang_s: how long an injected hung copy stays stuck before it fails (longer than the
        orchestrator's transfer timeout, so the timeout is what ends it)."""
        self.engine = engine
        self.hang_s = hang_s
        caps = engine.describe().capabilities
        kinds = ["decode_error", "prefill_error"]
        copies = hasattr(engine, "inject_copy_fault") and (caps.can_offload or caps.can_peer_copy)
        if copies:
            kinds.append("copy_error")
            if engine.describe().backend == "torch":
                kinds.append("copy_hang")
        if caps.can_offload:
            kinds.append("host_full")
        self.faults = FaultInjector(kinds)

    def _trip(self, kind: str, what: str) -> None:
        if self.faults.take(kind):
            raise EngineError(f"injected {what} failure ({kind})")

    # ---- the contract, with the faults in front ------------------------------------------------

    def describe(self) -> EngineInfo:
        return self.engine.describe()

    def prefill(self, requests: Sequence[PrefillRequest], device: str | None = None) -> StepResult:
        self._trip("prefill_error", "prefill")
        return self.engine.prefill(requests, device)

    def start_prefill(self, requests: Sequence[PrefillRequest], device: str) -> PrefillHandle:
        self._trip("prefill_error", "prefill")
        return self.engine.start_prefill(requests, device)

    def decode(self, request_ids: Sequence[str]) -> StepResult:
        self._trip("decode_error", "decode step")
        return self.engine.decode(request_ids)

    def mixed_step(self, request_ids: Sequence[str], chunks: Sequence[PrefillChunk]) -> StepResult:
        self._trip("decode_error", "decode step")
        return self.engine.mixed_step(request_ids, chunks)

    def move(self, request_ids: Sequence[str], src: str, dst: str) -> TransferHandle:
        if dst == HOST and self.faults.take("host_full"):
            raise OutOfKVBlocks(f"injected host pool exhaustion (host_full): no block for {len(request_ids)} "
                                "requests' KV")
        if self.faults.take("copy_error"):
            self.engine.inject_copy_fault("error")
        elif self.faults.take("copy_hang"):
            self.engine.inject_copy_fault("hang", self.hang_s)
        return self.engine.move(request_ids, src, dst)

    # ---- the rest, passed through --------------------------------------------------------------

    def free(self, request_ids: Sequence[str]) -> None:
        self.engine.free(request_ids)

    def tier_of(self, request_id: str) -> str:
        return self.engine.tier_of(request_id)

    def kv_blocks_used(self, tier: str) -> int:
        return self.engine.kv_blocks_used(tier)

    def poll(self, handle: TransferHandle) -> bool:
        return self.engine.poll(handle)

    def wait(self, handle: TransferHandle, timeout: float | None = None) -> None:
        self.engine.wait(handle, timeout)

    def abandon(self, handle: TransferHandle) -> str:
        return self.engine.abandon(handle)

    def prefill_result(self, handle: PrefillHandle) -> StepResult | None:
        return self.engine.prefill_result(handle)

    def wait_any(self, handles) -> None:
        self.engine.wait_any(handles)

    def close(self) -> None:
        self.engine.close()

    def __getattr__(self, name: str):
        # Anything beyond the contract (the torch engine's attention path, a sim engine's clock...).
        return getattr(self.__dict__["engine"], name)

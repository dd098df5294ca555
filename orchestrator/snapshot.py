"""The orchestrator as readers outside the run loop see it (the admin API, dashboards, scripts):
one copy of the pool, the KV tiers and the counters, taken without stopping the loop.

The run loop keeps changing the pool while a snapshot is taken: every part is copied first (a
copy of a list or deque is one C call, so it never sees a half-done update), and each request's
fields are then read one at a time into a frozen `RequestView`. A snapshot may be an iteration
stale; it is never inconsistent enough to raise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.base import HOST
from orchestrator.core import Request, RequestState
from orchestrator.lifecycle import RECENT_FINISHED

__all__ = ["PARTS", "RECENT_FINISHED", "RequestView", "Snapshot", "TierUsage", "view"]

PARTS = ("waiting", "prefilling", "running", "staged", "candidates", "parked")
"""The parts of the pool a snapshot lists, in the order a request usually passes them."""


@dataclass(frozen=True, slots=True)
class RequestView:
    """One request at the moment the snapshot was taken."""

    id: str
    state: str
    """A `RequestState` value: waiting, prefilling, running, parked, staged or finished."""
    tier: str | None
    """Where its KV is, or is going: a device, "host", or None (no KV)."""
    prompt_len: int
    kv_len: int
    max_kv_len: int
    tokens: int
    """Tokens generated so far."""
    max_tokens: int
    arrival_time: float
    finish_reason: str | None
    error: str | None

    @property
    def finished(self) -> bool:
        return self.state == RequestState.FINISHED.value


@dataclass(frozen=True, slots=True)
class TierUsage:
    """KV blocks of one tier (a device, or the host pool)."""

    used: int
    """Physical blocks the engine holds in the tier."""
    reserved: int
    """Blocks the orchestrator's ledger has granted in the tier."""
    capacity: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The orchestrator at one moment (`Orchestrator.snapshot()`)."""

    time: float
    """The run loop's clock (seconds; monotonic, or an engine's virtual time)."""
    policy: str
    draining: bool
    waiting: tuple[RequestView, ...]
    """Submitted requests not yet admitted (including those not yet taken into the pool)."""
    prefilling: tuple[RequestView, ...]
    running: tuple[RequestView, ...]
    staged: tuple[RequestView, ...]
    candidates: tuple[RequestView, ...]
    parked: tuple[RequestView, ...]
    """KV in the host pool, or on its way there."""
    finished: tuple[RequestView, ...]
    """The most recently finished requests (the newest RECENT_FINISHED), oldest first."""
    kv: dict[str, TierUsage]
    """Per tier: the decode device, helper devices, then "host" when the engine has a host pool."""
    totals: dict[str, Any]
    """Counters since start and recent means (`Metrics.summary()`)."""
    max_seq_len: int

    @property
    def live(self) -> tuple[RequestView, ...]:
        """Every request not finished yet."""
        return sum((getattr(self, part) for part in PARTS), ())

    def find(self, request_id: str) -> RequestView | None:
        """A live request, or one of the recently finished; None if unknown."""
        for r in self.live + self.finished[::-1]:
            if r.id == request_id:
                return r
        return None


def view(r: Request, decode_device: str, prefill_device: str) -> RequestView:
    """`r` as a RequestView; prefill_device: where prompts prefill (the decode device by default)."""
    state = r.state
    if state is RequestState.PARKED:
        tier = HOST
    elif state in (RequestState.RUNNING, RequestState.STAGED):
        tier = decode_device
    elif state is RequestState.PREFILLING:
        tier = prefill_device
    else:
        tier = None
    reason = r.finish_reason
    return RequestView(r.id, state.value, tier, r.prompt_len, r.kv_len, r.max_kv_len, len(r.output_ids),
                       r.max_tokens, r.arrival_time, reason.value if reason else None, r.error)

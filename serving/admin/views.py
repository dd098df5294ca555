"""Read-only views of a running orchestrator, as the admin API serves them.

Called from the API's threads while the run loop mutates the pool: every list is copied before it
is walked (a copy of a list, deque or dict is one C call, so it never sees a half-done update), and
a request's own fields are read one at a time. A view may be an iteration stale; it is never
inconsistent enough to raise.
"""
from __future__ import annotations

import math
from typing import Any

from engines.base import HOST
from orchestrator.core import Request, RequestState
from orchestrator.service import Orchestrator

HISTOGRAM_BINS = 30


def _live(orch: Orchestrator) -> dict[str, list[Request]]:
    """The pool's parts, each a copy; parked includes requests still moving to the host."""
    pool, loop = orch.loop.pool, orch.loop
    everyone = list(pool)
    return {
        "waiting": loop.incoming() + list(pool.waiting),
        "prefilling": list(pool.prefilling),
        "running": list(pool.running),
        "staged": list(pool.staged),
        "candidates": list(pool.candidates),
        "parked": [r for r in everyone if r.state is RequestState.PARKED],
        "all": everyone,
    }


def tiers(orch: Orchestrator) -> list[str]:
    """KV tiers: the engine's devices, then the host pool when the engine has one."""
    names = [d.name for d in orch.info.devices]
    return names + [HOST] if orch.ledger.capacity(HOST) > 0 else names


def kv_blocks(orch: Orchestrator) -> dict[str, dict[str, int]]:
    """Per tier: physical blocks the engine holds, blocks the ledger granted, capacity."""
    out = {}
    for tier in tiers(orch):
        try:
            used = orch.engine.kv_blocks_used(tier)
        except Exception:  # an engine without that pool; the ledger still says what is booked
            used = 0
        out[tier] = {"used": int(used), "reserved": orch.ledger.used(tier), "capacity": orch.ledger.capacity(tier)}
    return out


def summary(orch: Orchestrator) -> dict[str, Any]:
    """metrics.summary(), retried: it walks the metrics' deques, which the loop may append to
    mid-walk (a RuntimeError that a second try does not meet)."""
    for _ in range(5):
        try:
            return orch.loop.metrics.summary()
        except RuntimeError:
            continue
    return orch.loop.metrics.summary()


def member(r: Request) -> dict[str, Any]:
    """A request as the state view lists it."""
    return {"id": r.id, "state": r.state.value, "prompt_len": r.prompt_len, "kv_len": r.kv_len,
            "max_kv_len": r.max_kv_len, "tokens": len(r.output_ids), "max_tokens": r.max_tokens}


def _span(requests: list[Request]) -> list[int] | None:
    lengths = [r.kv_len for r in requests]
    return [min(lengths), max(lengths)] if lengths else None


def kv_histogram(parts: dict[str, list[Request]], max_seq_len: int) -> dict[str, Any]:
    """Requests holding KV, by KV length, in about HISTOGRAM_BINS bins over [0, max_seq_len];
    candidates count as "other"."""
    width = max(1, math.ceil(max_seq_len / HISTOGRAM_BINS))
    n = max(1, math.ceil(max_seq_len / width))
    bins = [{"lo": i * width, "parked": 0, "running": 0, "staged": 0, "other": 0} for i in range(n)]
    seen: set[str] = set()
    for kind, part in (("running", "running"), ("staged", "staged"), ("other", "candidates"), ("parked", "parked")):
        for r in parts[part]:
            if r.id in seen:  # it moved between two copies: count it once
                continue
            seen.add(r.id)
            bins[min(r.kv_len // width, n - 1)][kind] += 1
    return {"bin_width": width, "bins": bins}


def state(orch: Orchestrator) -> dict[str, Any]:
    """GET /api/state."""
    parts = _live(orch)
    return {
        "time": orch.loop.clock(),
        "policy": orch.policy.name,
        "draining": orch.draining,
        "counts": {k: len(parts[k]) for k in ("waiting", "prefilling", "running", "staged", "candidates", "parked")},
        "running": [member(r) for r in parts["running"]],
        "staged": [member(r) for r in parts["staged"]],
        "candidates": [member(r) for r in parts["candidates"]],
        "kv_histogram": kv_histogram(parts, orch.config.max_seq_len),
        "running_span": _span(parts["running"]),
        "staged_span": _span(parts["staged"]),
        "kv_blocks": kv_blocks(orch),
        "totals": summary(orch),
    }


def _tier(orch: Orchestrator, r: Request) -> str | None:
    """Where the request's KV is (or is going): a device, "host", or None (no KV)."""
    s = r.state
    if s is RequestState.PARKED:
        return HOST
    if s in (RequestState.RUNNING, RequestState.STAGED):
        return orch.info.decode_device
    if s is RequestState.PREFILLING:
        return orch.config.prefill_device or orch.info.decode_device
    return None


def row(orch: Orchestrator, r: Request, now: float) -> dict[str, Any]:
    """A request as the request table lists it."""
    return {"id": r.id, "state": r.state.value, "prompt_len": r.prompt_len, "tokens": len(r.output_ids),
            "max_tokens": r.max_tokens, "kv_len": r.kv_len, "tier": _tier(orch, r),
            "age_s": max(0.0, now - r.arrival_time),
            "finish_reason": r.finish_reason.value if r.finish_reason else None, "error": r.error}


def recent(orch: Orchestrator, limit: int) -> list[dict[str, Any]]:
    """GET /api/requests: the `limit` latest arrivals, live and recently finished, newest first."""
    now = orch.loop.clock()
    live = orch.loop.incoming() + list(orch.loop.pool)
    ids = {r.id for r in live}
    everyone = live + [r for r in list(orch.loop.lifecycle.recent_finished) if r.id not in ids]
    everyone.sort(key=lambda r: r.arrival_time, reverse=True)
    return [row(orch, r, now) for r in everyone[:limit]]


def find(orch: Orchestrator, request_id: str) -> Request | None:
    """A live request, or one of the recently finished; None if unknown."""
    r = orch.loop.pool.get(request_id)
    if r is not None:
        return r
    for r in orch.loop.incoming() + list(reversed(orch.loop.lifecycle.recent_finished)):
        if r.id == request_id:
            return r
    return None


def detail(orch: Orchestrator, r: Request) -> dict[str, Any]:
    """GET /api/requests/{id}."""
    return {**row(orch, r, orch.loop.clock()),
            "history": [{"t": t, "event": e, "detail": d} for t, e, d in list(r.history)]}

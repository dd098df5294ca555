"""The admin API's JSON, built from one `Snapshot` of the orchestrator per request.

`Orchestrator.snapshot()` copies the pool, the KV tiers and the counters without stopping the run
loop (see `orchestrator.snapshot`); everything here works on that frozen copy. So an answer may be
an iteration stale, but it never meets a half-done update, and its parts (counts, batches,
histogram, tiers) describe the same moment.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from orchestrator.policies import REGISTRY, unavailable
from orchestrator.service import Orchestrator
from orchestrator.snapshot import PARTS, RequestView, Snapshot

HISTOGRAM_BINS = 30


def member(r: RequestView) -> dict[str, Any]:
    """A request as the state view lists it."""
    return {"id": r.id, "state": r.state, "prompt_len": r.prompt_len, "kv_len": r.kv_len,
            "max_kv_len": r.max_kv_len, "tokens": r.tokens, "max_tokens": r.max_tokens}


def _span(requests: tuple[RequestView, ...]) -> list[int] | None:
    lengths = [r.kv_len for r in requests]
    return [min(lengths), max(lengths)] if lengths else None


def kv_histogram(snap: Snapshot) -> dict[str, Any]:
    """Requests holding KV, by KV length, in about HISTOGRAM_BINS bins over [0, max_seq_len];
    candidates count as "other"."""
    width = max(1, math.ceil(snap.max_seq_len / HISTOGRAM_BINS))
    n = max(1, math.ceil(snap.max_seq_len / width))
    bins = [{"lo": i * width, "parked": 0, "running": 0, "staged": 0, "other": 0} for i in range(n)]
    seen: set[str] = set()
    for kind, part in (("running", snap.running), ("staged", snap.staged), ("other", snap.candidates),
                       ("parked", snap.parked)):
        for r in part:
            if r.id in seen:  # it moved between two of the snapshot's copies: count it once
                continue
            seen.add(r.id)
            bins[min(r.kv_len // width, n - 1)][kind] += 1
    return {"bin_width": width, "bins": bins}


def kv_blocks(snap: Snapshot) -> dict[str, dict[str, int]]:
    """Per tier: physical blocks the engine holds, blocks the ledger granted, capacity."""
    return {tier: {"used": u.used, "reserved": u.reserved, "capacity": u.capacity} for tier, u in snap.kv.items()}


def state(snap: Snapshot) -> dict[str, Any]:
    """GET /api/state."""
    return {
        "time": snap.time,
        "policy": snap.policy,
        "draining": snap.draining,
        "counts": {part: len(getattr(snap, part)) for part in PARTS},
        "running": [member(r) for r in snap.running],
        "staged": [member(r) for r in snap.staged],
        "candidates": [member(r) for r in snap.candidates],
        "kv_histogram": kv_histogram(snap),
        "running_span": _span(snap.running),
        "staged_span": _span(snap.staged),
        "kv_blocks": kv_blocks(snap),
        "totals": snap.totals,
    }


def row(r: RequestView, now: float) -> dict[str, Any]:
    """A request as the request table lists it."""
    return {"id": r.id, "state": r.state, "prompt_len": r.prompt_len, "tokens": r.tokens,
            "max_tokens": r.max_tokens, "kv_len": r.kv_len, "tier": r.tier, "age_s": max(0.0, now - r.arrival_time),
            "finish_reason": r.finish_reason, "error": r.error}


def recent(snap: Snapshot, limit: int) -> list[dict[str, Any]]:
    """GET /api/requests: the `limit` latest arrivals, live and recently finished, newest first.

    Requests that arrived at the same instant (a virtual clock gives a whole batch one time) are
    listed live ones first, in the order they were submitted, then finished ones in the order
    they finished."""
    live = snap.live
    ids = {r.id for r in live}
    order = {r.id: (0, _number(r.id)) for r in live}
    order.update({r.id: (1, i) for i, r in enumerate(snap.finished) if r.id not in ids})
    everyone = list(live) + [r for r in snap.finished if r.id not in ids]
    everyone.sort(key=lambda r: (-r.arrival_time, order[r.id]))
    return [row(r, snap.time) for r in everyone[:limit]]


def _number(request_id: str) -> int:
    """n of "req-<n>": the orchestrator numbers requests as they are submitted."""
    digits = request_id.rpartition("-")[2]
    return int(digits) if digits.isdigit() else 0


def detail(r: RequestView, now: float, history: Iterable[tuple[float, str, str]]) -> dict[str, Any]:
    """GET /api/requests/{id}: the row and `Orchestrator.history(id)`."""
    return {**row(r, now), "history": [{"t": t, "event": e, "detail": d} for t, e, d in history]}


def policies(orch: Orchestrator) -> dict[str, Any]:
    """GET /api/policies: every registered policy, and whether this orchestrator's engine can run it."""
    out = []
    for name, cls in list(REGISTRY.items()):
        reason = unavailable(name, orch.info)
        out.append({"name": name, "summary": cls.summary, "available": reason is None, "reason": reason})
    return {"current": orch.policy.name, "policies": out}

"""The guard of a runtime policy switch: it is refused while requests sit in a part of the pool
that the new policy never schedules from, since they would wait there forever."""
from __future__ import annotations

from orchestrator.core import Request, RequestState
from orchestrator.policies import REGISTRY, Policy
from orchestrator.pool import RequestPool

_PART_WORDS = {  # (one, several)
    "waiting": ("waiting request", "waiting requests"), "running": ("running request", "running requests"),
    "remote": ("request prefilling on another device", "requests prefilling on another device"),
    "chunks": ("request prefilling in chunks", "requests prefilling in chunks"),
    "candidates": ("refill candidate", "refill candidates"), "staged": ("staged request", "staged requests"),
    "parked": ("request in the host pool", "requests in the host pool"),
}


def occupied_parts(pool: RequestPool, incoming: int, remote: list[Request], park_after: int) -> dict[str, int]:
    """How many requests sit in each part of the pool a policy schedules from (`PARTS`).
    incoming: submitted, not yet in the pool; remote: prefilling on another device, of which
    `park_after` go to the host pool afterwards."""
    remote_ids = {r.id for r in remote}
    parked = sum(1 for r in pool if r.state is RequestState.PARKED)  # also those moving there
    return {
        "waiting": len(pool.waiting) + incoming,
        "running": len(pool.running),
        "remote": len(remote_ids),
        "chunks": sum(1 for r in pool.prefilling if r.id not in remote_ids),
        "candidates": len(pool.candidates),
        "staged": len(pool.staged),
        "parked": parked + park_after,
    }


def refusal(old: str, new: type[Policy], occupied: dict[str, int]) -> str | None:
    """Why switching from `old` to `new` would strand requests, or None when it would not."""
    stranded = {part: n for part, n in occupied.items() if n and part not in new.parts}
    if not stranded:
        return None
    where = ", ".join(f"{n} {_PART_WORDS[part][n > 1]}" for part, n in stranded.items())
    takers = [p.name for p in REGISTRY.values() if p.parts >= stranded.keys()]
    instead = f", or switch to {' or '.join(takers)}" if takers else ""
    return (f"switching from {old} to {new.name} would strand {where}: {new.name} never schedules "
            f"them; drain and let them finish first{instead}")

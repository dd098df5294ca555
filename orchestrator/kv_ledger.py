"""Who may use how many KV blocks in which tier.

The engine owns the physical blocks; the ledger is the orchestrator's side of the books: the
blocks each request has been granted per tier. A policy admits a request only when the ledger
can reserve its blocks, so the engine never runs out mid-step. Every grant is released exactly
once; a double release or an overdraft is a bug and raises.
"""
from __future__ import annotations

from collections import defaultdict


class LedgerError(RuntimeError):
    """The books do not balance: a double release, an unknown tier or an overdraft."""


class KVLedger:
    """Block reservations per tier and per request."""

    def __init__(self, capacity: dict[str, int]):
        self._capacity = dict(capacity)
        self._used = {tier: 0 for tier in capacity}
        self._grants: dict[str, dict[str, int]] = defaultdict(dict)  # request id -> tier -> blocks

    def capacity(self, tier: str) -> int:
        return self._capacity[tier]

    def used(self, tier: str) -> int:
        return self._used[tier]

    def free(self, tier: str) -> int:
        return self._capacity[tier] - self._used[tier]

    def holds(self, request_id: str) -> dict[str, int]:
        return dict(self._grants.get(request_id, {}))

    def can_reserve(self, tier: str, blocks: int) -> bool:
        return blocks <= self.free(tier)

    def reserve(self, request_id: str, tier: str, blocks: int) -> None:
        if tier not in self._capacity:
            raise LedgerError(f"unknown KV tier {tier!r}")
        if blocks < 0 or blocks > self.free(tier):
            raise LedgerError(f"cannot reserve {blocks} blocks in {tier}: {self.free(tier)} free")
        grants = self._grants[request_id]
        grants[tier] = grants.get(tier, 0) + blocks
        self._used[tier] += blocks

    def release(self, request_id: str, tier: str | None = None) -> int:
        """Release the grant of `request_id` in `tier`, or every grant when tier is None (a
        request leaving for good); returns the blocks released (0 if it held none)."""
        grants = self._grants.get(request_id)
        if not grants:
            return 0
        tiers = list(grants) if tier is None else [tier] if tier in grants else []
        released = 0
        for t in tiers:
            n = grants.pop(t)
            self._used[t] -= n
            released += n
            if self._used[t] < 0:
                raise LedgerError(f"tier {t} went negative releasing {request_id}")
        if not grants:
            del self._grants[request_id]
        return released

    def check(self) -> None:
        """Assert the books balance (used == sum of grants, within capacity)."""
        for tier, cap in self._capacity.items():
            total = sum(g.get(tier, 0) for g in self._grants.values())
            if total != self._used[tier] or not (0 <= total <= cap):
                raise LedgerError(f"tier {tier}: used={self._used[tier]} grants={total} capacity={cap}")

    @property
    def holders(self) -> int:
        return len(self._grants)

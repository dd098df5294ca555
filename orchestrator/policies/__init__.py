"""Scheduling policies: each turns the pool's state into a `StepPlan`."""
from __future__ import annotations

from typing import Protocol

from engines.base import EngineInfo
from orchestrator.config import ServeConfig
from orchestrator.core import StepPlan
from orchestrator.kv_ledger import KVLedger
from orchestrator.pool import RequestPool


class Policy(Protocol):
    name: str

    def schedule(self, pool: RequestPool) -> StepPlan:
        """Decide the next iteration; reserve in the ledger the KV of every request admitted."""


def make_policy(name: str, info: EngineInfo, config: ServeConfig, ledger: KVLedger) -> Policy:
    if name == "fcfs":
        from orchestrator.policies.fcfs import FcfsPolicy

        return FcfsPolicy(info, config, ledger)
    raise ValueError(f"policy: unknown policy {name!r}")

"""Scheduling policies: each turns the pool's state into a `StepPlan`."""
from __future__ import annotations

import logging
from typing import Callable, Protocol

from engines.base import EngineInfo
from orchestrator.config import ServeConfig
from orchestrator.core import StepPlan
from orchestrator.kv_ledger import KVLedger
from orchestrator.pool import RequestPool

log = logging.getLogger("alignedserve.policies")


class Policy(Protocol):
    name: str

    def schedule(self, pool: RequestPool) -> StepPlan:
        """Decide the next iteration; reserve in the ledger the KV of every request admitted."""


def make_policy(name: str, info: EngineInfo, config: ServeConfig, ledger: KVLedger,
                clock: Callable[[], float]) -> Policy:
    """The policy `name`; the host-pool policies need an engine that can offload ("aligned"
    without one runs as "fcfs", and says so in the log)."""
    from orchestrator.policies.aligned import AlignedPolicy
    from orchestrator.policies.chunked import ChunkedPrefillPolicy
    from orchestrator.policies.disagg import DisaggFcfsPolicy
    from orchestrator.policies.fcfs import FcfsPolicy

    can_offload = info.capabilities.can_offload and info.host_blocks > 0
    helpers = [d.name for d in info.devices[1:]]
    if config.prefill_device and config.prefill_device not in helpers:
        raise ValueError(f"prefill_device: {config.prefill_device!r} is not a helper device of this engine "
                         f"(helpers: {helpers or 'none'}; the decode device is {info.decode_device!r})")
    if config.prefill_device and name in ("fcfs", "chunked-prefill"):
        raise ValueError(f"prefill_device: policy {name!r} prefills on the decode device; use disagg-fcfs, "
                         "aligned or fcfs-offload to prefill on another device")
    if name == "fcfs" or (name == "aligned" and not can_offload):
        if name == "aligned":
            log.warning("policy aligned: the engine has no host KV pool (build it with "
                        "--host-kv-memory-gb); running fcfs")
        return FcfsPolicy(info, config, ledger)
    if name in ("aligned", "fcfs-offload"):
        if not can_offload:
            raise ValueError(f"policy: {name!r} needs a host KV pool, and this {info.backend} engine has none "
                             "(can_offload=False or 0 host blocks); build it with --host-kv-memory-gb")
        return AlignedPolicy(info, config, ledger, clock, by_length=name == "aligned")
    if name == "disagg-fcfs":
        return DisaggFcfsPolicy(info, config, ledger)
    if name == "chunked-prefill":
        if not info.capabilities.can_chunk_prefill:
            raise ValueError(f"policy: 'chunked-prefill' needs an engine that prefills prompts in chunks, and "
                             f"this {info.backend} engine cannot (can_chunk_prefill=False)")
        return ChunkedPrefillPolicy(info, config, ledger)
    raise ValueError(f"policy: unknown policy {name!r}")

"""The scheduling policies, by name: each turns a `Draft` of the pool into a `StepPlan`.

`REGISTRY` is the one list of policies. Config validation (`ServeConfig.policy`), the runtime
policy switch, the admin API and the benchmarks read it; adding a policy is one file and one
entry below (docs/ARCHITECTURE.md shows a whole one).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from orchestrator.policies.adaptive import AdaptivePolicy
from orchestrator.policies.aligned import AlignedPolicy, FcfsOffloadPolicy
from orchestrator.policies.base import PARTS, Needs, Policy
from orchestrator.policies.chunked import ChunkedPrefillPolicy
from orchestrator.policies.disagg import DisaggFcfsPolicy
from orchestrator.policies.fcfs import FcfsPolicy

if TYPE_CHECKING:
    from engines.base import EngineInfo
    from orchestrator.config import ServeConfig

__all__ = ["REGISTRY", "POLICIES", "PARTS", "Needs", "Policy", "make_policy", "unavailable"]

log = logging.getLogger("alignedserve.policies")

REGISTRY: dict[str, type[Policy]] = {p.name: p for p in (
    AdaptivePolicy, AlignedPolicy, FcfsPolicy, FcfsOffloadPolicy, DisaggFcfsPolicy, ChunkedPrefillPolicy)}
POLICIES = tuple(REGISTRY)
"""Every policy name, the default (adaptive) first (as registered at import; `REGISTRY` is read
afresh by config validation and `make_policy`)."""


def unavailable(name: str, info: EngineInfo) -> str | None:
    """Why policy `name` cannot run on this engine (None: it can; a policy with a fallback can,
    as its fallback)."""
    cls = REGISTRY[name]
    needs = cls.needs
    if needs.host_pool and not (info.capabilities.can_offload and info.host_blocks > 0) and not cls.fallback:
        return (f"policy: {name!r} needs a host KV pool, and this {info.backend} engine has none "
                "(can_offload=False or 0 host blocks); build it with --host-kv-memory-gb")
    if needs.helper_device and len(info.devices) < 2:
        return (f"policy: {name!r} prefills on a separate device, and this {info.backend} engine has only the "
                "decode device; give it a helper device (helper_devices, e.g. cuda:1)")
    if needs.helper_device and not info.capabilities.can_peer_copy:
        return (f"policy: {name!r} moves KV between devices, and this {info.backend} engine cannot "
                "(can_peer_copy=False)")
    if needs.chunked_prefill and not info.capabilities.can_chunk_prefill:
        return (f"policy: {name!r} needs an engine that prefills prompts in chunks, and this {info.backend} "
                "engine cannot (can_chunk_prefill=False)")
    return None


def make_policy(name: str, info: EngineInfo, config: ServeConfig) -> Policy:
    """The policy `name` for this engine and config; ValueError naming the setting when it cannot
    run here. A policy whose host pool is missing runs as its fallback, and says so in the log
    ("aligned" without one runs as "fcfs")."""
    if name not in REGISTRY:
        raise ValueError(f"policy: {name!r} is not one of {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    helpers = [d.name for d in info.devices[1:]]
    if config.prefill_device and config.prefill_device not in helpers:
        raise ValueError(f"prefill_device: {config.prefill_device!r} is not a helper device of this engine "
                         f"(helpers: {helpers or 'none'}; the decode device is {info.decode_device!r})")
    if config.prefill_device and not cls.prefills_elsewhere:
        elsewhere = [p.name for p in REGISTRY.values() if p.prefills_elsewhere]
        raise ValueError(f"prefill_device: policy {name!r} prefills on the decode device; use "
                         f"{', '.join(elsewhere[:-1])} or {elsewhere[-1]} to prefill on another device")
    can_offload = info.capabilities.can_offload and info.host_blocks > 0
    if cls.needs.host_pool and not can_offload and cls.fallback:
        log.warning("policy %s: the engine has no host KV pool (build it with --host-kv-memory-gb); running %s",
                    name, cls.fallback)
        return REGISTRY[cls.fallback](info, config)
    reason = unavailable(name, info)
    if reason:
        raise ValueError(reason)
    return cls(info, config)

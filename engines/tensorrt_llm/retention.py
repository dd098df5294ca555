"""`KvCacheRetentionConfig` priorities per request role.

TensorRT-LLM evicts reusable KV blocks lowest priority first (0-100, default 35); with
`KvCacheConfig.host_cache_size` set, an evicted block whose priority is at least
`secondary_offload_min_priority` (default 30, cpp/.../evictionPolicy.cpp) is copied to host
memory instead of dropped, and brought back when a request with the same tokens is admitted.
A cancelled request's blocks are stored for reuse like a finished one's (kvCacheManager.cpp,
`releaseBlocks` -> `storeBlocks`), generated tokens included. On `main` (2026) retention configs
only act with `KvCacheConfig(use_kv_cache_manager_v2=False)`. Priorities cannot force a running
request's blocks anywhere (under GUARANTEED_NO_EVICT they stay on the GPU until it ends); they
decide what happens to blocks once requests end, which is what parking by abort produces.
"""
from __future__ import annotations

STAGED = 100
"""The staged batch: resubmitted next, so its blocks are the last to leave the GPU."""
RUNNING = 90
"""The running batch."""
PARKED = 50
"""Requests sent to the host pool: above the offload threshold, so TensorRT-LLM's own host tier
keeps them if the connector did not (and below the staged and running ones). No public call
changes a running request's priority, so a request parked by cancel keeps the priority it was
submitted with (running or staged), which is above the threshold too."""
ROLES = {"staged": STAGED, "running": RUNNING, "parked": PARKED}


def retention_config(api, role: str):
    """A `KvCacheRetentionConfig` giving the whole request (prompt and decoded tokens) `role`'s priority."""
    if role not in ROLES:
        raise ValueError(f"unknown retention role {role!r}; known: {', '.join(ROLES)}")
    priority = ROLES[role]
    cls = api.KvCacheRetentionConfig
    return cls(token_range_retention_configs=[cls.TokenRangeRetentionConfig(token_start=0, token_end=None,
                                                                            priority=priority)],
               decode_retention_priority=priority)

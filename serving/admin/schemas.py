"""The admin API's request and response bodies, as pydantic models: FastAPI validates with them
and publishes them in the OpenAPI schema (/openapi.json, /docs)."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.policies import POLICIES

PolicyName = Literal[POLICIES]  # type: ignore[valid-type]
"""A registered policy's name (POST /api/policy answers 422 naming them all for any other)."""


class Member(BaseModel):
    """A request in the running batch, the staged batch or the candidate buffer."""

    id: str
    state: str
    prompt_len: int
    kv_len: int = Field(description="Tokens in its KV cache: the prompt plus every generated token but the newest.")
    max_kv_len: int
    tokens: int = Field(description="Tokens generated so far.")
    max_tokens: int


class Counts(BaseModel):
    """Live requests by where they stand."""

    waiting: int
    prefilling: int
    running: int
    staged: int
    candidates: int
    parked: int = Field(description="KV in the host pool, or on its way there.")


class Bin(BaseModel):
    """Requests holding KV whose KV length falls in [lo, lo + bin_width)."""

    lo: int = Field(description="Smallest KV length of the bin; it spans bin_width lengths.")
    parked: int
    running: int
    staged: int
    other: int = Field(description="Refill candidates.")


class KvHistogram(BaseModel):
    """Every live request holding KV (parked, running, staged, candidates) by KV length."""

    bin_width: int
    bins: list[Bin]


class TierBlocks(BaseModel):
    """KV blocks of one tier (a device, or the host pool)."""

    used: int = Field(description="Physical blocks the engine holds in the tier.")
    reserved: int = Field(description="Blocks the orchestrator's ledger has granted in the tier.")
    capacity: int


class State(BaseModel):
    """GET /api/state: the pool, the batches, the KV histogram and tiers, counters."""

    time: float = Field(description="The run loop's clock (seconds; monotonic, or an engine's virtual time).")
    policy: str
    draining: bool
    counts: Counts
    running: list[Member]
    staged: list[Member]
    candidates: list[Member]
    kv_histogram: KvHistogram
    running_span: Optional[list[int]] = Field(description="[min, max] KV length of the running batch, or null.")
    staged_span: Optional[list[int]]
    kv_blocks: dict[str, TierBlocks]
    totals: dict[str, Any] = Field(description="Counters since start and recent means (Metrics.summary()).")


class RequestRow(BaseModel):
    """A request in the request table, live or recently finished."""

    id: str
    state: str
    prompt_len: int
    tokens: int
    max_tokens: int
    kv_len: int
    tier: Optional[str] = Field(description="Where its KV is: a device, \"host\", or null (none).")
    age_s: float = Field(description="Seconds since it arrived.")
    finish_reason: Optional[str]
    error: Optional[str]


class RequestList(BaseModel):
    """GET /api/requests: the latest requests, newest first."""

    requests: list[RequestRow]


class HistoryEntry(BaseModel):
    """One state transition of a request (run-loop clock)."""

    t: float
    event: str
    detail: str


class RequestDetail(RequestRow):
    """GET /api/requests/{id}: the row and the request's history, oldest first."""

    history: list[HistoryEntry]


class Point(BaseModel):
    """What one interval (a second) of iterations and finishes added up to."""

    t: float = Field(description="Start of the interval, run-loop clock.")
    decode_tok_s: float
    tpot_p50_s: Optional[float] = Field(description="Over requests that finished in the interval; null if none did.")
    tpot_p99_s: Optional[float]
    alignment: Optional[float] = Field(description="Mean alignment of the interval's decode iterations; null if none.")
    bubble_share: float = Field(description="Share of the interval's engine time spent waiting for KV transfers.")
    transfer_bytes_s: float
    kv_usage: dict[str, float] = Field(description="Blocks used / capacity per tier at the interval's end.")


class TimeSeries(BaseModel):
    """GET /api/timeseries: one point per whole second, oldest first; idle seconds read zero."""

    interval_s: float
    points: list[Point]


class Gpu(BaseModel):
    """One GPU's figures through NVML; a figure the GPU or driver does not give is null."""

    index: int
    name: Optional[str]
    utilization_pct: Optional[float]
    memory_used_bytes: Optional[int]
    memory_total_bytes: Optional[int]
    pcie_tx_bytes_s: Optional[float]
    pcie_rx_bytes_s: Optional[float]
    nvlink_tx_bytes_s: Optional[float] = Field(description="Null where NVLink counters are not readable.")
    temperature_c: Optional[float]
    power_w: Optional[float]


class Gpus(BaseModel):
    """GET /api/gpus: available false (with the reason) where NVML cannot load, e.g. no NVIDIA driver."""

    available: bool
    reason: Optional[str]
    gpus: list[Gpu]


class PolicyInfo(BaseModel):
    """One registered scheduling policy."""

    name: str
    summary: str
    available: bool = Field(description="Whether this orchestrator's engine can run it (a policy with a fallback "
                                        "can, as its fallback: aligned without a host pool runs as fcfs).")
    reason: Optional[str] = Field(description="Why it cannot run on this engine and what to change; null if it can.")


class Policies(BaseModel):
    """GET /api/policies: every registered policy, in the registry's order (the default first)."""

    current: str = Field(description="The policy scheduling now.")
    policies: list[PolicyInfo]


class PolicyChange(BaseModel):
    """POST /api/policy body."""

    model_config = ConfigDict(extra="forbid")
    policy: PolicyName


class FaultArm(BaseModel):
    """POST /api/faults body: arm `count` faults of `kind` (engines/faults.py lists the kinds)."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(max_length=40, description="decode_error, prefill_error, copy_error, copy_hang or host_full")
    count: int = Field(1, ge=1, le=1000, description="How many of the next chances of this kind fail.")


class Faults(BaseModel):
    """GET and POST /api/faults answer."""

    enabled: bool = Field(description="Whether the server was started with fault injection "
                                      "(ALIGNED_FAULT_INJECTION=1 / --fault-injection).")
    kinds: list[str] = Field(description="The kinds this engine can inject.")
    armed: dict[str, int] = Field(description="Faults armed and not fired yet, by kind.")
    fired: dict[str, int] = Field(description="Faults fired so far, by kind.")


class PolicyResult(BaseModel):
    """POST /api/policy answer."""

    ok: bool
    policy: str = Field(description="The policy scheduling now.")
    previous: str
    detail: str


class DrainResult(BaseModel):
    """POST /api/drain and /api/resume answer."""

    ok: bool
    draining: bool
    detail: str


class CancelResult(BaseModel):
    """POST /api/requests/{id}/cancel answer."""

    ok: bool
    id: str
    detail: str


class Problem(BaseModel):
    """Every error: one sentence saying what went wrong and what to do."""

    detail: str = Field(description="What went wrong and what to do.")

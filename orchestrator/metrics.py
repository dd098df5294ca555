"""One metrics object for the run loop: counters, engine call timings and a record per iteration.

Written by the run loop thread only. Readers (the dashboard, Prometheus, benchmarks) take
`summary()` or copy `iterations`; both are safe to read from another thread at any moment, if
at most one iteration stale.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from engines.base import CallTiming
from orchestrator.core import Decision


@dataclass(frozen=True, slots=True)
class IterationRecord:
    """What one run-loop iteration did."""

    end: float
    """The run loop's clock (time.monotonic, or virtual time) when the iteration's work ended."""
    seconds: float
    """Wall time of the iteration's engine calls (prefill + decode + waits on transfers)."""
    batch_size: int
    """Requests decoded this iteration."""
    kv_max: int
    """Longest KV length in the decode batch: what a step's attention time follows on a GPU."""
    kv_mean: float
    alignment: float
    """sum(L) / (batch_size * max L): 1.0 when every member has the same KV length; the share of
    the batch's attention work that is not padding up to the longest member."""
    prefill_tokens: int
    bubble_seconds: float
    """Decode-device time spent waiting for KV transfers (the batch-level bubble)."""
    switch: bool
    """The running batch was switched for a staged one."""
    device_blocks_used: int
    host_blocks_used: int
    transfer_bytes: int
    """KV bytes moved between tiers this iteration."""
    schedule_seconds: float = 0.0
    """Wall time (time.perf_counter, also under virtual time) the policy took to plan this
    iteration: the scheduler's own cost, reported apart from the engine's."""
    decode_seconds: float = 0.0
    """The decode step's own time (the engine's call), 0 without one."""
    predicted_seconds: float | None = None
    """The decode step's time as the policy predicted it from the engine's step cost (None: the
    policy did not predict one)."""
    decision: Decision | None = None
    """Why the policy planned this iteration as it did (`Policy.decision`)."""


@dataclass
class Metrics:
    """Counters since start, the latest engine call timings and iteration records."""

    submitted: int = 0
    refused: Counter = field(default_factory=Counter)
    """Requests refused before they were accepted, by reason: the field named ("queue" and
    "server" for overload and shutdown)."""
    iterations: int = 0
    tokens: int = 0
    switches: int = 0
    transfer_bytes: int = 0
    bubble_seconds: float = 0.0
    finished: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    """Requests ended with an error, by where it happened (`FAILURE_CAUSES`)."""
    timings: deque = field(default_factory=lambda: deque(maxlen=4096))
    """Latest engine call timings (`CallTiming`), for cost-model fitting."""
    history: deque = field(default_factory=lambda: deque(maxlen=4096))
    """Latest `IterationRecord`s."""
    transfers: deque = field(default_factory=lambda: deque(maxlen=4096))
    """Latest finished KV moves (`TransferRecord`: tiers, requests, bytes, seconds)."""
    transfer_seconds: float = 0.0
    """Sum of finished moves' durations (moves overlap compute, so this is not lost time)."""

    def record_call(self, timing: CallTiming) -> None:
        self.timings.append(timing)

    def record_transfer(self, record) -> None:
        self.transfer_seconds += record.seconds
        self.transfers.append(record)

    def record_iteration(self, record: IterationRecord) -> None:
        self.iterations += 1
        self.switches += record.switch
        self.transfer_bytes += record.transfer_bytes
        self.bubble_seconds += record.bubble_seconds
        self.history.append(record)

    def summary(self, last: int = 256) -> dict:
        """Counters, plus means over the last `last` iterations that decoded."""
        recent = [r for r in list(self.history)[-last:] if r.batch_size]
        n = len(recent)
        return {
            "submitted": self.submitted,
            "refused": dict(self.refused),
            "iterations": self.iterations,
            "tokens": self.tokens,
            "finished": dict(self.finished),
            "failed": dict(self.failed),
            "switches": self.switches,
            "transfer_bytes": self.transfer_bytes,
            "transfer_rate_bytes_s": (sum(t.bytes for t in self.transfers) / sum(t.seconds for t in self.transfers)
                                      if any(t.seconds for t in self.transfers) else 0.0),
            "bubble_seconds": self.bubble_seconds,
            "recent": {
                "iterations": n,
                "batch_size": sum(r.batch_size for r in recent) / n if n else 0.0,
                "kv_max": sum(r.kv_max for r in recent) / n if n else 0.0,
                "alignment": sum(r.alignment for r in recent) / n if n else 0.0,
                "device_blocks_used": recent[-1].device_blocks_used if n else 0,
                "host_blocks_used": recent[-1].host_blocks_used if n else 0,
            },
            "decision": _decision(recent),
        }


def _decision(recent: list[IterationRecord]) -> dict | None:
    """The policy's last decision, its predicted and measured step, and how well its step cost
    predicted the recent steps (median of predicted / measured over those it predicted)."""
    explained = [r for r in recent if r.decision is not None]
    if not explained:
        return None
    last = explained[-1]
    ratios = sorted(r.predicted_seconds / r.decode_seconds for r in recent
                    if r.predicted_seconds is not None and r.decode_seconds > 0)
    kinds = Counter(r.decision.kind for r in explained)
    return {"kind": last.decision.kind, "reason": last.decision.reason,
            "predicted_s": last.predicted_seconds, "measured_s": last.decode_seconds or None,
            "predicted_over_measured": ratios[len(ratios) // 2] if ratios else None,
            "kinds": dict(kinds)}

"""Per-second time series and latency observations, computed off the run loop thread.

The run loop only appends: an `IterationRecord` per iteration (read here as a copy,
`Orchestrator.iterations()`), and each finished request to a deque (a finish listener,
`Orchestrator.add_finish_listener`). `Telemetry.update()` — called by the admin app's one-second
ticker and by the endpoints that read it — folds what is new since the last call into per-second
buckets and hands finished requests to the Prometheus histograms. So the loop pays one deque
append per finish, and the page's polling costs it nothing. Records and finished requests never
change once handed out, so reading them off the loop thread is safe.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from engines.base import HOST
from orchestrator.core import Request
from orchestrator.metrics import IterationRecord
from orchestrator.service import Orchestrator

KEEP_MINUTES = 15
"""Minutes of per-second points kept (GET /api/timeseries?minutes= may ask for up to this)."""


@dataclass(slots=True)
class _Bucket:
    """What the iterations ending (and requests finishing) in one interval added up to."""

    tokens: int = 0
    decode_iterations: int = 0
    alignment_sum: float = 0.0
    seconds: float = 0.0
    bubble_seconds: float = 0.0
    transfer_bytes: int = 0
    kv_used: dict[str, int] | None = None
    """Blocks used per tier after the bucket's last iteration."""
    tpots: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def tpot(r: Request) -> float | None:
    """Time per output token after the first (vLLM's definition); None below two tokens."""
    times = r.token_times
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) / (len(times) - 1)


class Telemetry:
    """Folds iteration records and finished requests into per-second points; thread-safe."""

    def __init__(self, orch: Orchestrator, interval_s: float = 1.0, keep_minutes: float = KEEP_MINUTES,
                 on_finished: Callable[[Request], None] | None = None):
        """on_finished: called (off the loop thread, from `update`) once per finished request."""
        self.orch = orch
        self.interval_s = interval_s
        self.keep = max(1, int(keep_minutes * 60 / interval_s))
        self.on_finished = on_finished
        self._lock = threading.Lock()
        self._buckets: dict[int, _Bucket] = {}
        self._last_record: IterationRecord | None = None
        self._finished: deque[Request] = deque(maxlen=10_000)  # drained each second
        self._device = orch.info.decode_device
        kv = orch.snapshot().kv  # capacities never change
        self._capacity = {self._device: kv[self._device].capacity}
        if HOST in kv:
            self._capacity[HOST] = kv[HOST].capacity
        orch.add_finish_listener(self._finished.append)
        # Requests that finished before this app existed (it may start after the orchestrator):
        # take the ones the loop still keeps. One finishing right now may arrive both ways.
        earlier = orch.recently_finished()
        self._seeded = {r.id for r in earlier}
        self._finished.extendleft(reversed(earlier))
        self._seed_count = len(earlier)

    def close(self) -> None:
        self.orch.remove_finish_listener(self._finished.append)

    # ---- folding ------------------------------------------------------------------------------

    def update(self) -> None:
        """Take in the iterations and finishes since the last call."""
        with self._lock:
            for record in self._new_records():
                self._fold(record)
            while self._finished:
                r = self._finished.popleft()
                if self._seed_count:
                    self._seed_count -= 1  # one of the requests taken in at the start
                elif r.id in self._seeded:
                    self._seeded.discard(r.id)  # taken in at the start already
                    continue
                if r.finish_time is not None:
                    t = tpot(r)
                    if t is not None:
                        self._bucket(r.finish_time).tpots.append(t)
                if self.on_finished is not None:
                    self.on_finished(r)
            self._prune()

    def _new_records(self) -> list[IterationRecord]:
        records = self.orch.iterations()  # a copy
        start = 0
        last = self._last_record
        if last is not None:
            # Records are distinct objects: find the last one folded, scanning from the newest
            # (if it has already left the bounded deque, everything in the copy is new).
            for i in range(len(records) - 1, -1, -1):
                if records[i] is last:
                    start = i + 1
                    break
        if records:
            self._last_record = records[-1]
        return records[start:]

    def _bucket(self, t: float) -> _Bucket:
        key = int(t // self.interval_s)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket()
        return b

    def _fold(self, rec: IterationRecord) -> None:
        b = self._bucket(rec.end)
        b.tokens += rec.batch_size
        if rec.batch_size:
            b.decode_iterations += 1
            b.alignment_sum += rec.alignment
        b.seconds += rec.seconds
        b.bubble_seconds += rec.bubble_seconds
        b.transfer_bytes += rec.transfer_bytes
        b.kv_used = {self._device: rec.device_blocks_used}
        if HOST in self._capacity:
            b.kv_used[HOST] = rec.host_blocks_used

    def _prune(self) -> None:
        if len(self._buckets) <= self.keep:
            return
        oldest = self._current() - self.keep
        for key in [k for k in self._buckets if k < oldest]:
            del self._buckets[key]

    def _current(self) -> int:
        return int(self.orch.clock() // self.interval_s)

    # ---- reading ------------------------------------------------------------------------------

    def points(self, minutes: float | None = None) -> list[dict[str, Any]]:
        """One point per whole interval from the first with data, the last `minutes`, oldest first;
        the interval under way is left out until it is over. Idle intervals read zero."""
        self.update()
        with self._lock:
            if not self._buckets:
                return []
            current = self._current()
            window = self.keep if minutes is None else max(1, int(minutes * 60 / self.interval_s))
            start = max(min(self._buckets), current - window)
            # KV holds still while nothing runs: an idle interval carries the last reading.
            before = [k for k in self._buckets if k < start and self._buckets[k].kv_used is not None]
            kv = self._buckets[max(before)].kv_used if before else None
            out = []
            for key in range(start, current):
                b = self._buckets.get(key) or _Bucket()
                kv = b.kv_used or kv
                out.append(self._point(key, b, kv))
            return out

    def latest(self) -> dict[str, Any] | None:
        """The newest whole interval's point, or None before the first."""
        pts = self.points(minutes=self.interval_s / 60)
        return pts[-1] if pts else None

    def _point(self, key: int, b: _Bucket, kv: dict[str, int] | None) -> dict[str, Any]:
        return {
            "t": key * self.interval_s,
            "decode_tok_s": b.tokens / self.interval_s,
            "tpot_p50_s": percentile(b.tpots, 0.50),
            "tpot_p99_s": percentile(b.tpots, 0.99),
            "alignment": b.alignment_sum / b.decode_iterations if b.decode_iterations else None,
            "bubble_share": b.bubble_seconds / b.seconds if b.seconds > 0 else 0.0,
            "transfer_bytes_s": b.transfer_bytes / self.interval_s,
            "kv_usage": {tier: (kv or {}).get(tier, 0) / cap if cap else 0.0 for tier, cap in self._capacity.items()},
        }

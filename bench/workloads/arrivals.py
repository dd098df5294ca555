"""Arrival schedules, as `vllm bench serve` makes them, plus a trace's own timestamps.

- all-at-once: every offset 0 (vllm's `--request-rate inf`, its default).
- poisson: exponential gaps with mean 1/rate (vllm's `--request-rate R`).
- gamma: gamma gaps with shape = burstiness and scale = 1/(rate * burstiness), so the mean gap stays
  1/rate while the coefficient of variation is 1/sqrt(burstiness): burstiness < 1 is burstier than
  Poisson, > 1 smoother (vllm's `--burstiness`; 1 is Poisson).
- trace: the trace's own offsets from its first request, or those offsets multiplied by one factor so
  that the mean rate, (n - 1) / span, is `rate`: every gap scales alike, so the burst shape is kept.

The first request arrives at 0. Gaps come from the stream (seed, 1), apart from the lengths' stream,
so one seed gives the same requests under every schedule.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from bench.workloads.workload import ARRIVALS_STREAM

ARRIVALS = ("all-at-once", "poisson", "gamma", "trace")


def arrival_offsets(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Seconds after the start at which each of `n` requests arrives, as `vllm bench serve`
    schedules them: rate = inf sends all at once; otherwise gaps are gamma(burstiness,
    1 / (rate * burstiness)), i.e. exponential (Poisson arrivals) at burstiness 1, with mean
    1 / rate. The first request arrives at 0."""
    if rate == math.inf:
        return [0.0] * n
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate ({rate}) and burstiness ({burstiness}) must be > 0")
    rng = np.random.default_rng((seed, ARRIVALS_STREAM))  # its own stream: lengths do not depend on the schedule
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=max(n - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:n]


def rescale_offsets(offsets: np.ndarray, rate: float) -> np.ndarray:
    """`offsets` (sorted, from 0) stretched by one factor so that (n - 1) / span == rate."""
    offsets = np.asarray(offsets, dtype=np.float64)
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate = {rate!r}: a trace can be rescaled to a finite mean rate > 0 requests/s")
    span = offsets[-1] - offsets[0] if len(offsets) else 0.0
    if span <= 0:
        raise ValueError(f"rate: the {len(offsets)} requests span 0 s, so no rescaling gives them a mean rate")
    return (offsets - offsets[0]) * ((len(offsets) - 1) / span / rate)


def schedule(n: int, seed: int, arrivals: str, rate: float | None = None, burstiness: float = 1.0,
             own: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(offsets, how): the arrival offsets of `n` requests and a record of how they were made.
    `own` are the source's own offsets (traces only), needed by arrivals="trace"."""
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals = {arrivals!r}: choose one of {', '.join(ARRIVALS)}")
    if burstiness != 1.0 and arrivals != "gamma":
        raise ValueError(f"burstiness = {burstiness}: only arrivals='gamma' takes a burstiness (given {arrivals!r})")
    if arrivals == "all-at-once":
        if rate is not None and rate != math.inf:
            raise ValueError(f"rate = {rate}: arrivals='all-at-once' takes no rate; use 'poisson' or 'gamma'")
        return np.zeros(n), {"kind": "all-at-once"}
    if arrivals == "trace":
        if own is None:
            raise ValueError("arrivals = 'trace': this workload has no timestamps of its own; "
                             "use 'all-at-once', 'poisson' or 'gamma'")
        own = np.asarray(own, dtype=np.float64) - own[0]
        if rate is None:
            return own, {"kind": "trace", "timestamps": "the trace's own, from its first request"}
        return rescale_offsets(own, rate), {"kind": "trace", "rate": rate,
                                            "timestamps": "the trace's own, scaled by one factor to the mean rate"}
    if rate is None or not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate = {rate!r}: arrivals={arrivals!r} needs a finite rate > 0 requests/s")
    if not burstiness > 0:
        raise ValueError(f"burstiness = {burstiness!r}: the gamma shape must be > 0")
    how = {"kind": arrivals, "rate": rate, "seed": seed}
    if arrivals == "gamma":
        how["burstiness"] = burstiness
    return np.asarray(arrival_offsets(n, rate, seed, burstiness)), how

"""The one noun every generator returns: a `Workload` of `WorkloadRequest`s.

A request is its lengths and its arrival: prompt length (context tokens, BOS included), output
length (tokens to generate: one decode iteration each) and the arrival offset in seconds from the
workload's start. That is all the sim engine needs. Real engines also need prompt token ids; those
are made on demand from the workload's seed and the request's index (`prompt_ids`), so building
the 19,366 requests of the Azure conversation trace costs no token generation at all.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bench.workloads.azure import TraceRow
    from bench.workloads.window import WindowFit

BOS_ID = 256
TOKEN_RANGE = (3, 256)
"""Prompt token ids are drawn from [3, 256): bytes of the demo tokenizer, clear of BOS/EOS/PAD."""

LENGTHS_STREAM, ARRIVALS_STREAM, TOKENS_STREAM = 0, 1, 2
"""Each random choice has its own numpy stream, `default_rng((seed, stream, ...))`, so that changing
the arrival schedule never changes the lengths, and the lengths never change the token ids."""


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One request of a workload, ready for `Orchestrator.submit(r.prompt_ids, max_tokens=r.max_tokens)`."""

    prompt_len: int
    """Context tokens at admission, the leading BOS included."""
    output_len: int
    """Tokens to generate (the request runs to exactly this many: the benchmarks send no stop id)."""
    arrival_s: float
    """Seconds after the workload's start at which the request is sent."""
    seed: int
    index: int
    """Position in its workload; with `seed` it fixes the prompt's token ids."""
    label: str = ""
    """The class the generator drew it from ("short"/"long", a LongBench task); empty if none."""
    trace_row: TraceRow | None = None
    """The trace row it replays, for trace workloads."""

    @property
    def max_tokens(self) -> int:
        return self.output_len

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        """BOS then `prompt_len - 1` ids from [3, 256), drawn from (seed, index): the same every call."""
        rng = np.random.default_rng((self.seed, TOKENS_STREAM, self.index))
        return (BOS_ID, *rng.integers(*TOKEN_RANGE, size=self.prompt_len - 1).tolist())


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests with a name and a record of how they were made (`description`, JSON-ready)."""

    name: str
    requests: tuple[WorkloadRequest, ...]
    seed: int
    description: dict[str, Any]
    """How the workload was made: source (trace file, paper and table), distributions, arrivals."""
    fit: WindowFit | None = None
    """How lengths were fitted to an engine's window; None when they are the source's own."""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def prompt_lens(self) -> np.ndarray:
        return np.fromiter((r.prompt_len for r in self.requests), dtype=np.int64, count=len(self.requests))

    @property
    def output_lens(self) -> np.ndarray:
        return np.fromiter((r.output_len for r in self.requests), dtype=np.int64, count=len(self.requests))

    @property
    def arrivals(self) -> np.ndarray:
        return np.fromiter((r.arrival_s for r in self.requests), dtype=np.float64, count=len(self.requests))

    def stats(self) -> dict[str, dict]:
        """Mean/p50/p90/p99 (and min/max/sum) of context and output lengths, and the arrival span."""
        arrivals = self.arrivals
        span = float(arrivals.max() - arrivals.min())
        return {"context": length_stats(self.prompt_lens), "output": length_stats(self.output_lens),
                "arrival": {"span_s": span, "mean_rate": (len(self) - 1) / span if span > 0 else float("inf")}}

    def describe(self) -> dict:
        """What a results file should say about the workload."""
        fit = {} if self.fit is None else self.fit.describe()
        return {"name": self.name, "requests": len(self), "seed": self.seed, **self.description, **fit,
                "prompt_len": length_stats(self.prompt_lens), "max_tokens": length_stats(self.output_lens)}

    def with_arrivals(self, offsets: np.ndarray | list[float], how: dict[str, Any]) -> Workload:
        """The same requests sent at `offsets` (one per request), `how` recorded as "arrivals"."""
        if len(offsets) != len(self):
            raise ValueError(f"offsets: {len(offsets)} given for {len(self)} requests")
        requests = tuple(replace(r, arrival_s=float(t)) for r, t in zip(self.requests, offsets))
        return replace(self, requests=requests, description={**self.description, "arrivals": how})

    # Read by callers of the former bench.workloads.draw_workload (bench/policy_comparison.py, tests).
    @property
    def scale(self) -> float:
        return 1.0 if self.fit is None else self.fit.scale

    @property
    def output_reserve(self) -> int | None:
        return None if self.fit is None else self.fit.output_reserve

    @property
    def clamped(self) -> int:
        return 0 if self.fit is None else self.fit.clamped

    @property
    def max_seq_len(self) -> int | None:
        return None if self.fit is None else self.fit.max_seq_len


BenchRequest = WorkloadRequest
"""The former name of a workload request."""


def build_requests(prompt_lens, output_lens, arrivals, seed: int, labels=None, rows=None) -> tuple[WorkloadRequest, ...]:
    """Requests from parallel sequences (numpy arrays or lists); labels and rows are optional."""
    n = len(prompt_lens)
    labels = [""] * n if labels is None else labels
    rows = [None] * n if rows is None else rows
    return tuple(WorkloadRequest(p, o, t, seed, i, lab, row) for i, (p, o, t, lab, row) in enumerate(
        zip(np.asarray(prompt_lens).tolist(), np.asarray(output_lens).tolist(), np.asarray(arrivals, float).tolist(),
            labels, rows)))


def length_stats(x: np.ndarray) -> dict:
    x = np.asarray(x)
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
            "p99": float(np.percentile(x, 99)), "min": int(x.min()), "max": int(x.max()), "sum": int(x.sum())}


def check_count(n: int, what: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{what} = {n!r}: ask for at least 1 request (an int)")

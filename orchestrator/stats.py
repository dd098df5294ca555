"""Counters of the run loop and the engine's recent call timings."""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from engines.base import CallTiming


@dataclass
class LoopStats:
    """Written by the run loop thread only; readers get a snapshot via `as_dict`."""

    submitted: int = 0
    iterations: int = 0
    tokens: int = 0
    finished: Counter = field(default_factory=Counter)
    timings: deque = field(default_factory=lambda: deque(maxlen=4096))
    """The latest engine call timings, for cost-model fitting and dashboards."""

    def record(self, timing: CallTiming) -> None:
        self.timings.append(timing)

    def as_dict(self) -> dict:
        return {
            "submitted": self.submitted,
            "iterations": self.iterations,
            "tokens": self.tokens,
            "finished": dict(self.finished),
        }

"""Virtual time for the run loop: a clock that moves only when told to.

The orchestrator's run loop reads time through one callable (arrivals, token times, the
starvation guard, waits on transfers, iteration ends). Serving passes `time.monotonic`; with the
virtual-time engine it gets this clock, which the engine advances by the modelled duration of
each call, so the same orchestrator code is measured at any scale without waiting for it. It
lives on the engine side because the engine owns it; the orchestrator sees only a callable.
"""
from __future__ import annotations


class VirtualClock:
    """Seconds since the start of a simulation. Callable, like time.monotonic."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> float:
        """Move to time `t` if it is later (time never runs backwards); returns the new time."""
        if t != t:  # NaN would poison every later comparison
            raise ValueError("cannot advance a virtual clock to NaN")
        self._now = max(self._now, float(t))
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds` (>= 0); returns the new time."""
        if not seconds >= 0:
            raise ValueError(f"a virtual clock only moves forward; got {seconds} s")
        return self.advance_to(self._now + seconds)

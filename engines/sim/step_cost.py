"""The sim engine's decode-step cost as a policy reads it (`EngineInfo.step_costs`).

A policy asks any engine's step cost the same questions (engines/base.py `StepCost`): what does
a decode step over these KV lengths, in this order, cost (`step_seconds`), what does a batch of
this size, longest KV and total KV cost (`seconds`), and does the order of the batch matter
(`order_matters`). The torch engine answers from a fitted formula; the sim engine answers from
the very cost model its clock runs on, so a prediction is exactly what the step will take.
"""
from __future__ import annotations

from typing import Sequence

from engines.sim.cost_model import CostModel


class SimStepCost:
    """Duck-typed `engines.base.StepCost` over a `CostModel` (module docstring)."""

    def __init__(self, cost: CostModel, split_kv: bool = False):
        kernel = cost.kernel(split_kv)
        self.cost, self.split_kv = cost, split_kv
        self.attention = kernel.kernel
        """The attention kernel's name, e.g. "fa2-varlen"."""
        self.dispatch = kernel.model
        """Its dispatch model: "waves", "longest-first", "greedy" or "split"."""
        self.order_matters = kernel.order_matters
        """True only for in-order waves: there a batch sorted longest first costs less."""
        self.r2: float | None = None
        self.points = 0
        self.fitted_on = f"sim cost model, {cost.hardware.name}, {cost.model.name}: {kernel.source}"

    def step_seconds(self, kv_lens: Sequence[int]) -> float:
        """A decode step over sequences of these KV lengths (each counting the token fed this
        step: the engine's `kv_len(request) + 1`), in this order; 0 for none. The same number
        the sim engine's `decode` advances its clock by."""
        return self.cost.decode_seconds(list(kv_lens), self.split_kv) if len(kv_lens) else 0.0

    def chunk_seconds(self, tokens: int, start: int = 0) -> float:
        """What a chunk of `tokens` prompt tokens from position `start` (its attention reads the
        prompt's first start tokens too) adds to a decode step of one sequence: the cost model's
        mixed step less the plain one (0 for no tokens)."""
        if tokens <= 0:
            return 0.0
        return (self.cost.step_seconds([1], [(start, start + tokens)], self.split_kv)
                - self.cost.step_seconds([1], [], self.split_kv))

    def seconds(self, batch: int, max_kv: int, sum_kv: int) -> float:
        """A representative step of `batch` sequences: one of `max_kv` (first) and the other
        batch - 1 sharing sum_kv - max_kv as equally as whole tokens allow."""
        return self.step_seconds(representative_batch(batch, max_kv, sum_kv))

    def __repr__(self) -> str:
        return f"SimStepCost({self.attention!r}, dispatch={self.dispatch!r}, order_matters={self.order_matters})"


def representative_batch(batch: int, max_kv: int, sum_kv: int) -> list[int]:
    """One sequence of max_kv, then batch - 1 sharing the rest, the longer ones first."""
    if batch < 1:
        return []
    rest, others = sum_kv - max_kv, batch - 1
    if max_kv < 1 or (others and not others <= rest <= others * max_kv) or (not others and rest):
        raise ValueError(f"no batch of {batch} sequences has longest KV {max_kv} and total KV {sum_kv}: "
                         f"the other {others} must share {rest} tokens, 1 to {max_kv} each")
    if not others:
        return [max_kv]
    q, r = divmod(rest, others)
    return [max_kv] + [q + 1] * r + [q] * (others - r)

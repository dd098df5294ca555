"""Fit the cost model's free constants to the per-call timings a real engine records.

`fit_constants(timings, hardware, model)` fits e_f, e_w, e_kv, o_prefill and o_decode (see
`engines.sim.cost_model`) to `CallTiming`s. Each term of the cost model is a known quantity (from
the profiles) times one constant, so with every efficiency written as its inverse θ = 1/e the
model is linear in (θ_w, θ_f, θ_kv, o_prefill, o_decode) except for the roofline's max(weights,
matmul). The fit therefore alternates: assign each call to the branch of the max that the current
constants make larger, solve the linear least squares for that assignment, repeat until no call
changes branch; it starts from three assignments (the roofline defaults', all weight-bound, all
compute-bound) and keeps the best. Rows are weighted by 1/seconds, so it minimises relative error
and a 2 s prefill does not drown a 20 ms decode step. A coefficient that comes out negative is
held at 0 and the rest refitted (an overhead may be 0; the attention efficiency may not: that is
an error). A fit using both branches of the max is kept only if it beats putting every call on
one branch by more than the Bayesian information criterion charges for the extra constant.

What a CallTiming lacks, and how the fit makes do:
- Decode attention needs every KV length; a timing has only their sum and max. Without split-KV
  the call is taken as B sequences at max_kv, which is exactly the work of an engine that pads
  the batch to its longest sequence (the torch engine does) and the upper bound of the wave model
  otherwise. With split_kv=True it is taken as B sequences of the mean length (the balanced case).
- Prefill attention needs Σ n_i²; it is taken as max_kv * Σ n_i (exact for equal prompts, an
  upper bound otherwise). The torch engine pads a prefill batch to its longest prompt, so its
  prefill timings are only exact for equal-length batches, which is what `bench.calibrate` times.
- If no call lands on one branch of the max (e.g. no decode step is compute-bound), that branch's
  efficiency is not identified: it is set to the lowest value the data allow (the branch ties with
  the other on the call where it comes closest) and the fit says so in `notes`.

This module is numpy only. The command that times the torch engine and writes a `Fit` under
bench/profiles/ is `python -m bench.calibrate` (`make calibrate`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from engines.base import CallTiming
from engines.sim.cost_model import SPLIT_KV_CHUNK_TOKENS, CostConstants, CostModel
from engines.sim.profiles import HardwareProfile, ModelProfile

MIN_CALLS_PER_OP = 8
"""Fewest prefill and fewest decode timings a fit accepts: twice the constants a decode call
depends on (o_decode, e_w, e_f, e_kv), so a fit is never an interpolation through its points."""
OPS = ("prefill", "decode")
COLUMNS = ("weights", "matmul", "attention", "prefill_overhead", "decode_overhead")
"""Unknowns of the linear system, in order: θ_w, θ_f, θ_kv, o_prefill, o_decode."""


class CalibrationError(ValueError):
    """The timings cannot determine the constants; the message says what to time instead."""


@dataclass(frozen=True)
class Fit:
    """Fitted constants with the profiles they belong to, the fit error per op, and provenance."""

    hardware: HardwareProfile
    model: ModelProfile
    constants: CostConstants
    split_kv: bool
    """Whether the timed engine's decode attention splits the KV (the torch engine does not)."""
    error: dict[str, dict]
    """Per op: r2 (of seconds), mape (mean absolute percentage error, as a fraction), points."""
    notes: tuple[str, ...] = ()
    """What the fit could not determine, and what it did about it."""
    meta: dict = field(default_factory=dict)
    """Provenance: command, date, machine, library versions."""
    timings: tuple[CallTiming, ...] = ()
    """The timings fitted, kept so a fit can be audited and refitted (`--refit`)."""

    def cost_model(self) -> CostModel:
        return CostModel(self.hardware, self.model, self.constants)

    def to_dict(self) -> dict:
        return {"hardware": self.hardware.to_dict(), "model": self.model.to_dict(),
                "constants": self.constants.to_dict(), "split_kv": self.split_kv, "error": self.error,
                "notes": list(self.notes), "meta": self.meta,
                "timings": [[t.op, t.seconds, t.num_seqs, t.num_tokens, t.kv_tokens, t.max_kv] for t in self.timings]}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Fit:
        d = json.loads(Path(path).read_text())
        return cls(HardwareProfile.from_dict(d["hardware"]), ModelProfile.from_dict(d["model"]),
                   CostConstants.from_dict(d["constants"]), d["split_kv"], d["error"], tuple(d["notes"]), d["meta"],
                   tuple(CallTiming(*row) for row in d.get("timings", ())))


def fit_constants(timings: Sequence[CallTiming], hardware: HardwareProfile, model: ModelProfile,
                  split_kv: bool = False, chunk_tokens: int = SPLIT_KV_CHUNK_TOKENS,
                  meta: dict | None = None) -> Fit:
    """Least-squares fit of the cost model's free constants to prefill and decode timings (module
    docstring); "move" and empty calls are ignored. CalibrationError if the timings cannot
    determine them, or if one is malformed (seconds not a finite number > 0, no tokens or KV)."""
    calls = [t for t in timings if t.op in OPS and t.num_seqs > 0]
    _check_enough(calls)
    roofline = CostModel(hardware, model, CostConstants(split_kv_chunk_tokens=chunk_tokens))
    x = np.array([_terms(t, roofline, split_kv) for t in calls])  # [weights, matmul, attention, is_p, is_d]
    y = np.array([t.seconds for t in calls])
    theta, weight_bound = _best_fit(x, y)
    notes = _fill_unidentified(theta, x, weight_bound)
    if theta[2] <= 0:
        raise CalibrationError(
            "decode time does not grow with KV length in these timings, so the attention efficiency cannot be "
            "fitted: time decode steps whose max_kv varies widely at a fixed batch size (launch-bound setups, "
            "e.g. a tiny model on a GPU, cannot be calibrated)")
    command = (meta or {}).get("command")
    constants = CostConstants(
        flops_efficiency=1 / theta[1], weight_bandwidth_efficiency=1 / theta[0], kv_bandwidth_efficiency=1 / theta[2],
        prefill_overhead_s=float(theta[3]), decode_overhead_s=float(theta[4]), split_kv_chunk_tokens=chunk_tokens,
        source=f"fit by engines.sim.calibration from {len(calls)} timings" + (f" ({command})" if command else ""),
    )
    predicted, ops = _predict(theta, x), np.array([t.op for t in calls])
    error = {op: _error(y[ops == op], predicted[ops == op]) for op in OPS}
    return Fit(hardware, model, constants, split_kv, error, tuple(notes), dict(meta or {}), tuple(calls))


def _check_enough(calls: list[CallTiming]) -> None:
    for t in calls:
        # Rows are divided by seconds (relative error); the cost terms need tokens and a KV length.
        if not (np.isfinite(t.seconds) and t.seconds > 0):
            raise CalibrationError(f"{t} has seconds = {t.seconds!r}: every timing must be a finite time > 0 "
                                   "(drop it, or time the call again)")
        for name in ("num_tokens", "max_kv"):
            if getattr(t, name) < 1:
                raise CalibrationError(f"{t} has {name} = {getattr(t, name)}: a timed call must have {name} >= 1")
    for op in OPS:
        mine = [t for t in calls if t.op == op]
        if len(mine) < MIN_CALLS_PER_OP:
            raise CalibrationError(
                f"too few {op} timings to fit the cost model: got {len(mine)}, need at least {MIN_CALLS_PER_OP} "
                f"(time more {op} calls, e.g. with `python -m bench.calibrate`)")
    for op, what, key in (("prefill", "prompt token count", lambda t: t.num_tokens),
                          ("decode", "batch size", lambda t: t.num_seqs),
                          ("decode", "longest KV length", lambda t: t.max_kv)):
        if len({key(t) for t in calls if t.op == op}) < 2:
            raise CalibrationError(f"every {op} timing has the same {what}: vary them, or the fit cannot tell the "
                                   "fixed cost from the part that grows")


def _terms(t: CallTiming, roofline: CostModel, split_kv: bool) -> list[float]:
    """The call's cost terms at efficiency 1 (the coefficients of θ_w, θ_f, θ_kv) and its op."""
    m = roofline.model
    weights = m.weight_bytes / roofline.hardware.hbm_bandwidth
    flop_s = 1 / roofline.hardware.dense_flops
    if t.op == "prefill":
        pairs = t.kv_tokens * (t.max_kv + 1) / 2  # Σ n(n+1)/2 with n_i taken as max_kv (docstring)
        matmul = (m.flops_per_token * t.num_tokens + m.attention_flops_per_token_pair * pairs) * flop_s
        return [weights, matmul, 0.0, 1.0, 0.0]
    kv_len = t.max_kv if not split_kv else max(round(t.kv_tokens / t.num_seqs), 1)
    attention = roofline.attention_seconds(np.full(t.num_seqs, kv_len), split_kv)
    return [weights, m.flops_per_token * t.num_seqs * flop_s, attention, 0.0, 1.0]


def _design(x: np.ndarray, weight_bound: np.ndarray) -> np.ndarray:
    """Columns of θ_w, θ_f, θ_kv, o_prefill, o_decode for a given branch of the max per call."""
    return np.column_stack([x[:, 0] * weight_bound, x[:, 1] * ~weight_bound, x[:, 2], x[:, 3], x[:, 4]])


def _solve(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of relative error (rows / y) with every coefficient >= 0: a negative one is
    held at 0 and the rest refitted. Columns with no data stay 0."""
    a, b = a / y[:, None], np.ones_like(y)
    free = np.flatnonzero(np.abs(a).sum(axis=0) > 0)
    theta = np.zeros(a.shape[1])
    while free.size:
        coef, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        if (coef >= 0).all():
            theta[free] = coef
            break
        free = np.delete(free, np.argmin(coef))
    return theta


def _best_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """θ and each call's branch (True: weight-bound), from the best of three starting branches.

    A fit using both branches has one more constant than one putting every call on the same
    side, and can always use it to pass a few calls at a near tie. It is kept only when it lowers
    the loss by more than the Bayesian information criterion charges for one constant
    (n ln(loss_1 / loss_2) > ln n); otherwise the one-branch fit is taken and the unused branch is
    reported as not identified (`_fill_unidentified`)."""
    n = len(y)
    one_branch = (np.zeros(n, bool), np.ones(n, bool))  # all compute-bound; all weight-bound
    fits = []
    for weight_bound in (x[:, 0] >= x[:, 1], *one_branch):
        for _ in range(100):  # alternate until no call changes branch (a handful of rounds in practice)
            theta = _solve(_design(x, weight_bound), y)
            new = _branch(theta, x, weight_bound)
            if (new == weight_bound).all():
                break
            weight_bound = new
        fits.append((_loss(x, y, theta, weight_bound), theta, weight_bound))
    loss, theta, weight_bound = min(fits, key=lambda f: f[0])
    floor = n * 1e-18  # relative residuals under 1e-9 are rounding, not signal
    for fixed in one_branch:
        fixed_theta = _solve(_design(x, fixed), y)
        fixed_loss = _loss(x, y, fixed_theta, fixed)
        if n * np.log(max(fixed_loss, floor) / max(loss, floor)) <= np.log(n):
            return fixed_theta, fixed
    return theta, weight_bound


def _loss(x: np.ndarray, y: np.ndarray, theta: np.ndarray, weight_bound: np.ndarray) -> float:
    """Sum of squared relative errors of a fit under a branch assignment."""
    return float((((_design(x, weight_bound) @ theta - y) / y) ** 2).sum())


def _branch(theta: np.ndarray, x: np.ndarray, weight_bound: np.ndarray) -> np.ndarray:
    """Which side of max(weights, matmul) each call is on under θ. A side whose θ is 0 (not
    fitted: no call on it) keeps its calls where they were."""
    if theta[0] <= 0 or theta[1] <= 0:
        return weight_bound
    return theta[0] * x[:, 0] >= theta[1] * x[:, 1]


def _fill_unidentified(theta: np.ndarray, x: np.ndarray, weight_bound: np.ndarray) -> list[str]:
    """Give a branch no call landed on the largest θ (lowest efficiency) that still keeps every
    call on the other branch; say so."""
    notes = []
    for side, other, name, why in ((0, 1, "weight_bandwidth_efficiency", "no call was weight-bound"),
                                   (1, 0, "flops_efficiency", "no call was compute-bound")):
        on_side = weight_bound if side == 0 else ~weight_bound
        if theta[side] > 0 and on_side.any():
            continue
        if theta[other] <= 0:
            raise CalibrationError("the timings determine neither the weight-read nor the matmul time (a weight "
                                   "read that bounds every call cannot be told from the fixed overheads): time "
                                   "calls that vary batch size and prompt length up to sizes where the matmuls "
                                   "outlast the weight read")
        theta[side] = float(np.min(theta[other] * x[:, other] / x[:, side]))
        notes.append(f"{name} not identified ({why}): set to {1 / theta[side]:.4g}, the lowest value "
                     "consistent with the timings")
    return notes


def _predict(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.maximum(theta[0] * x[:, 0], theta[1] * x[:, 1]) + theta[2] * x[:, 2] + theta[3] * x[:, 3] + \
        theta[4] * x[:, 4]


def _error(y: np.ndarray, predicted: np.ndarray) -> dict:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - predicted) ** 2).sum()) / ss_tot if ss_tot > 0 else None
    return {"r2": r2, "mape": float(np.mean(np.abs(predicted - y) / y)), "points": int(y.size)}

"""The decode step's cost on a real engine, split into what batch size and KV length each cost.

Step cost model: seconds ~ c0 + c1 B + c2 B max_kv + c3 sum_kv per decode step. c0 is fixed
(one pass over the weights, plus per-step overhead), c1 per token (the weight matmuls growing
with B), c2 padded KV work (this engine gathers every sequence's blocks up to the longest and
attends over the padding), c3 real KV work (reading distinct blocks). A workload run cannot
tell these apart: in an fcfs run one long request sets max_kv for most of the run, so B,
B max_kv and sum_kv move together (correlation 0.96-0.998 measured). So before the runs a short
calibration times decode steps over batches built to vary them independently (same-length
batches, and the same with one near-full-length member, at doubling batch sizes), and the
least-squares fit of those steps is reported as fitted (coefficients, R^2). Each run's decode
time is then attributed to the terms under it ("model share" = c0 + c1 B, the part of a step
that does not depend on KV length; the padded KV share is what length alignment can remove),
with predicted / measured seconds as a check. Each run's own fit is kept in the JSON too, with
its collinearity; read its coefficients only where that is well below 1.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from tqdm import tqdm

from engines.base import CallTiming, Engine, PrefillRequest

TERMS = ("fixed", "per_token", "padded_kv", "kv")


def cost_terms(decodes: list[CallTiming]) -> np.ndarray:
    """Rows [1, B, B * max_kv, sum_kv] of the step cost model, one per decode call."""
    return np.array([[1.0, c.num_seqs, c.num_seqs * c.max_kv, c.kv_tokens] for c in decodes]).reshape(-1, 4)


def fit_step_cost(decodes: list[CallTiming]) -> dict | None:
    """Least-squares seconds ~ c0 + c1 B + c2 B max_kv + c3 sum_kv, as fitted (nothing clamped).
    `collinearity` is the largest correlation between two of B, B max_kv and sum_kv: near 1 the
    data cannot tell those terms apart and the coefficients are not to be read one by one."""
    x, y = cost_terms(decodes), np.array([c.seconds for c in decodes])
    if len(y) < 2 * len(TERMS):
        return None
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    r2 = 1.0 - float(((y - x @ coef) ** 2).sum()) / float(((y - y.mean()) ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(x[:, 1:].T)
    collinearity = float(np.nanmax(np.abs(corr - np.eye(3)))) if np.isfinite(corr).any() else None
    return {"coef": dict(zip(TERMS, coef.tolist())), "r2": r2, "collinearity": collinearity,
            "points": len(y), "shares": cost_shares(decodes, coef.tolist())}


def cost_shares(decodes: list[CallTiming], coef: list[float]) -> dict | None:
    """Each term's share of the decode time the model predicts for these calls (time-weighted:
    sum over calls of c_k x_k / sum of predictions), "model" = fixed + per_token (the part that
    does not depend on KV length), and predicted / measured seconds as a check of the model."""
    x = cost_terms(decodes)
    predicted = float((x @ np.array(coef)).sum())
    if predicted <= 0:  # no decode calls, or a fit that makes no sense for them
        return None
    share = dict(zip(TERMS, ((x * coef).sum(axis=0) / predicted).tolist()))
    return {**share, "model": share["fixed"] + share["per_token"],
            "predicted_over_measured": predicted / sum(c.seconds for c in decodes)}


def calibration_batches(max_seq_len: int, max_batch: int, n_mid: int, reps: int) -> tuple[dict, list[list[str]]]:
    """Sequence lengths by id and the batches to time: short (16 tokens) and `n_mid` mid
    (max_seq_len/2) batches, all one length (B max_kv = sum_kv), and the same with one
    near-full-length member (B max_kv >> sum_kv), at batch sizes doubling from 1 to max_batch.
    Each sequence grows by the decode steps it takes part in; the long one is sized to fit."""
    short = [f"s{i}" for i in range(max(max_batch - 1, 1))]
    mid = [f"m{i}" for i in range(n_mid)]
    batches = []
    for group in (short, mid):
        for b in sorted({*(2**k for k in range(len(group).bit_length())), len(group)} - {0}):
            batches += [group[:b], ["long"] + group[:b - 1]]
    with_long = sum("long" in b for b in batches)
    lengths = {**{i: 16 for i in short}, **{i: max_seq_len // 2 for i in mid},
               "long": max_seq_len - 1 - (reps + 1) * with_long}
    return lengths, batches


def calibrate(engine: Engine, max_batch: int, reps: int = 4) -> list[CallTiming] | None:
    """Decode steps over batches built so that B, B max_kv and sum_kv vary independently, which
    a workload run does not do (module docstring). Each batch is decoded reps + 1 times and its
    first step dropped (cold caches after the previous batch); this also warms the engine up
    before the measured runs. As many mid-length sequences as the device pool holds, up to
    max_batch / 4; None if it cannot hold even the short and long ones."""
    info = engine.describe()
    for n_mid in range(max(max_batch // 4, 1), -1, -1):
        lengths, batches = calibration_batches(info.model.max_seq_len, max_batch, n_mid, reps)
        steps = Counter(i for b in batches for i in b)
        need = sum(info.blocks_for(n + (reps + 1) * steps[i]) for i, n in lengths.items())
        if need <= info.devices[0].kv_blocks:
            break
    else:
        return None
    if lengths["long"] <= info.model.max_seq_len // 2:
        return None
    for n in sorted(set(lengths.values())):  # one prefill per length: no padding
        ids = [i for i, m in lengths.items() if m == n]
        engine.prefill([PrefillRequest(i, [256] + [65] * (n - 1)) for i in ids])
    timings = []
    for batch in tqdm(batches, desc="step cost calibration", unit="batch", leave=False):
        timings += [engine.decode(batch).timing for _ in range(reps + 1)][1:]
    engine.free(list(lengths))
    return timings

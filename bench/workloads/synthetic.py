"""The paper's synthetic mixes: a share of short requests, the rest long.

AlignedServe (arXiv 2605.23389) evaluates mixes with 70-95% short requests, "short" meaning a
context under 1k tokens and "long" 1k-8k (../shared/DESIGN.md §1, second-hand). The paper's text,
as we have it, states neither the distribution within each class nor the output lengths, so these
are our choices, stated here and recorded in every workload's description:

- class: each request is short with probability `short_share`, independently (a Bernoulli draw,
  so the realised share has binomial spread: sd = sqrt(p(1-p)/n));
- short context: uniform over the integers [64, 1024) (mean 543.5): under 1k, and never a
  degenerate few-token prompt;
- long context: uniform over [1024, 8192) (mean 4607.5): 1k up to 8k;
- output: uniform over [16, 512) (mean 263.5) for both classes, independent of the context, so that
  the classes differ in KV length only: that is the spread length alignment acts on. The range
  brackets the Azure conversation trace's output mean (211) and p90.

Uniform, not log-normal, so that the long class really covers 1k-8k and every length the quad-tree
sees is populated; all four ranges are arguments.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from bench.workloads.arrivals import schedule
from bench.workloads.workload import LENGTHS_STREAM, Workload, build_requests, check_count

SHORT_CONTEXT = (64, 1024)
LONG_CONTEXT = (1024, 8192)
OUTPUT = (16, 512)


def _check_range(value: Any, what: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} = {value!r}: give (low, high) token counts, high exclusive") from None
    if not 1 <= lo < hi:
        raise ValueError(f"{what} = {value!r}: need 1 <= low < high")
    return lo, hi


def synthetic_mix(n: int, seed: int = 0, short_share: float = 0.8, *, short_context=SHORT_CONTEXT,
                  long_context=LONG_CONTEXT, output=OUTPUT, arrivals: str = "all-at-once",
                  rate: float | None = None, burstiness: float = 1.0) -> Workload:
    """`n` requests, each short with probability `short_share` (module docstring)."""
    check_count(n)
    if not 0.0 <= short_share <= 1.0:
        raise ValueError(f"short_share = {short_share!r}: a fraction in [0, 1] (the paper uses 0.70-0.95)")
    short, long_, out = (_check_range(short_context, "short_context"), _check_range(long_context, "long_context"),
                         _check_range(output, "output"))
    rng = np.random.default_rng((seed, LENGTHS_STREAM))
    is_short = rng.random(n) < short_share
    prompts = np.where(is_short, rng.integers(*short, size=n), rng.integers(*long_, size=n))
    outputs = rng.integers(*out, size=n)
    offsets, how = schedule(n, seed, arrivals, rate, burstiness)
    labels = np.where(is_short, "short", "long").tolist()
    description = {
        "source": "AlignedServe (arXiv 2605.23389) synthetic mix: 70-95% short (<1k), long 1k-8k",
        "short_share": short_share, "class": "Bernoulli(short_share) per request",
        "short_context": f"uniform integers [{short[0]}, {short[1]})",
        "long_context": f"uniform integers [{long_[0]}, {long_[1]})",
        "output": f"uniform integers [{out[0]}, {out[1]}), independent of class", "arrivals": how}
    name = f"synthetic-{round(100 * short_share)}-short"
    return Workload(name, build_requests(prompts, outputs, offsets, seed, labels=labels), seed, description)

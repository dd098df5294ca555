"""Benchmark workloads from the Azure LLM inference traces, fitted to an engine's max length.

The traces (bench/traces, vendored from ../shared/workloads, CC-BY 4.0, Patel et al., "Splitwise", ISCA 2024) give each
request's arrival TIMESTAMP, ContextTokens and GeneratedTokens, but no text. A workload here is
`n` of those rows made into requests the orchestrator accepts:

Which rows. A seeded random sample without replacement, kept in trace order. A contiguous slice
of 100-200 rows covers under a minute of an hour-long trace and inherits whatever burst that
minute holds; the benchmarks make their own arrival schedules (below) anyway, so what they need
from the trace is its length distribution, and a random sample is an unbiased draw of it.

Lengths. The code trace's prompts reach 7,437 tokens (the trace is cut at that context: its p99
is 7,436) while a CPU benchmark engine holds ~1k. Prompts are scaled by one factor

    s = (max_seq_len - output_reserve) / trace_max_context

taken over the whole trace, not the sample, so it depends on neither `n` nor the seed; the
longest prompt of the trace then leaves `output_reserve` tokens of room. Outputs are NOT scaled:
the code trace's outputs are short (mean 28, p50 13, p99 249) and scaling them by s (~0.1)
would leave most requests one or two tokens, i.e. no decode phase to schedule. A generated
token is one decode iteration a request takes part in, so keeping output counts keeps how long
requests stay in the batch and how fast the batch turns over; scaling prompts keeps the
relative spread of KV lengths, which is what length alignment acts on. The default
`output_reserve` is the trace's p99 output length (capped at half of max_seq_len), so about 99%
of requests keep their exact output length; the others are clamped to fit
(prompt_len + max_tokens - 1 <= max_seq_len, the KV the last token never needs) and counted.

Prompts. Token ids are drawn from the seed in [3, 256) (bytes of the demo tokenizer, clear of
its BOS 256 / EOS 257 / PAD 258) after a leading BOS; prompt_len counts the BOS.

Arrivals, as `vllm bench serve` makes them: all-at-once (rate = inf, every offset 0) or a
Poisson process at `rate` requests/s (exponential gaps; gamma gaps with `burstiness` != 1),
first request at 0, drawn from its own seeded stream so that the same seed gives the same
requests under every schedule.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CODE_TRACE = REPO / "bench" / "traces" / "azure_llm_2023_code.csv"
BOS_ID = 256
TOKEN_RANGE = (3, 256)
"""Prompt token ids are drawn from [3, 256): bytes of the demo tokenizer, clear of BOS/EOS/PAD."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace."""

    offset_s: float
    """Seconds since the trace's first request."""
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request of a workload, ready for `Orchestrator.submit`."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    trace_row: TraceRow

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests drawn from a trace and how they were fitted to the engine."""

    requests: tuple[BenchRequest, ...]
    trace: Path
    seed: int
    max_seq_len: int
    scale: float
    """Factor applied to context lengths (outputs are kept)."""
    output_reserve: int
    clamped: int
    """Requests whose max_tokens was cut to fit max_seq_len."""

    def describe(self) -> dict:
        """What a results file should say about the workload."""
        prompts = np.array([r.prompt_len for r in self.requests])
        outputs = np.array([r.max_tokens for r in self.requests])
        return {
            "trace": str(self.trace.resolve()), "requests": len(self.requests), "seed": self.seed,
            "sample": "random rows without replacement, in trace order",
            "max_seq_len": self.max_seq_len, "context_scale": self.scale,
            "output_reserve": self.output_reserve, "outputs": "unscaled, clamped to fit max_seq_len",
            "clamped": self.clamped, "prompt_len": length_stats(prompts), "max_tokens": length_stats(outputs),
        }


def length_stats(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
            "p99": float(np.percentile(x, 99)), "min": int(x.min()), "max": int(x.max()), "sum": int(x.sum())}


def load_trace(path: str | Path = CODE_TRACE) -> list[TraceRow]:
    """Rows of an Azure LLM trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no requests")
    times = [_timestamp(r["TIMESTAMP"]) for r in rows]
    return [TraceRow(t - times[0], int(r["ContextTokens"]), int(r["GeneratedTokens"]))
            for t, r in zip(times, rows)]


def _timestamp(text: str) -> float:
    """Seconds of a trace timestamp; the traces give 7 fractional digits, datetime takes 6."""
    day, _, frac = text.partition(".")
    return datetime.fromisoformat(day).timestamp() + float("0." + (frac or "0"))


def default_output_reserve(trace: Sequence[TraceRow], max_seq_len: int) -> int:
    """The trace's p99 output length, at most half the window (so prompts keep the other half)."""
    p99 = float(np.percentile([r.generated_tokens for r in trace], 99))
    return min(math.ceil(p99), max_seq_len // 2)


def context_scale(trace: Sequence[TraceRow], max_seq_len: int, output_reserve: int) -> float:
    """s such that the trace's longest context becomes max_seq_len - output_reserve tokens."""
    if not 0 <= output_reserve < max_seq_len - 1:
        raise ValueError(f"output_reserve {output_reserve} must be in [0, max_seq_len - 1 = {max_seq_len - 1})")
    return (max_seq_len - output_reserve) / max(r.context_tokens for r in trace)


def fit_lengths(row: TraceRow, scale: float, max_seq_len: int) -> tuple[int, int, bool]:
    """(prompt_len, max_tokens, clamped): the scaled prompt and the kept output, cut so that
    prompt_len < max_seq_len and prompt_len + max_tokens - 1 <= max_seq_len."""
    prompt_len = min(max(1, round(row.context_tokens * scale)), max_seq_len - 1)
    room = max_seq_len - prompt_len + 1
    want = max(1, row.generated_tokens)
    return prompt_len, min(want, room), want > room


def draw_workload(trace: Sequence[TraceRow], n: int, seed: int, max_seq_len: int,
                  output_reserve: int | None = None, trace_path: Path = CODE_TRACE) -> Workload:
    """`n` requests sampled from `trace` with `seed`, fitted to `max_seq_len` (module docstring)."""
    if not 1 <= n <= len(trace):
        raise ValueError(f"n = {n} requests: the trace has {len(trace)}; ask for 1 to {len(trace)}")
    if output_reserve is None:
        output_reserve = default_output_reserve(trace, max_seq_len)
    scale = context_scale(trace, max_seq_len, output_reserve)
    rng = np.random.default_rng(seed)
    rows = [trace[i] for i in np.sort(rng.choice(len(trace), size=n, replace=False))]
    requests, clamped = [], 0
    for row in rows:
        prompt_len, max_tokens, cut = fit_lengths(row, scale, max_seq_len)
        body = rng.integers(*TOKEN_RANGE, size=prompt_len - 1)
        requests.append(BenchRequest((BOS_ID, *body.tolist()), max_tokens, row))
        clamped += cut
    return Workload(tuple(requests), Path(trace_path), seed, max_seq_len, scale, output_reserve, clamped)


def arrival_offsets(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Seconds after the start at which each of `n` requests arrives, as `vllm bench serve`
    schedules them: rate = inf sends all at once; otherwise gaps are gamma(burstiness,
    1 / (rate * burstiness)), i.e. exponential (Poisson arrivals) at burstiness 1, with mean
    1 / rate. The first request arrives at 0."""
    if rate == math.inf:
        return [0.0] * n
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate ({rate}) and burstiness ({burstiness}) must be > 0")
    rng = np.random.default_rng((seed, 1))  # its own stream: lengths do not depend on the schedule
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=max(n - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:n]

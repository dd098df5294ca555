"""Replaying the Azure LLM inference traces 2023 (bench/traces, CC-BY 4.0).

Source: Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting",
ISCA 2024; Azure Public Dataset `AzureLLMInferenceTrace_{conv,code}.csv`, columns TIMESTAMP,
ContextTokens, GeneratedTokens, about one hour on 2023-11-16. Conversation: 19,366 requests, context
mean 1,155 (p50 1,020, p99 4,142), output mean 211 (p50 129); code: 8,819 requests, context mean
2,048 (p50 1,469, p99 7,436), output mean 28 (p50 13). The traces give lengths, not text.

`azure_workload` chooses rows, lengths and arrivals independently:

Rows. The first `n` (a contiguous slice keeps the trace's own bursts; n = None is the whole trace)
or a seeded random sample of `n` without replacement, kept in trace order (an unbiased draw of the
length distribution; 100-200 contiguous rows cover under a minute of the hour).

Lengths. The trace's own (what the sim engine runs), or, given `max_seq_len`, fitted to a small
engine's window as bench/workloads/window.py says. prompt_len is ContextTokens (the context is what
the KV cache holds); output_len is GeneratedTokens (at least 1).

Arrivals. The trace's own timestamps as offsets from the first chosen request, or those rescaled
by one factor to a mean `rate` (bursts kept), or any `vllm bench serve` schedule
(bench/workloads/arrivals.py).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from bench.workloads.arrivals import schedule
from bench.workloads.window import fit_rows
from bench.workloads.workload import Workload, build_requests, check_count

REPO = Path(__file__).resolve().parents[2]
TRACE_DIR = REPO / "bench" / "traces"
CONV_TRACE = TRACE_DIR / "azure_llm_2023_conv.csv"
CODE_TRACE = TRACE_DIR / "azure_llm_2023_code.csv"
TRACES = {"conv": CONV_TRACE, "code": CODE_TRACE}
SELECTIONS = ("first", "sample")


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace."""

    offset_s: float
    """Seconds since the trace's first request."""
    context_tokens: int
    generated_tokens: int


def load_trace(path: str | Path = CODE_TRACE) -> list[TraceRow]:
    """Rows of an Azure LLM trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    return list(_load(Path(path).resolve()))


@lru_cache(maxsize=8)
def _load(path: Path) -> tuple[TraceRow, ...]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]:
            raise ValueError(f"{path}: expected the columns TIMESTAMP, ContextTokens, GeneratedTokens, got {header}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no requests")
    # The traces give 7 fractional digits; numpy parses them exactly as nanoseconds, and offsets
    # taken as integer differences keep that precision (a float epoch-seconds would not).
    stamps = np.array([r[0] for r in rows], dtype="datetime64[ns]")
    offsets = ((stamps - stamps[0]).astype(np.int64) / 1e9).tolist()
    return tuple(TraceRow(t, int(c), int(g)) for t, (_, c, g) in zip(offsets, rows))


def choose_rows(trace: list[TraceRow], n: int | None, seed: int, select: str) -> list[TraceRow]:
    """The first `n` rows, or `n` rows sampled with `seed` without replacement, in trace order."""
    if select not in SELECTIONS:
        raise ValueError(f"select = {select!r}: choose 'first' (the first n rows) or 'sample' (a seeded sample)")
    if n is None:
        return list(trace)
    check_count(n)
    if n > len(trace):
        raise ValueError(f"n = {n} requests: the trace has {len(trace)}; ask for 1 to {len(trace)}")
    if select == "first":
        return list(trace[:n])
    rng = np.random.default_rng(seed)  # as the former draw_workload: the same seed picks the same rows
    return [trace[i] for i in np.sort(rng.choice(len(trace), size=n, replace=False))]


def azure_workload(kind: str = "conv", n: int | None = None, seed: int = 0, *, select: str = "first",
                   arrivals: str = "trace", rate: float | None = None, burstiness: float = 1.0,
                   max_seq_len: int | None = None, output_reserve: int | None = None,
                   path: str | Path | None = None) -> Workload:
    """Requests of the Azure `kind` trace ("conv" or "code"), as the module docstring says."""
    if path is None:
        if kind not in TRACES:
            raise ValueError(f"kind = {kind!r}: choose one of {', '.join(TRACES)} (or give path)")
        path = TRACES[kind]
    trace = load_trace(path)
    rows = choose_rows(trace, n, seed, select)
    if max_seq_len is None:
        if output_reserve is not None:
            raise ValueError("output_reserve: only used when fitting to a window; give max_seq_len too")
        prompts = [r.context_tokens for r in rows]
        outputs = [max(1, r.generated_tokens) for r in rows]
        fit = None
    else:
        prompts, outputs, fit = fit_rows(rows, trace, max_seq_len, output_reserve)
    offsets, how = schedule(len(rows), seed, arrivals, rate, burstiness, own=np.array([r.offset_s for r in rows]))
    sample = ("all rows" if n is None else f"the first {n} rows" if select == "first"
              else "random rows without replacement, in trace order")
    description = {"trace": str(Path(path).resolve()), "source": "Azure LLM inference traces 2023 (Patel et al., "
                   "Splitwise, ISCA 2024), CC-BY 4.0", "sample": sample, "arrivals": how,
                   "lengths": "the trace's own" if fit is None else "fitted to max_seq_len"}
    name = f"azure-{kind}" if path == TRACES.get(kind) else Path(path).stem
    return Workload(name, build_requests(prompts, outputs, offsets, seed, rows=rows), seed, description, fit)


def draw_workload(trace: list[TraceRow], n: int, seed: int, max_seq_len: int,
                  output_reserve: int | None = None, trace_path: Path = CODE_TRACE) -> Workload:
    """`n` requests sampled from `trace` with `seed`, fitted to `max_seq_len` (window.py), arriving at
    the trace's own offsets; callers usually re-time them with `arrival_offsets`."""
    check_count(n)
    if n > len(trace):
        raise ValueError(f"n = {n} requests: the trace has {len(trace)}; ask for 1 to {len(trace)}")
    rows = choose_rows(trace, n, seed, "sample")
    prompts, outputs, fit = fit_rows(rows, trace, max_seq_len, output_reserve)
    offsets, how = schedule(n, seed, "trace", own=np.array([r.offset_s for r in rows]))
    description = {"trace": str(Path(trace_path).resolve()), "sample": "random rows without replacement, in trace order",
                   "arrivals": how}
    return Workload(f"azure-{Path(trace_path).stem}", build_requests(prompts, outputs, offsets, seed, rows=rows),
                    seed, description, fit)

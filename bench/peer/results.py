"""Read `vllm bench serve`'s result JSON and put the two servers side by side.

`vllm bench serve --save-result` writes one JSON object per run; `figures()` takes what the
comparison reports from it (and refuses a file that lacks one, naming the key), `ratios()`
pairs the runs of the two servers at the same load, and `markdown()` writes the table;
`keep_raw()` and `client_failure()` serve every benchmark that runs the client (bench.peer,
bench.cluster_serving).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

FIGURES = {
    # ours: vllm bench serve's key
    "completed": "completed",
    "failed": "failed",
    "duration_s": "duration",
    "output_tok_s": "output_throughput",
    "request_s": "request_throughput",
    "input_tokens": "total_input_tokens",
    "output_tokens": "total_output_tokens",
    "ttft_p50_ms": "p50_ttft_ms",
    "ttft_p99_ms": "p99_ttft_ms",
    "ttft_mean_ms": "mean_ttft_ms",
    "tpot_p50_ms": "p50_tpot_ms",
    "tpot_p99_ms": "p99_tpot_ms",
    "tpot_mean_ms": "mean_tpot_ms",
    "itl_p50_ms": "p50_itl_ms",
    "itl_p99_ms": "p99_itl_ms",
    "e2el_p50_ms": "p50_e2el_ms",
    "e2el_p99_ms": "p99_e2el_ms",
}
"""What each run reports, from `vllm bench serve` run with --percentile-metrics
ttft,tpot,itl,e2el --metric-percentiles 50,99."""
RATIOS = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")
"""The figures compared as AlignedServe / vLLM (throughput: above 1 is better for AlignedServe;
latencies: below 1 is)."""


@dataclass(frozen=True, slots=True)
class Load:
    """The load of one run: a concurrency cap (all requests sent at once, at most this many in
    flight) or a Poisson arrival rate (requests per second, no cap)."""

    concurrency: int | None = None
    rate: float | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("a load is a concurrency or a rate, not both or neither")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency: {self.concurrency}; must be >= 1")
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate: {self.rate}; must be a positive number of requests per second")

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency is not None else f"Poisson {self.rate:g} req/s"

    @property
    def slug(self) -> str:
        return f"c{self.concurrency}" if self.concurrency is not None else f"rate{self.rate:g}"


def figures(result: dict, requests: int | None = None) -> dict:
    """The comparison's figures from one `vllm bench serve` result; ValueError names a missing
    key (a run without the percentiles asked for, or not a `vllm bench serve` result)."""
    if not isinstance(result, dict):
        raise ValueError(f"a vllm bench serve result is a JSON object, got {type(result).__name__}")
    missing = [key for key in FIGURES.values() if key not in result]
    if missing:
        raise ValueError(f"not in the vllm bench serve result: {', '.join(missing)} (run it with "
                         "--save-result --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99)")
    out = {ours: result[theirs] for ours, theirs in FIGURES.items()}
    if requests is not None and out["completed"] != requests:
        out["incomplete"] = f"{out['completed']} of {requests} requests completed, {out['failed']} failed"
    return out


def ttft_by_prompt_len(result: dict) -> dict[int, float]:
    """Median TTFT in ms of each prompt length, from a detailed result (--save-detailed): at
    concurrency 1 it is the prefill time of that length (plus one decode step and the HTTP)."""
    by: dict[int, list[float]] = {}
    for n, ttft in zip(result.get("input_lens") or [], result.get("ttfts") or []):
        if ttft:
            by.setdefault(int(n), []).append(ttft * 1000)
    return {n: round(statistics.median(v), 1) for n, v in sorted(by.items())}


def ratios(aligned: dict, vllm: dict) -> dict:
    """AlignedServe / vLLM for each of RATIOS (None where vLLM's figure is 0 or missing)."""
    out = {}
    for key in RATIOS:
        a, v = aligned.get(key), vllm.get(key)
        out[key] = a / v if a is not None and v else None
    return out


@dataclass(frozen=True, slots=True)
class Row:
    """One load, both servers (and the floor, where it was measured)."""

    load: Load
    aligned: dict | None
    vllm: dict | None
    floor_tok_s: float | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["load"] = {"label": self.load.label, **asdict(self.load)}
        out["aligned_over_vllm"] = ratios(self.aligned, self.vllm) if self.aligned and self.vllm else None
        return out


def _num(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def markdown(rows: list[Row]) -> str:
    """The table: per load, each server's output tok/s, TTFT and TPOT p50/p99, and the ratios
    AlignedServe / vLLM; the transformers floor's tok/s where measured."""
    head = ("| load | server | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | done |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for row in rows:
        for name, f in (("vLLM", row.vllm), ("AlignedServe", row.aligned)):
            if f is None:
                continue
            lines.append(f"| {row.load.label} | {name} | {_num(f['output_tok_s'])} | {_num(f['ttft_p50_ms'], 0)} | "
                         f"{_num(f['ttft_p99_ms'], 0)} | {_num(f['tpot_p50_ms'], 0)} | {_num(f['tpot_p99_ms'], 0)} | "
                         f"{f['completed']}/{f['completed'] + f['failed']} |")
        if row.aligned and row.vllm:
            r = ratios(row.aligned, row.vllm)
            lines.append(f"| {row.load.label} | **AlignedServe / vLLM** | {_ratio(r['output_tok_s'])} | "
                         f"{_ratio(r['ttft_p50_ms'])} | {_ratio(r['ttft_p99_ms'])} | {_ratio(r['tpot_p50_ms'])} | "
                         f"{_ratio(r['tpot_p99_ms'])} | |")
        if row.floor_tok_s is not None:
            lines.append(f"| {row.load.label} | transformers `generate` (static batches) | {_num(row.floor_tok_s)} "
                         "| | | | | |")
    return "\n".join(lines) + "\n"


RAW_DROP = ("generated_texts", "itls", "errors")
"""Per-request fields of a detailed `vllm bench serve` result left out of the committed copy
(large, or text)."""


def keep_raw(raw: dict, path: Path) -> str:
    """Commit-sized copy of a detailed result (without RAW_DROP) at `path`; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in raw.items() if k not in RAW_DROP}, indent=1) + "\n")
    return str(path)


def client_failure(tag: str, why: str, log: Path) -> str:
    """Say on stderr that `vllm bench serve` failed (`why`), with the end of its log; the run's
    error string."""
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    print(f"{tag}: the client failed ({why}); the end of {log}:\n{tail}", file=sys.stderr, flush=True)
    return f"vllm bench serve failed: {why} (log: {log})"

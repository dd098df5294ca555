"""The metrics of one benchmark run, computed the same way for every engine and every harness.

    summarize(requests, scheduled, iterations, transfers, slo=Slo(...), calls=..., hardware=...)

takes what a run leaves behind (the `Request`s with their token times, each one's scheduled
arrival, the run loop's `IterationRecord`s and `TransferRecord`s, optionally the engine's
`CallTiming`s) and returns one JSON-ready dict. Definitions follow `vllm bench serve`
(DESIGN.md §6):

- completed: requests that finished with stop or length; everything else (cancelled, error, not
  finished) is failed. Latencies, output tokens and goodput count completed requests only.
- makespan: first scheduled arrival to last finish; output tok/s and request/s are over it.
- TTFT = first token - scheduled arrival (what a client sees, not `Request.arrival_time`);
  TPOT = (last token - first token) / (tokens - 1), per request with more than one token;
  ITL = gaps between consecutive tokens, pooled over requests; E2E = finish - scheduled arrival.
  Each as mean / p50 / p90 / p99 (`np.percentile`, linear, as vLLM); None where there is no value.
- goodput: completed requests per second of makespan with TTFT <= slo.ttft_s and
  TPOT <= slo.tpot_s (a one-token request has no TPOT and meets that bound, as in vLLM);
  `slo_met_share` is their share of all requests.
- decode tok/s = decode tokens / decode seconds, decode seconds = the decode steps' own time plus
  the bubble (decode-device time waiting for KV loads): the decode rate a policy gets, prefill
  excluded. The steps' own time is the engine's decode calls when `calls` is given; otherwise
  each decoding iteration's seconds less its bubble, which also holds any prefill run in the same
  iteration (pass `calls` where iterations mix prefill and decode).
- alignment, token-weighted: sum(B x alignment) / sum(B) over decoding iterations.
- switches per decoding iteration; bubble share of decode seconds.
- KV bytes moved (every hop of a two-hop move counts), per link from the transfer records, and
  link utilisation = bytes moved / makespan / `link_bandwidth` when that is given: all hops are
  counted against one link's bandwidth, so with several links busy it can pass 1.
- MBU of the decode steps when `hardware` is given: sum over decoding iterations of
  (W + b_kv x B x kv_mean) / their steps' own seconds (bubble excluded: no bytes are read
  while the device waits) / HBM bandwidth: the roofline t_step >= (W + b_kv sum L) / BW.
- scheduler decision time per iteration (`IterationRecord.schedule_seconds`, wall time even
  under virtual time): mean / p50 / p90 / p99 / max and the share under 5 ms (the paper: >95%).

`series` holds what the plots need, thinned to at most `series_points` values each: TTFT and
TPOT per request (sorted, at evenly spaced ranks, so a CDF drawn from them keeps its shape) and
per decoding iteration (end, batch_size, kv_max, kv_mean, alignment), evenly spaced in time order.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from engines.base import CallTiming
from orchestrator.core import FinishReason, Request
from orchestrator.metrics import IterationRecord
from orchestrator.transfers import TransferRecord

FAST_DECISION_S = 0.005
"""A scheduler decision under this is 'fast' (the paper reports >95% of decisions under 5 ms)."""
COMPLETED = (FinishReason.STOP, FinishReason.LENGTH)
RATIO_KEYS: dict[str, tuple[str, ...]] = {
    "output_tok_s": ("output_tok_s",), "decode_tok_s": ("decode_tok_s",),
    "goodput_req_s": ("goodput_req_s",),
    **{f"{m}_{p}": (f"{m}_s", p) for m in ("ttft", "tpot", "itl", "e2e") for p in ("p50", "p90", "p99")},
}
"""What `ratios` compares: name -> path into a summarize() dict."""


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objectives a request must meet to count toward goodput."""

    ttft_s: float
    """Longest time to first token, seconds."""
    tpot_s: float
    """Longest mean time per output token after the first, seconds."""


@dataclass(frozen=True, slots=True)
class Hardware:
    """The decode roofline of one model on one device, for MBU. A mapping with these keys is
    taken too; `Hardware.of(hardware_profile, model_profile)` reads the sim profiles."""

    weight_bytes: float
    """W: bytes a decode step reads for the weights (parameters x bytes per parameter)."""
    kv_bytes_per_token: float
    """b_kv = 2 x layers x kv_heads x head_dim x bytes per element."""
    hbm_bandwidth: float
    """Device memory bandwidth, bytes/s."""

    @classmethod
    def of(cls, hardware, model) -> Hardware:
        """From objects with `hbm_bandwidth` and `weight_bytes`, `kv_bytes_per_token` (the sim's
        HardwareProfile and ModelProfile)."""
        return cls(model.weight_bytes, model.kv_bytes_per_token, hardware.hbm_bandwidth)


def summarize(requests: Sequence[Request], scheduled: Sequence[float], iterations: Sequence[IterationRecord],
              transfers: Sequence[TransferRecord] = (), *, slo: Slo | None, calls: Sequence[CallTiming] | None = None,
              hardware: Hardware | Mapping | None = None, link_bandwidth: float | None = None,
              series_points: int = 1000) -> dict:
    """The run's metrics (module docstring). `scheduled[i]` is request i's scheduled arrival on
    the run loop's clock; `calls` the engine's call timings (for the decode steps' own time);
    `link_bandwidth` bytes/s of the link KV moves are measured against."""
    if len(scheduled) != len(requests):
        raise ValueError(f"scheduled: {len(scheduled)} arrival times for {len(requests)} requests; give one each")
    if isinstance(hardware, Mapping):
        hardware = Hardware(**hardware)
    done = [(r, t) for r, t in zip(requests, scheduled) if r.finish_reason in COMPLETED]
    finishes = [r.finish_time for r in requests if r.finish_time is not None]
    makespan = max(finishes) - min(scheduled) if finishes else None
    per_s = (lambda n: n / makespan) if makespan and makespan > 0 else (lambda n: None)
    ttft = {r: r.first_token_time - t for r, t in done if r.first_token_time is not None}
    tpot = {r: (r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
            for r, _ in done if len(r.token_times) > 1}
    itl = [b - a for r, _ in done for a, b in zip(r.token_times, r.token_times[1:])]
    output_tokens = sum(len(r.output_ids) for r, _ in done)
    good = sum(ttft[r] <= slo.ttft_s and tpot.get(r, 0.0) <= slo.tpot_s for r in ttft) if slo else None
    return {
        "requests": len(requests), "completed": len(done), "failed": len(requests) - len(done),
        "finish_reasons": dict(Counter(r.finish_reason.value if r.finish_reason else "unfinished" for r in requests)),
        "makespan_s": makespan, "output_tokens": output_tokens,
        "output_tok_s": per_s(output_tokens), "request_s": per_s(len(done)),
        "ttft_s": percentiles(ttft.values()), "tpot_s": percentiles(tpot.values()), "itl_s": percentiles(itl),
        "e2e_s": percentiles([r.finish_time - t for r, t in done]),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s} if slo else None,
        "goodput_req_s": per_s(good) if slo else None,
        "slo_met_share": good / len(requests) if slo and requests else None,
        **decode_metrics(iterations, calls, hardware),
        **transfer_metrics(iterations, transfers, makespan, link_bandwidth),
        **schedule_metrics(iterations),
        "series": series(ttft.values(), tpot.values(), iterations, series_points),
    }


def decode_metrics(iterations: Sequence[IterationRecord], calls: Sequence[CallTiming] | None,
                   hardware: Hardware | None) -> dict:
    """Decode rate, batch shape, switches, bubble and MBU (module docstring)."""
    decoding = [r for r in iterations if r.batch_size]
    tokens = sum(r.batch_size for r in decoding)
    if calls is not None:
        # A chunked-prefill step ("mixed") is the decode step its decode tokens waited for.
        step_s = sum(c.seconds for c in calls if c.op in ("decode", "mixed"))
    else:
        step_s = sum(r.seconds - r.bubble_seconds for r in decoding)
    bubble = sum(r.bubble_seconds for r in iterations)
    decode_s = step_s + bubble
    switches = sum(r.switch for r in iterations)
    mbu = None
    if hardware is not None and step_s > 0:
        read = sum(hardware.weight_bytes + hardware.kv_bytes_per_token * r.batch_size * r.kv_mean for r in decoding)
        mbu = read / step_s / hardware.hbm_bandwidth
    return {
        "iterations": len(iterations), "decode_iterations": len(decoding), "decode_tokens": tokens,
        "decode_step_s": step_s, "decode_s": decode_s, "decode_tok_s": tokens / decode_s if decode_s else None,
        "mean_batch": tokens / len(decoding) if decoding else None,
        "alignment": sum(r.batch_size * r.alignment for r in decoding) / tokens if tokens else None,
        "switches": switches, "switch_rate": switches / len(decoding) if decoding else None,
        "bubble_s": bubble, "bubble_share": bubble / decode_s if decode_s else None,
        "mbu": mbu,
    }


def transfer_metrics(iterations: Sequence[IterationRecord], transfers: Sequence[TransferRecord],
                     makespan: float | None, link_bandwidth: float | None) -> dict:
    moved = sum(r.transfer_bytes for r in iterations)
    by_link = Counter()
    for t in transfers:
        by_link[f"{t.src}->{t.dst}"] += t.bytes
    return {
        "transfer_bytes": moved, "transfer_bytes_by_link": dict(by_link),
        "transfer_seconds": sum(t.seconds for t in transfers),
        "link_utilisation": moved / makespan / link_bandwidth if link_bandwidth and makespan else None,
    }


def schedule_metrics(iterations: Sequence[IterationRecord]) -> dict:
    seconds = [r.schedule_seconds for r in iterations]
    return {
        "schedule_s": {**percentiles(seconds), "max": max(seconds) if seconds else None},
        "schedule_under_5ms": sum(s < FAST_DECISION_S for s in seconds) / len(seconds) if seconds else None,
    }


def percentiles(values) -> dict:
    """mean, p50, p90, p99 of `values`; each None when there are none."""
    v = np.fromiter(values, dtype=float)
    if not v.size:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99]).tolist()
    return {"mean": float(v.mean()), "p50": p50, "p90": p90, "p99": p99}


def series(ttft, tpot, iterations: Sequence[IterationRecord], points: int) -> dict:
    """Per-request TTFT and TPOT (sorted, thinned at evenly spaced ranks) and per decoding
    iteration samples (thinned evenly in time order), at most `points` each."""
    decoding = [r for r in iterations if r.batch_size]
    keep = [decoding[i] for i in _spread(len(decoding), points)]
    return {
        "ttft_s": _thin_sorted(ttft, points), "tpot_s": _thin_sorted(tpot, points),
        "iterations": {
            "end": [_short(r.end) for r in keep], "batch_size": [r.batch_size for r in keep],
            "kv_max": [r.kv_max for r in keep], "kv_mean": [_short(r.kv_mean) for r in keep],
            "alignment": [_short(r.alignment) for r in keep],
        },
    }


def ratios(metrics: Mapping, base: Mapping) -> dict:
    """Each `RATIO_KEYS` figure of `metrics` over the same figure of `base` (None where either is
    missing or the base is 0): >1 means larger than the base."""
    return {k: _ratio(pick(metrics, path), pick(base, path)) for k, path in RATIO_KEYS.items()}


def pick(d: Mapping, path: tuple[str, ...]):
    """d[path[0]][path[1]]...; None where a key is missing."""
    for key in path:
        d = d.get(key) if isinstance(d, Mapping) else None
    return d


def _ratio(a, b):
    return a / b if a is not None and b else None


def _spread(n: int, points: int) -> list[int]:
    """At most `points` indices into range(n), evenly spaced, first and last included."""
    if n <= points:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, points).round().astype(int).tolist()))


def _thin_sorted(values, points: int) -> list[float]:
    v = sorted(values)
    return [_short(v[i]) for i in _spread(len(v), points)]


def _short(x: float) -> float:
    """Six significant digits: enough for a plot, a third of the JSON."""
    return float(f"{x:.6g}")

"""Prometheus /metrics in vLLM's naming style (`vllm:num_requests_running` ->
`alignedserve_num_requests_running`), on a registry of its own per admin app.

Gauges and counters are read from one `Orchestrator.snapshot()` per scrape (a custom collector),
so the run loop keeps no Prometheus objects and a scrape's figures describe one moment; the latency
histograms are fed from finished requests by `Telemetry.update()`, off the loop thread.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from orchestrator.core import FinishReason, Request
from orchestrator.executor import FAILURE_CAUSES
from orchestrator.service import Orchestrator
from serving.admin.telemetry import tpot

# vLLM's bucket edges (vllm/v1/metrics/loggers.py), so dashboards built for it read ours.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StateCollector:
    """Gauges and counters from a snapshot of the orchestrator taken at each scrape."""

    def __init__(self, orch: Orchestrator):
        self.orch = orch

    def collect(self) -> Iterator[Metric]:
        snap = self.orch.snapshot()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"alignedserve_{name}", doc, value=value)

        yield gauge("num_requests_running", "Requests in the running (decoding) batch.", len(snap.running))
        yield gauge("num_requests_waiting", "Requests accepted and waiting for admission (no KV yet).",
                    len(snap.waiting))
        yield gauge("num_requests_parked", "Requests whose KV is in (or moving to) the host pool.", len(snap.parked))
        yield gauge("num_requests_staged", "Requests staged for the next batch or loaded as refill candidates.",
                    len(snap.staged) + len(snap.candidates))
        usage = GaugeMetricFamily("alignedserve_kv_cache_usage_ratio",
                                  "KV blocks the engine holds in a tier over the tier's capacity (1 = full).",
                                  labels=["tier"])
        for tier, b in snap.kv.items():
            usage.add_metric([tier], b.used / b.capacity if b.capacity else 0.0)
        yield usage
        totals = snap.totals
        yield gauge("alignment_efficiency", "Mean sum(L) / (batch size x max L) of the last 256 decode "
                    "iterations (1 = every member of a batch has the same KV length).",
                    totals["recent"]["alignment"])
        yield gauge("draining", "1 while an operator has stopped admission (drain), else 0.", float(snap.draining))
        decision = totals.get("decision") or {}
        if decision.get("measured_s") is not None:
            yield gauge("decode_step_seconds", "The last decode step's measured time.", decision["measured_s"])
        if decision.get("predicted_s") is not None:
            yield gauge("decode_step_predicted_seconds", "The last decode step's time as the policy predicted it "
                        "from the engine's step cost.", decision["predicted_s"])
        decisions = GaugeMetricFamily("alignedserve_policy_decisions_recent",
                                      "The policy's decisions over the last 256 decode iterations, by kind "
                                      "(filled, grouped, switched, preempted, waiting).", labels=["kind"])
        for kind, n in decision.get("kinds", {}).items():
            decisions.add_metric([kind], n)
        yield decisions

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"alignedserve_{name}", doc, value=value)

        yield counter("batch_switches", "Running batches replaced by a staged batch.", totals["switches"])
        yield counter("kv_transfer_bytes", "KV bytes moved between tiers (each hop counted).", totals["transfer_bytes"])
        yield counter("generation_tokens", "Tokens generated.", totals["tokens"])
        yield counter("bubble_seconds", "Decode-device seconds spent waiting for KV transfers.",
                      totals["bubble_seconds"])
        refused = CounterMetricFamily("alignedserve_requests_refused", "Requests refused before they were "
                                      "accepted, by reason: the field named, or queue (overload) and server "
                                      "(draining, shutting down).", labels=["reason"])
        for reason, n in sorted(totals.get("refused", {}).items()):
            refused.add_metric([reason], n)
        yield refused
        finished = CounterMetricFamily("alignedserve_requests_finished", "Requests finished, by finish reason.",
                                       labels=["reason"])
        for reason in FinishReason:
            finished.add_metric([reason.value], totals["finished"].get(reason.value, 0))
        yield finished
        failed = CounterMetricFamily("alignedserve_requests_failed", "Requests ended with an error, by where it "
                                     "happened: prefill, decode, kv_move (a KV move failed, was refused or "
                                     "passed transfer_timeout_s), engine, scheduler.", labels=["cause"])
        for cause in FAILURE_CAUSES:
            failed.add_metric([cause], totals.get("failed", {}).get(cause, 0))
        yield failed


class PrometheusMetrics:
    """One registry: the state collector and three latency histograms."""

    def __init__(self, orch: Orchestrator):
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(orch))
        self.ttft = Histogram("alignedserve_time_to_first_token_seconds",
                              "Time from arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("alignedserve_time_per_output_token_seconds",
                              "Per request: (last token time - first token time) / (tokens - 1).",
                              buckets=TOKEN_BUCKETS, registry=self.registry)
        self.itl = Histogram("alignedserve_inter_token_latency_seconds",
                             "Time between two consecutive tokens of a request.",
                             buckets=TOKEN_BUCKETS, registry=self.registry)

    def observe(self, r: Request) -> None:
        """Take a finished request's latencies (its token times no longer change)."""
        if r.first_token_time is not None:
            self.ttft.observe(max(0.0, r.first_token_time - r.arrival_time))
        per_token = tpot(r)
        if per_token is not None:
            self.tpot.observe(per_token)
        times = r.token_times
        for a, b in zip(times, times[1:]):
            self.itl.observe(b - a)

    def render(self) -> bytes:
        return generate_latest(self.registry)

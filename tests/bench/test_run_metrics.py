"""bench.run_metrics: vllm-bench-serve metrics of one run, checked against hand-computed values.

The times are multiples of 1/8 so that every difference is exact in binary and the SLO bounds
can be tested right at the edge."""
from __future__ import annotations

import pytest

from bench.run_metrics import Hardware, Slo, percentiles, ratios, summarize
from engines.base import CallTiming
from orchestrator.core import FinishReason, Request, RequestState
from orchestrator.metrics import IterationRecord
from orchestrator.transfers import TransferRecord


def request(rid: str, token_times: list[float], reason: FinishReason | None = FinishReason.LENGTH,
            finish: float | None = None) -> Request:
    """A request as the run loop leaves it: one output token per time, finished at the last."""
    r = Request(rid, prompt_ids=(1, 2, 3), max_tokens=max(len(token_times), 1))
    r.output_ids = [7] * len(token_times)
    r.token_times = list(token_times)
    r.first_token_time = token_times[0] if token_times else None
    if reason is not None:
        r.state, r.finish_reason = RequestState.FINISHED, reason
        r.finish_time = finish if finish is not None else token_times[-1]
    return r


def iteration(seconds=0.0, batch_size=0, kv_max=0, kv_mean=0.0, bubble=0.0, switch=False, transfer_bytes=0,
              schedule=0.0, end=0.0) -> IterationRecord:
    return IterationRecord(end=end, seconds=seconds, batch_size=batch_size, kv_max=kv_max, kv_mean=kv_mean,
                           alignment=kv_mean / kv_max if kv_max else 0.0, prefill_tokens=0, bubble_seconds=bubble,
                           switch=switch, device_blocks_used=0, host_blocks_used=0, transfer_bytes=transfer_bytes,
                           schedule_seconds=schedule)


# Scheduled at 0, 1, 2.  TTFT .5 / .25 / 1.0; TPOT .125 / .25 / .5; E2E .875 / .5 / 2.0;
# ITL pooled .125 x3, .25, .5 x2; 9 tokens; makespan 0 -> 4.0.
THREE = ([0.5, 0.625, 0.75, 0.875], [1.25, 1.5], [3.0, 3.5, 4.0])
SCHEDULED = [0.0, 1.0, 2.0]

# Two decode iterations and one wait for a load: B 2 at half alignment, then B 4 aligned after
# a switch and a 0.1 s bubble; the idle wait adds 0.05 s of bubble. Decisions 1, 2 and 10 ms.
ITERATIONS = [
    iteration(0.1, 2, 100, 50.0, transfer_bytes=1000, schedule=0.001, end=1.0),
    iteration(0.3, 4, 100, 100.0, bubble=0.1, switch=True, transfer_bytes=3000, schedule=0.002, end=2.0),
    iteration(0.05, 0, bubble=0.05, schedule=0.010, end=3.0),
]


def three(slo=Slo(ttft_s=0.5, tpot_s=0.25), **kw) -> dict:
    return summarize([request(str(i), t) for i, t in enumerate(THREE)], SCHEDULED, ITERATIONS, slo=slo, **kw)


def test_latency_percentiles_follow_vllm_definitions():
    m = three()
    assert m["ttft_s"] == pytest.approx({"mean": 1.75 / 3, "p50": 0.5, "p90": 0.9, "p99": 0.99})
    assert m["tpot_s"] == pytest.approx({"mean": 0.875 / 3, "p50": 0.25, "p90": 0.45, "p99": 0.495})
    assert m["itl_s"] == pytest.approx({"mean": 1.625 / 6, "p50": 0.1875, "p90": 0.5, "p99": 0.5})
    assert m["e2e_s"] == pytest.approx({"mean": 3.375 / 3, "p50": 0.875, "p90": 1.775, "p99": 1.9775})


def test_throughput_is_over_the_makespan_from_first_scheduled_arrival():
    m = three()
    assert (m["requests"], m["completed"], m["failed"]) == (3, 3, 0)
    assert m["makespan_s"] == 4.0 and m["output_tokens"] == 9
    assert m["output_tok_s"] == pytest.approx(2.25) and m["request_s"] == pytest.approx(0.75)


def test_goodput_counts_exactly_the_requests_meeting_both_bounds_inclusive():
    m = three(Slo(ttft_s=0.5, tpot_s=0.25))  # request 0 and 1 meet both at the edge; 2 misses TTFT
    assert m["goodput_req_s"] == pytest.approx(2 / 4.0) and m["slo_met_share"] == pytest.approx(2 / 3)
    assert three(Slo(ttft_s=0.5, tpot_s=0.2))["slo_met_share"] == pytest.approx(1 / 3)  # 1 misses TPOT
    assert three(Slo(ttft_s=1.0, tpot_s=0.5))["slo_met_share"] == pytest.approx(1.0)
    assert three(slo=None)["goodput_req_s"] is None


def test_a_one_token_request_has_no_tpot_and_meets_the_tpot_bound():
    m = summarize([request("a", [0.25])], [0.0], [], slo=Slo(ttft_s=0.5, tpot_s=0.0))
    assert m["tpot_s"]["p50"] is None and m["itl_s"]["mean"] is None
    assert m["slo_met_share"] == 1.0 and m["ttft_s"]["p50"] == 0.25


def test_failed_and_unfinished_requests_are_counted_apart_from_latencies():
    ok = request("ok", [0.5, 1.0])
    failed = request("err", [0.25, 3.0], FinishReason.ERROR)
    cancelled = request("cancel", [], FinishReason.CANCELLED, finish=2.0)
    pending = request("pending", [0.75], reason=None)
    m = summarize([ok, failed, cancelled, pending], [0.0] * 4, [], slo=Slo(1.0, 1.0))
    assert (m["completed"], m["failed"]) == (1, 3)
    assert m["finish_reasons"] == {"length": 1, "error": 1, "cancelled": 1, "unfinished": 1}
    assert m["ttft_s"]["p99"] == 0.5 and m["output_tokens"] == 2
    assert m["makespan_s"] == 3.0  # the failed request's finish still ends the run
    assert m["slo_met_share"] == pytest.approx(1 / 4)


def test_decode_rate_alignment_switches_and_bubble_from_iterations():
    m = three()
    assert (m["iterations"], m["decode_iterations"], m["decode_tokens"]) == (3, 2, 6)
    assert m["decode_step_s"] == pytest.approx(0.3) and m["bubble_s"] == pytest.approx(0.15)
    assert m["decode_s"] == pytest.approx(0.45) and m["decode_tok_s"] == pytest.approx(6 / 0.45)
    assert m["mean_batch"] == 3.0 and m["alignment"] == pytest.approx((2 * 0.5 + 4 * 1.0) / 6)
    assert (m["switches"], m["switch_rate"]) == (1, 0.5)
    assert m["bubble_share"] == pytest.approx(1 / 3)


def test_engine_calls_give_the_decode_steps_own_time_without_prefill():
    calls = [CallTiming("prefill", 1.0, 2, 64, 64, 32), CallTiming("decode", 0.08, 2, 2, 100, 100),
             CallTiming("decode", 0.15, 4, 4, 400, 100)]
    m = three(calls=calls)
    assert m["decode_step_s"] == pytest.approx(0.23) and m["decode_s"] == pytest.approx(0.38)
    assert m["decode_tok_s"] == pytest.approx(6 / 0.38)


def test_mbu_is_bytes_read_by_decode_steps_over_their_time_and_hbm_bandwidth():
    # W + b_kv B kv_mean: (1000 + 10*2*50) + (1000 + 10*4*100) = 7000 bytes in 0.1 + 0.2 s.
    hw = Hardware(weight_bytes=1000, kv_bytes_per_token=10, hbm_bandwidth=1e5)
    assert three(hardware=hw)["mbu"] == pytest.approx(7000 / 0.3 / 1e5)
    as_mapping = {"weight_bytes": 1000, "kv_bytes_per_token": 10, "hbm_bandwidth": 1e5}
    assert three(hardware=as_mapping)["mbu"] == pytest.approx(7000 / 0.3 / 1e5)
    assert three()["mbu"] is None


def test_mbu_of_one_step_at_the_roofline_is_one():
    class Profile:  # the sim profiles' attribute names
        weight_bytes, kv_bytes_per_token, hbm_bandwidth = 2e9, 1e5, 3.35e12
    hw = Hardware.of(Profile, Profile)
    step = iteration(seconds=(2e9 + 1e5 * 8 * 1000) / 3.35e12, batch_size=8, kv_max=1000, kv_mean=1000.0)
    assert summarize([], [], [step], slo=None, hardware=hw)["mbu"] == pytest.approx(1.0)


def test_kv_moves_by_link_and_link_utilisation():
    transfers = [TransferRecord("host", "cuda:1", 2, 1500, 0.5), TransferRecord("cuda:1", "cuda:0", 2, 1500, 0.05),
                 TransferRecord("host", "cuda:1", 1, 1000, 0.25)]
    m = three(transfers=transfers, link_bandwidth=1000.0)
    assert m["transfer_bytes"] == 4000 and m["transfer_seconds"] == pytest.approx(0.8)
    assert m["transfer_bytes_by_link"] == {"host->cuda:1": 2500, "cuda:1->cuda:0": 1500}
    assert m["link_utilisation"] == pytest.approx(4000 / 4.0 / 1000.0)
    assert three()["link_utilisation"] is None


def test_scheduler_decision_times():
    m = three()
    assert m["schedule_s"]["max"] == 0.010 and m["schedule_s"]["p50"] == 0.002
    assert m["schedule_s"]["mean"] == pytest.approx(0.013 / 3)
    assert m["schedule_under_5ms"] == pytest.approx(2 / 3)


def test_empty_inputs_give_none_not_a_crash():
    m = summarize([], [], [], [], slo=Slo(1.0, 1.0), hardware=Hardware(1, 1, 1), link_bandwidth=1.0)
    assert m["makespan_s"] is None and m["output_tok_s"] is None and m["goodput_req_s"] is None
    assert m["ttft_s"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert m["decode_tok_s"] is None and m["alignment"] is None and m["mbu"] is None
    assert m["schedule_s"]["max"] is None and m["schedule_under_5ms"] is None
    assert m["series"]["tpot_s"] == [] and m["series"]["iterations"]["kv_max"] == []
    assert percentiles([])["p99"] is None


def test_series_are_thinned_but_keep_the_ends():
    reqs = [request(str(i), [1.0, 1.0 + (i + 1) / 8]) for i in range(50)]
    steps = [iteration(0.1, 1, i + 1, float(i + 1), end=float(i)) for i in range(100)]
    s = summarize(reqs, [0.0] * 50, steps, slo=None, series_points=10)["series"]
    assert len(s["tpot_s"]) == 10 and s["tpot_s"][0] == 0.125 and s["tpot_s"][-1] == 50 / 8
    assert s["tpot_s"] == sorted(s["tpot_s"]) and len(s["ttft_s"]) == 10
    it = s["iterations"]
    assert len(it["end"]) == 10 and it["end"][0] == 0.0 and it["end"][-1] == 99.0 and it["kv_max"][-1] == 100


def test_scheduled_times_must_match_requests():
    with pytest.raises(ValueError, match="scheduled"):
        summarize([request("a", [1.0])], [], [], slo=None)


def test_ratios_to_a_baseline():
    fast, slow = three(), three(calls=[CallTiming("decode", 0.9, 6, 6, 600, 100)])
    vs = ratios(fast, slow)
    assert vs["decode_tok_s"] == pytest.approx((6 / 0.45) / (6 / 1.05))
    assert vs["tpot_p99"] == pytest.approx(1.0) and vs["goodput_req_s"] == pytest.approx(1.0)
    assert ratios(fast, {"decode_tok_s": 0.0})["decode_tok_s"] is None

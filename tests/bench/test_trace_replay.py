"""bench.workloads.azure_workload: the Azure traces replayed at their own times, rescaled, or sampled."""
from __future__ import annotations

import time

import numpy as np
import pytest

from bench.workloads import CODE_TRACE, CONV_TRACE, azure_workload, draw_workload, load_trace, make_workload


@pytest.fixture(scope="module")
def conv():
    return make_workload("azure-conv")


@pytest.fixture(scope="module")
def code():
    return make_workload("azure-code")


# Published figures (../shared/DESIGN.md §6, from Patel et al., Splitwise, ISCA 2024):
# (rows, context mean, context p99, output mean)
PUBLISHED = {"conv": (19_366, 1_155, 4_142, 211), "code": (8_819, 2_048, 7_436, 28)}


@pytest.mark.parametrize("kind", ["conv", "code"])
def test_the_whole_trace_replays_with_its_published_counts_and_means(kind, conv, code):
    w = {"conv": conv, "code": code}[kind]
    rows, ctx_mean, ctx_p99, out_mean = PUBLISHED[kind]
    s = w.stats()
    assert len(w) == rows
    assert round(s["context"]["mean"]) == ctx_mean
    assert s["context"]["p99"] == ctx_p99
    assert round(s["output"]["mean"]) == out_mean
    assert w.fit is None and w.scale == 1.0  # the trace's own lengths: what the sim engine runs


@pytest.mark.parametrize("path", [CONV_TRACE, CODE_TRACE])
def test_arrivals_are_the_traces_own_offsets(path):
    trace = load_trace(path)
    w = azure_workload("conv" if path == CONV_TRACE else "code")
    assert w.arrivals.tolist() == [r.offset_s for r in trace]
    assert [(r.prompt_len, r.output_len) for r in w.requests] == [(r.context_tokens, r.generated_tokens) for r in trace]


def test_conv_offsets_come_from_the_timestamps(conv):
    # 18:15:50.9951690 - 18:15:46.6805900 and the last request at 18:14:08 past the first (3501.72 s).
    assert conv.arrivals[0] == 0.0
    assert conv.arrivals[1] == pytest.approx(4.314579, abs=1e-9)
    assert conv.arrivals[-1] == pytest.approx(3501.721937, abs=1e-6)


def test_the_first_n_rows_keep_their_bursts_and_start_at_zero():
    w = azure_workload("conv", 500)
    full = load_trace(CONV_TRACE)[:500]
    assert w.arrivals.tolist() == [r.offset_s for r in full]
    assert w.describe()["sample"] == "the first 500 rows"


def test_a_sample_is_offset_from_its_own_first_request():
    w = azure_workload("code", 300, seed=4, select="sample")
    rows = [r.trace_row for r in w.requests]
    assert w.arrivals[0] == 0.0
    assert w.arrivals.tolist() == pytest.approx([r.offset_s - rows[0].offset_s for r in rows])
    assert len(set(rows)) == 300 and rows == sorted(rows, key=lambda r: r.offset_s)


@pytest.mark.parametrize("rate", [1.0, 20.0])
def test_rescaling_gives_the_target_mean_rate_and_keeps_the_burst_shape(conv, rate):
    w = azure_workload("conv", arrivals="trace", rate=rate)
    assert (len(w) - 1) / w.arrivals[-1] == pytest.approx(rate, rel=1e-12)
    assert w.stats()["arrival"]["mean_rate"] == pytest.approx(rate, rel=1e-12)
    # One factor for every gap: the gaps' shape (coefficient of variation, order) is the trace's.
    g, g0 = np.diff(w.arrivals), np.diff(conv.arrivals)
    assert g.std() / g.mean() == pytest.approx(g0.std() / g0.mean(), rel=1e-9)
    assert np.allclose(g, g0 * (g.sum() / g0.sum()))


def test_a_trace_can_also_take_a_vllm_schedule():
    w = azure_workload("code", 2000, seed=3, arrivals="poisson", rate=5.0)
    assert w.arrivals[0] == 0.0 and (np.diff(w.arrivals) >= 0).all()
    assert np.diff(w.arrivals).mean() == pytest.approx(0.2, rel=0.1)
    assert [r.prompt_len for r in w.requests] == [r.prompt_len for r in azure_workload("code", 2000).requests]


def test_fitting_to_a_window_matches_draw_workload():
    trace = load_trace(CODE_TRACE)
    a = azure_workload("code", 100, seed=0, select="sample", max_seq_len=1024)
    b = draw_workload(trace, 100, seed=0, max_seq_len=1024)
    assert [(r.prompt_len, r.max_tokens) for r in a.requests] == [(r.prompt_len, r.max_tokens) for r in b.requests]
    assert a.fit == b.fit and a.scale == pytest.approx((1024 - a.output_reserve) / 7437)
    # The rows and lengths bench/results/policy_comparison.json was made from (seed 0, 100 requests).
    assert b.describe()["prompt_len"]["mean"] == pytest.approx(245.65)
    assert b.describe()["max_tokens"]["mean"] == pytest.approx(26.76)


def test_the_whole_conv_trace_builds_in_well_under_two_seconds():
    from bench.workloads.azure import _load
    _load.cache_clear()  # time the CSV parse too
    t0 = time.perf_counter()
    w = azure_workload("conv")
    elapsed = time.perf_counter() - t0
    assert len(w) == 19_366
    assert elapsed < 1.0, f"{elapsed:.2f} s"


@pytest.mark.parametrize("kw, argument", [
    (dict(kind="chat"), "kind"), (dict(n=0), "n"), (dict(n=20_000), "n"), (dict(n=5, select="middle"), "select"),
    (dict(rate=0.0), "rate"), (dict(rate=float("inf")), "rate"), (dict(arrivals="uniform"), "arrivals"),
    (dict(output_reserve=10), "output_reserve"), (dict(max_seq_len=1), "max_seq_len"),
    (dict(burstiness=2.0), "burstiness"),
])
def test_bad_arguments_name_the_argument(kw, argument):
    with pytest.raises(ValueError, match=argument):
        azure_workload(**kw)

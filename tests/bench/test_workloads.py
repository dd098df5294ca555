"""bench.workloads: trace loading, length scaling within the engine's window, arrival schedules."""
from __future__ import annotations

import math
import statistics

import pytest

from bench.workloads import (
    BOS_ID, CODE_TRACE, TOKEN_RANGE, TraceRow, arrival_offsets, context_scale, draw_workload, fit_lengths,
    load_trace,
)


@pytest.fixture(scope="module")
def trace():
    """The Azure code trace, vendored under bench/traces."""
    return load_trace(CODE_TRACE)


def test_trace_loads_with_offsets_from_the_first_request(trace):
    assert len(trace) == 8819  # bench/traces/README.md
    assert trace[0] == TraceRow(0.0, 4808, 10)
    assert trace[1].offset_s == pytest.approx(0.052, abs=1e-6)  # 18:17:04.0319600 - 18:17:03.9799600
    assert trace[-1].offset_s == pytest.approx(57 * 60 + 15.948, abs=1e-3)
    assert all(b.offset_s >= a.offset_s for a, b in zip(trace, trace[1:]))


@pytest.mark.parametrize("max_seq_len", [64, 256, 1024])
def test_every_request_fits_the_window(trace, max_seq_len):
    w = draw_workload(trace, 2000, seed=3, max_seq_len=max_seq_len)
    for r in w.requests:
        assert 1 <= r.prompt_len < max_seq_len
        assert r.max_tokens >= 1
        assert r.prompt_len + r.max_tokens - 1 <= max_seq_len
    # The longest trace context lands exactly output_reserve below the window.
    assert w.scale == pytest.approx((max_seq_len - w.output_reserve) / 7437)
    # Outputs are kept unless they had to be cut, and every cut is counted.
    cut = [r for r in w.requests if r.max_tokens != r.trace_row.generated_tokens]
    assert len(cut) == w.clamped
    assert all(r.prompt_len + r.max_tokens - 1 == max_seq_len for r in cut)


def test_clamping_cuts_only_what_does_not_fit():
    assert fit_lengths(TraceRow(0, 1000, 30), scale=0.1, max_seq_len=200) == (100, 30, False)
    assert fit_lengths(TraceRow(0, 1000, 500), scale=0.1, max_seq_len=200) == (100, 101, True)
    assert fit_lengths(TraceRow(0, 5000, 9), scale=1.0, max_seq_len=200) == (199, 2, True)
    assert fit_lengths(TraceRow(0, 1, 9), scale=0.01, max_seq_len=200) == (1, 9, False)


def test_scale_rejects_a_reserve_that_leaves_no_prompt(trace):
    with pytest.raises(ValueError, match="output_reserve"):
        context_scale(trace, 128, 127)


def test_prompts_are_bos_then_bytes_clear_of_the_stop_ids(trace):
    w = draw_workload(trace, 300, seed=0, max_seq_len=512)
    for r in w.requests:
        assert r.prompt_ids[0] == BOS_ID
        assert all(TOKEN_RANGE[0] <= t < TOKEN_RANGE[1] for t in r.prompt_ids[1:])


def test_the_seed_gives_the_same_workload_and_another_seed_another(trace):
    a = draw_workload(trace, 100, seed=7, max_seq_len=512)
    b = draw_workload(trace, 100, seed=7, max_seq_len=512)
    c = draw_workload(trace, 100, seed=8, max_seq_len=512)
    assert a == b
    assert [r.trace_row for r in a.requests] != [r.trace_row for r in c.requests]
    assert arrival_offsets(50, 2.0, seed=7) == arrival_offsets(50, 2.0, seed=7)
    assert arrival_offsets(50, 2.0, seed=7) != arrival_offsets(50, 2.0, seed=8)


def test_the_sample_is_distinct_rows_in_trace_order(trace):
    rows = [r.trace_row for r in draw_workload(trace, 500, seed=1, max_seq_len=512).requests]
    offsets = [r.offset_s for r in rows]
    assert offsets == sorted(offsets)
    assert len(set(rows)) == len(rows)


def gaps(offsets):
    return [b - a for a, b in zip(offsets, offsets[1:])]


def test_all_at_once_offsets_are_zero():
    assert arrival_offsets(17, math.inf, seed=0) == [0.0] * 17


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_gaps_have_the_requested_mean_and_spread(rate):
    offsets = arrival_offsets(20_001, rate, seed=11)
    g = gaps(offsets)
    assert offsets[0] == 0.0 and min(g) >= 0
    # 20k exponential gaps: the sample mean is within ~2% (3 sigma) of 1/rate, and an exponential
    # has its standard deviation equal to its mean (a fixed-interval schedule would have 0).
    assert statistics.fmean(g) == pytest.approx(1 / rate, rel=0.025)
    assert statistics.pstdev(g) == pytest.approx(1 / rate, rel=0.05)


def test_burstiness_keeps_the_mean_and_changes_the_spread():
    g = gaps(arrival_offsets(20_001, 2.0, seed=5, burstiness=4.0))
    assert statistics.fmean(g) == pytest.approx(0.5, rel=0.025)
    assert statistics.pstdev(g) == pytest.approx(0.5 / 2, rel=0.05)  # gamma(k): cv = 1/sqrt(k)

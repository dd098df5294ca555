"""bench.workloads.arrivals: vllm-bench-serve schedules for any workload, and trace rescaling."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.workloads import make_workload, rescale_offsets, schedule


@pytest.mark.parametrize("shape", [0.25, 0.5, 1.0, 4.0])
def test_gamma_burstiness_sets_the_gap_cv_to_one_over_sqrt_shape(shape):
    offsets, how = schedule(50_001, seed=2, arrivals="gamma", rate=3.0, burstiness=shape)
    g = np.diff(offsets)
    assert how == {"kind": "gamma", "rate": 3.0, "seed": 2, "burstiness": shape}
    # 50k gamma gaps: the mean within ~1.5% (3 sigma at shape 0.25) of 1/rate; the CV within ~6%.
    assert g.mean() == pytest.approx(1 / 3.0, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(shape), rel=0.06)


def test_burstier_means_a_wider_spread_at_the_same_rate():
    cv = {k: (lambda g: g.std() / g.mean())(np.diff(schedule(20_001, 0, "gamma", 2.0, k)[0])) for k in (0.5, 1.0, 2.0)}
    assert cv[0.5] > cv[1.0] > cv[2.0]


def test_poisson_is_gamma_with_shape_one():
    a, _ = schedule(1000, 9, "poisson", rate=2.0)
    b, _ = schedule(1000, 9, "gamma", rate=2.0, burstiness=1.0)
    assert np.array_equal(a, b)


def test_all_at_once_sends_everything_at_zero():
    offsets, how = schedule(64, 0, "all-at-once")
    assert offsets.tolist() == [0.0] * 64 and how == {"kind": "all-at-once"}


def test_rescaling_keeps_the_relative_gaps():
    own = np.array([0.0, 1.0, 1.5, 4.0, 10.0])
    out = rescale_offsets(own, rate=2.0)
    assert out[-1] == pytest.approx(2.0)  # 4 gaps at a mean rate of 2/s span 2 s
    assert np.allclose(out, own * 0.2)


def test_the_schedule_does_not_change_the_lengths():
    a = make_workload("synthetic-80-short", 300, seed=5)
    b = make_workload("synthetic-80-short", 300, seed=5, arrivals="gamma", rate=1.0, burstiness=0.5)
    assert [(r.prompt_len, r.output_len) for r in a.requests] == [(r.prompt_len, r.output_len) for r in b.requests]
    assert a.arrivals.tolist() != b.arrivals.tolist()


def test_with_arrivals_retimes_a_workload():
    w = make_workload("sharegpt", 50, seed=1)
    offsets, how = schedule(50, 1, "poisson", rate=10.0)
    r = w.with_arrivals(offsets, how)
    assert r.arrivals.tolist() == offsets.tolist() and r.description["arrivals"] == how
    assert [x.prompt_len for x in r.requests] == [x.prompt_len for x in w.requests]
    with pytest.raises(ValueError, match="offsets"):
        w.with_arrivals(offsets[:10], how)


@pytest.mark.parametrize("kw, argument", [
    (dict(arrivals="bursty"), "arrivals"), (dict(arrivals="poisson"), "rate"),
    (dict(arrivals="poisson", rate=-1.0), "rate"), (dict(arrivals="gamma", rate=1.0, burstiness=0.0), "burstiness"),
    (dict(arrivals="poisson", rate=1.0, burstiness=2.0), "burstiness"), (dict(arrivals="all-at-once", rate=3.0), "rate"),
    (dict(arrivals="trace"), "trace"),
])
def test_bad_schedules_name_the_argument(kw, argument):
    with pytest.raises(ValueError, match=argument):
        schedule(10, 0, **kw)


def test_a_trace_of_simultaneous_requests_cannot_be_rescaled():
    with pytest.raises(ValueError, match="rate"):
        rescale_offsets(np.zeros(5), 1.0)

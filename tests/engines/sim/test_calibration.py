"""Calibration recovers constants it knows from timings the cost model itself generates, and
refuses timings that cannot determine them."""
from __future__ import annotations

import numpy as np
import pytest

from engines.base import CallTiming
from engines.sim.calibration import MIN_CALLS_PER_OP, CalibrationError, Fit, fit_constants
from engines.sim.cost_model import CostConstants, CostModel
from engines.sim.profiles import H100_SXM, OPT_13B

# The "true" constants the synthetic timings are made with. With these, OPT-13B decode on H100 is
# weight-bound up to B = 208 and compute-bound above (7.674 ms / 0.85 = 9.03 ms of weights vs
# 2 * 12.85e9 * B / (989.4e12 * 0.6) = 43.3 us per sequence), and prefill is weight-bound for
# prompts under ~200 tokens: both branches of the max appear in both ops.
TRUE = CostConstants(flops_efficiency=0.6, weight_bandwidth_efficiency=0.85, kv_bandwidth_efficiency=0.5,
                     prefill_overhead_s=0.003, decode_overhead_s=0.0015)


def synthetic(constants: CostConstants = TRUE, noise: float = 0.0, reps: int = 1, split_kv: bool = False,
              seed: int = 0) -> list[CallTiming]:
    """Prefills of equal prompts and decode steps of equal KV lengths (what a CallTiming's sum and
    max describe exactly), timed by the cost model, times (1 + noise * N(0, 1))."""
    model, rng = CostModel(H100_SXM, OPT_13B, constants), np.random.default_rng(seed)
    calls = []
    for _ in range(reps):
        for b in (1, 4):
            for n in (16, 64, 256, 1024, 2048):
                calls.append(CallTiming("prefill", model.prefill_seconds([n] * b), b, b * n, b * n, n))
        for b in (1, 4, 16, 64, 128, 256, 512):
            for kv in (512, 1024, 2048):
                calls.append(CallTiming("decode", model.decode_seconds([kv] * b, split_kv), b, b, b * kv, kv))
    if noise:
        calls = [CallTiming(c.op, c.seconds * (1 + noise * rng.standard_normal()), c.num_seqs, c.num_tokens,
                            c.kv_tokens, c.max_kv) for c in calls]
    return calls


FITTED = ("flops_efficiency", "weight_bandwidth_efficiency", "kv_bandwidth_efficiency",
          "prefill_overhead_s", "decode_overhead_s")


def test_recovers_known_constants_from_noise_free_timings():
    fit = fit_constants(synthetic(), H100_SXM, OPT_13B)
    for name in FITTED:
        assert getattr(fit.constants, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    for op in ("prefill", "decode"):
        assert fit.error[op]["mape"] < 1e-9 and fit.error[op]["r2"] > 1 - 1e-12
    assert fit.notes == ()
    assert fit.error["decode"]["points"] == 21 and fit.error["prefill"]["points"] == 10


def test_recovers_known_constants_through_5_percent_noise():
    # 3 repetitions of each call, each with 5% Gaussian noise: a mean absolute error of ~4%
    # (0.05 * sqrt(2 / pi)). Efficiencies come back within 5%; the overheads, 1.5 and 3 ms under
    # steps of 9-40 ms and prefills up to 0.4 s, within 1 ms.
    fit = fit_constants(synthetic(noise=0.05, reps=3), H100_SXM, OPT_13B)
    for name in ("flops_efficiency", "weight_bandwidth_efficiency", "kv_bandwidth_efficiency"):
        assert getattr(fit.constants, name) == pytest.approx(getattr(TRUE, name), rel=0.05), name
    for name in ("prefill_overhead_s", "decode_overhead_s"):
        assert getattr(fit.constants, name) == pytest.approx(getattr(TRUE, name), abs=1e-3), name
    for op in ("prefill", "decode"):
        assert 0.02 < fit.error[op]["mape"] < 0.06


def test_recovers_a_split_kv_engine():
    true = CostConstants(flops_efficiency=0.5, weight_bandwidth_efficiency=0.9, kv_bandwidth_efficiency=0.7)
    fit = fit_constants(synthetic(true, split_kv=True), H100_SXM, OPT_13B, split_kv=True)
    assert fit.split_kv
    for name in FITTED:
        assert getattr(fit.constants, name) == pytest.approx(getattr(true, name), rel=1e-6, abs=1e-12), name


def test_a_branch_no_call_lands_on_is_reported_and_bounded():
    # Weights read 1000x faster than the datasheet allows (7.674 ms / 1000 = 7.7 us, under the
    # 43 us of matmul of even one decode token): no call is weight-bound, so the weight efficiency
    # is only bounded below. The fit says so, picks the bound, and still predicts every call.
    # (At 50x, 153 us, the B = 1 decode steps are weight-bound and the fit finds 50 exactly.)
    true = CostConstants(flops_efficiency=0.6, weight_bandwidth_efficiency=1000.0, kv_bandwidth_efficiency=0.5,
                         decode_overhead_s=0.001)
    fit = fit_constants(synthetic(true), H100_SXM, OPT_13B)
    assert len(fit.notes) == 1 and fit.notes[0].startswith("weight_bandwidth_efficiency not identified")
    # The bound: weights tie with the smallest matmul, one decode token's 43.3 us: 7.674 ms / 43.3 us = 177.
    assert fit.constants.weight_bandwidth_efficiency == pytest.approx(
        (25_706_946_560 / 3.35e12) / (2 * 12_853_473_280 / (989.4e12 * 0.6)), rel=1e-6)
    assert fit.constants.flops_efficiency == pytest.approx(0.6, rel=1e-6)
    assert fit.error["decode"]["mape"] < 1e-9


def test_refuses_too_few_timings():
    calls = synthetic()
    decodes = [c for c in calls if c.op == "decode"][:MIN_CALLS_PER_OP - 1]
    prefills = [c for c in calls if c.op == "prefill"]
    with pytest.raises(CalibrationError, match=f"too few decode timings .* got {MIN_CALLS_PER_OP - 1}, need at least "
                                               f"{MIN_CALLS_PER_OP}"):
        fit_constants(prefills + decodes, H100_SXM, OPT_13B)
    with pytest.raises(CalibrationError, match="too few prefill timings"):
        fit_constants([], H100_SXM, OPT_13B)


def test_refuses_timings_that_do_not_vary():
    calls = synthetic(reps=3)
    one_batch = [c for c in calls if c.op == "prefill" or c.num_seqs == 64]  # 9 decode steps, all B = 64
    with pytest.raises(CalibrationError, match="every decode timing has the same batch size"):
        fit_constants(one_batch, H100_SXM, OPT_13B)
    # Launch-bound: every decode step takes 14 ms whatever its batch and KV (the 100m model on an
    # H200): nothing grows with KV length, so there is no attention efficiency to fit.
    flat = [c if c.op == "prefill" else CallTiming("decode", 0.014, c.num_seqs, c.num_tokens, c.kv_tokens, c.max_kv)
            for c in calls]
    with pytest.raises(CalibrationError, match="does not grow with KV length"):
        fit_constants(flat, H100_SXM, OPT_13B)


@pytest.mark.parametrize("field, value", [("seconds", 0.0), ("seconds", -0.01), ("seconds", float("nan")),
                                          ("seconds", float("inf")), ("max_kv", 0), ("num_tokens", 0)])
def test_refuses_a_malformed_timing_and_names_the_field(field, value):
    # Before this check a 0 s timing crashed inside LAPACK ("SVD did not converge"), a NaN gave a
    # misleading "neither the weight-read nor the matmul time" error, and a negative time was fitted.
    calls = synthetic()
    bad = next(c for c in calls if c.op == "decode" and c.num_seqs == 16)
    calls[calls.index(bad)] = CallTiming(**{**{f: getattr(bad, f) for f in CallTiming.__slots__}, field: value})
    with pytest.raises(CalibrationError, match=f"has {field} = .*(finite time > 0|>= 1)"):
        fit_constants(calls, H100_SXM, OPT_13B)


def test_refuses_timings_where_every_call_is_weight_bound():
    # Short prompts and decode batches up to 128: every call is bound by the 9 ms weight read, which
    # is then a constant per call, the same as the overheads. The message says what to time instead.
    model = CostModel(H100_SXM, OPT_13B, TRUE)
    calls = [CallTiming("prefill", model.prefill_seconds([n] * b), b, b * n, b * n, n)
             for b in (1, 2) for n in (8, 16, 32, 64)]
    calls += [CallTiming("decode", model.decode_seconds([kv] * b), b, b, b * kv, kv)
              for b in (1, 4, 16, 64, 128) for kv in (512, 1024, 2048)]
    with pytest.raises(CalibrationError, match="up to sizes where the matmuls outlast the weight read"):
        fit_constants(calls, H100_SXM, OPT_13B)


def test_moves_and_empty_calls_are_ignored():
    extra = [CallTiming("move", 0.5, 3, 0, 300, 100), CallTiming("decode", 0.0, 0, 0, 0, 0)]
    fit = fit_constants(synthetic() + extra, H100_SXM, OPT_13B)
    assert fit.error["decode"]["points"] == 21
    assert fit.constants.decode_overhead_s == pytest.approx(TRUE.decode_overhead_s, rel=1e-6)


def test_fit_round_trips_through_json(tmp_path):
    fit = fit_constants(synthetic(noise=0.02, reps=2), H100_SXM, OPT_13B, meta={"command": "test"})
    path = tmp_path / "profiles" / "h100-13b.json"
    fit.save(path)
    loaded = Fit.load(path)
    assert loaded.constants == fit.constants and loaded.model == OPT_13B and loaded.hardware == H100_SXM
    assert loaded.timings == fit.timings and len(loaded.timings) == 62
    assert loaded.cost_model().decode_seconds([700] * 9) == fit.cost_model().decode_seconds([700] * 9)

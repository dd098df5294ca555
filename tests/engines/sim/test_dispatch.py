"""The decode attention dispatch models (engines/sim/dispatch.py): what each one must get right,
and the `greedy` fit against the H100 probe's FlashAttention-2 varlen timings."""
from __future__ import annotations

import numpy as np
import pytest

from engines.sim.cost_model import CostConstants, CostModel
from engines.sim.dispatch import (
    DISPATCH_MODELS, KERNELS, Dispatch, fit_greedy, kernel_for, load_probe, split_chunks, wave_sum,
)
from engines.sim.profiles import H100_SXM, LLAMA_3_8B, OPT_13B, hardware_profile, model_profile

SHAPES = (OPT_13B, LLAMA_3_8B)
ROOFLINE_GREEDY = Dispatch("roofline-greedy", "greedy")
"""`greedy` with the roofline's constants: one slot per SM at BW e_kv / S, no per-unit cost."""
PROBE_TOLERANCE = 0.20
"""Largest relative error the greedy fit may make on any one probe case (it makes 18.1%)."""
PROBE_RMS = 0.09
"""Largest rms relative error over the probe's cases (it makes 8.0%)."""


def models(model):
    return {name: CostModel(H100_SXM, model, dispatch=name) for name in DISPATCH_MODELS}


def one_wave(model, length: int) -> float:
    """All layers of one wave whose longest unit is `length` tokens, at the roofline."""
    return model.layers * length * 2 * model.head_dim * model.bytes_per_param * H100_SXM.sm_count / H100_SXM.hbm_bandwidth


@pytest.mark.parametrize("model", SHAPES, ids=lambda m: m.name)
def test_equal_lengths_cost_the_same_under_every_dispatch(model):
    costs = models(model)
    costs["roofline-greedy"] = CostModel(H100_SXM, model, dispatch=ROOFLINE_GREEDY)
    for batch in (1, 7, 36, 64, 200):
        for length in (128, 1024, 4096):  # whole chunks of 512: split's units are as long as waves'
            kv = [length] * batch
            waves = costs["waves"].attention_seconds(kv)
            assert costs["longest-first"].attention_seconds(kv) == waves
            for name in ("split", "roofline-greedy"):
                assert costs[name].attention_seconds(kv) == pytest.approx(waves, abs=one_wave(model, length)), name


@pytest.mark.parametrize("model", SHAPES, ids=lambda m: m.name)
def test_longest_first_is_never_above_waves_in_any_order(model):
    rng = np.random.default_rng(1)
    costs = models(model)
    for _ in range(100):
        kv = rng.integers(1, 3000, int(rng.integers(1, 150)))
        kv[rng.integers(0, kv.size, max(1, kv.size // 10))] = rng.integers(4000, 16000)
        best = costs["longest-first"].attention_seconds(kv)
        for order in (kv, np.sort(kv), rng.permutation(kv)):
            assert best <= costs["waves"].attention_seconds(order) * (1 + 1e-12)
        assert best == costs["longest-first"].attention_seconds(rng.permutation(kv))


def test_waves_are_order_sensitive_and_greedy_is_not():
    # The case: 4 long requests among 60 short ones, OPT-13B.
    spread = [300] * 15 + [8000] + [300] * 15 + [8000] + [300] * 15 + [8000] + [300] * 15 + [8000]
    last = sorted(spread)
    waves, greedy = CostModel(H100_SXM, OPT_13B, dispatch="waves"), CostModel(H100_SXM, OPT_13B, dispatch="greedy")
    assert waves.attention_seconds(spread) > 1.5 * waves.attention_seconds(last)
    assert greedy.attention_seconds(spread) == pytest.approx(greedy.attention_seconds(last), rel=0.03)


@pytest.mark.parametrize("model, within", [(OPT_13B, 0.03), (LLAMA_3_8B, 0.12)], ids=lambda x: getattr(x, "name", x))
def test_greedy_is_order_insensitive_within_a_few_percent(model, within):
    # A long sequence's H units fall in H places of the head-major launch, so its place in the
    # batch moves its start by at most 1/H of the layer: 3% for OPT-13B's 40 heads, up to 11% for
    # Llama-3-8B's 8 (measured on the H100: 1% and 3% between longs first and last).
    rng = np.random.default_rng(2)
    greedy = CostModel(H100_SXM, model, dispatch="greedy")
    for _ in range(100):
        kv = rng.integers(1, 2000, int(rng.integers(1, 200)))
        kv[rng.integers(0, kv.size, max(1, kv.size // 16))] = rng.integers(4000, 16000)
        t = [greedy.attention_seconds(o) for o in (kv, np.sort(kv), np.sort(kv)[::-1], rng.permutation(kv))]
        assert max(t) <= min(t) * (1 + within)


@pytest.mark.parametrize("model", SHAPES, ids=lambda m: m.name)
def test_split_is_the_bytes_roofline(model):
    # Every wave lasts as long as its longest chunk, so a sequence's last, shorter chunk may cost
    # a whole one: the bytes roofline below, the roofline of whole chunks (plus one wave) above.
    rng = np.random.default_rng(3)
    split = CostModel(H100_SXM, model, dispatch="split")
    for _ in range(50):
        kv = rng.integers(1, 20_000, int(rng.integers(1, 100)))
        roofline = kv.sum() * model.kv_bytes_per_token / H100_SXM.hbm_bandwidth
        whole_chunks = (-(-kv // 512) * 512).sum() * model.kv_bytes_per_token / H100_SXM.hbm_bandwidth
        assert roofline <= split.attention_seconds(kv) * (1 + 1e-12)
        assert split.attention_seconds(kv) <= whole_chunks + one_wave(model, 512)
        assert whole_chunks <= roofline * (1 + 512 * kv.size / kv.sum())
    assert split.attention_seconds([777, 5]) == CostModel(H100_SXM, model).attention_seconds([777, 5], split_kv=True)


def test_split_chunks_and_wave_sum():
    assert split_chunks(np.array([1100, 512, 3]), 512).tolist() == [512, 512, 76, 512, 3]
    items = np.array([5, 1, 9, 2])
    units = np.repeat(items, 3)
    assert wave_sum(items, 3, 4) == np.pad(units, (0, 0)).reshape(-1, 4).max(axis=1).sum()


def test_greedy_fit_reproduces_the_h100_probe():
    head, cases = load_probe()
    assert head["device"].startswith("NVIDIA H100") and head["sms"] == H100_SXM.sm_count
    assert len(cases) == 28 and {c.shape for c in cases} == {"OPT-13B", "Llama-3-8B"}
    fit = fit_greedy(cases, H100_SXM)
    table = KERNELS["fa2-varlen"]
    # The table's constants are the fit's, rounded: nobody tuned them by hand.
    assert (fit.dispatch.slots_per_sm, fit.dispatch.kv_bandwidth_efficiency) == (table.slots_per_sm,
                                                                                  table.kv_bandwidth_efficiency)
    assert fit.dispatch.unit_bandwidth == pytest.approx(table.unit_bandwidth, rel=1e-3)
    assert fit.dispatch.unit_overhead_s == pytest.approx(table.unit_overhead_s, abs=1e-9)
    assert fit.dispatch.launch_s == pytest.approx(table.launch_s, rel=1e-2)
    errors = fit.errors
    assert np.abs(errors).max() <= PROBE_TOLERANCE, fit.table()
    assert np.sqrt(np.mean(errors ** 2)) <= PROBE_RMS, fit.table()
    # The cost model runs the same arithmetic: its attention is the fit's, per layer, less launch.
    for case, predicted in zip(cases, fit.predicted):
        cost = CostModel(H100_SXM, model_profile(case.shape), dispatch="fa2-varlen")
        per_layer = cost.attention_seconds(case.kv_lens) / cost.model.layers
        assert per_layer + table.launch_s == pytest.approx(predicted, rel=2e-3), case.case
    # Measured: longs first vs last within 3%, and so is the model.
    by = {(c.shape, c.case): p for c, p in zip(cases, fit.predicted)}
    for shape in ("OPT-13B", "Llama-3-8B"):
        first, last = by[shape, "b 34x500+2x9500 longs first"], by[shape, "b 34x500+2x9500 longs last"]
        assert first == pytest.approx(last, rel=0.03)


def test_kernel_table_names_each_dispatch_and_its_source():
    for name in DISPATCH_MODELS:
        k = kernel_for(H100_SXM, name)
        assert k.model == name and k.source
        assert k.order_matters == (name == "waves")
    assert "fitted on H100 probe 2026-12-05" in kernel_for(H100_SXM, "greedy").source
    assert "not measured there" in kernel_for(hardware_profile("A100-80GB"), "fa2-varlen").source
    assert "roofline, not measured" in kernel_for(H100_SXM, "split").source
    with pytest.raises(KeyError, match="greedy.*fa2-varlen"):
        kernel_for(H100_SXM, "flashinfer")
    with pytest.raises(ValueError, match="unknown dispatch model"):
        Dispatch("x", "fifo")


def test_the_probes_call_still_gives_the_wave_model():
    # ../shared/probes/decode_bubble_gpu.py calls exactly this.
    lens = [500] * 34 + [9500] * 2
    cm = CostModel(hardware_profile("H200"), model_profile("OPT-13B"), CostConstants())
    waves = CostModel(hardware_profile("H200"), model_profile("OPT-13B"), dispatch="waves")
    assert cm.attention_seconds(lens, False) == waves.attention_seconds(lens)
    assert cm.kernel().model == "waves"

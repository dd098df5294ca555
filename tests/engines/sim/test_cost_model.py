"""The cost model against hand-computed cases (the arithmetic is in the comments).

Shared numbers, OPT-13B on H100-SXM:
  W   = 12,853,473,280 params * 2 B = 25,706,946,560 B;  W / 3.35e12 B/s = 7.6737 ms
  one KV token of one head over all layers = 40 layers * 2 (K, V) * 128 * 2 B = 20,480 B
  per-SM bandwidth = 3.35e12 / 132 SMs;  so one token of one unit takes
  U = 20,480 * 132 / 3.35e12 = 0.80697 us (a wave's time per token of its longest unit)
  KV bytes per token (all heads) = 40 * 20,480 = 819,200 B
"""
from __future__ import annotations

import numpy as np
import pytest

from engines.sim.cost_model import CostConstants, CostModel, LinkTimeline, wave_sum
from engines.sim.profiles import H100_SXM, LLAMA_3_8B, OPT_13B

W_S = 25_706_946_560 / 3.35e12
U = 20_480 * 132 / 3.35e12


@pytest.fixture
def h100_13b() -> CostModel:
    return CostModel(H100_SXM, OPT_13B)


def test_decode_at_batch_1_and_short_kv_is_weight_bound():
    model = CostModel(H100_SXM, OPT_13B, CostConstants(weight_bandwidth_efficiency=0.8))
    # weights: 7.6737 ms / 0.8 = 9.5921 ms. matmul: 2 * 12.85e9 FLOPs / 989.4e12 = 26 us, under it.
    # attention: 40 units (one per KV head) fit in one wave of 132 SMs, 128 tokens long: 128 U = 103.3 us.
    expected = W_S / 0.8 + 128 * U
    assert model.decode_seconds([128]) == pytest.approx(expected, rel=1e-12)
    assert model.decode_seconds([128]) == pytest.approx(9.695e-3, rel=1e-3)
    terms = model.decode_breakdown([128])
    assert terms["weights"] / model.decode_seconds([128]) > 0.98


def test_one_long_sequence_stretches_the_no_split_step(h100_13b):
    short = [256] * 31
    # No split: 32 sequences * 40 heads = 1280 units in ceil(1280 / 132) = 10 waves. The long
    # sequence comes last: its 40 units (1240..1279) all sit in the last wave (units 1188..1279).
    # attention = (9 waves * 256 + L) * U, so doubling L from 2048 to 4096 adds 2048 U = 1.6527 ms.
    for long in (2048, 4096):
        assert h100_13b.attention_seconds(short + [long]) == pytest.approx((9 * 256 + long) * U, rel=1e-12)
    stretch = h100_13b.decode_seconds(short + [4096]) - h100_13b.decode_seconds(short + [2048])
    assert stretch == pytest.approx(2048 * U, rel=1e-12)
    # Split-KV: the 2048 extra tokens are read by all SMs: 2048 * 819,200 B / 3.35e12 = 0.5008 ms,
    # give or take one wave of 512-token chunks (512 U = 0.413 ms).
    split_stretch = h100_13b.decode_seconds(short + [4096], True) - h100_13b.decode_seconds(short + [2048], True)
    assert abs(split_stretch - 2048 * 819_200 / 3.35e12) <= 512 * U
    # 132 SMs / 40 units of the long sequence: the no-split stretch is ~3.3x the bytes it reads.
    assert stretch > 2.5 * split_stretch


def test_the_bubble_is_worse_with_few_kv_heads():
    # Llama-3-8B has 8 KV heads: one long sequence keeps 8 of 132 SMs busy for its whole length.
    # U8 = 32 layers * 2 * 128 * 2 B * 132 / 3.35e12; 64 * 8 = 512 units = 4 waves (3 full + 116).
    model = CostModel(H100_SXM, LLAMA_3_8B)
    u8 = 32 * 2 * 128 * 2 * 132 / 3.35e12
    batch = [256] * 63 + [8192]
    assert model.attention_seconds(batch) == pytest.approx((3 * 256 + 8192) * u8, rel=1e-12)
    # Split-KV reads the same bytes balanced: sum(KV) * 131,072 B / 3.35e12, within one chunk wave.
    balanced = (63 * 256 + 8192) * 131_072 / 3.35e12
    assert abs(model.attention_seconds(batch, split_kv=True) - balanced) <= 512 * u8
    assert model.attention_seconds(batch) > 3 * model.attention_seconds(batch, split_kv=True)


def test_equal_lengths_run_the_same_with_and_without_split(h100_13b):
    # 64 sequences of 1024: no split, 2560 units = ceil(2560 / 132) = 20 waves of 1024 tokens;
    # split, 2 chunks of 512 each, 5120 units = 39 waves of 512. Balanced ideal: 64 * 1024 * 819,200 B
    # / 3.35e12 = 16.026 ms. Both are within one no-split wave (1024 U = 0.826 ms) of it, so they
    # agree within one wave: here 16.527 vs 16.114 ms, 2.5% apart.
    kv = [1024] * 64
    no_split, split = h100_13b.attention_seconds(kv), h100_13b.attention_seconds(kv, split_kv=True)
    assert no_split == pytest.approx(20 * 1024 * U, rel=1e-12)
    assert split == pytest.approx(39 * 512 * U, rel=1e-12)
    ideal = 64 * 1024 * 819_200 / 3.35e12
    for t in (no_split, split):
        assert ideal <= t <= ideal + 1024 * U
    assert abs(no_split - split) <= 1024 * U


def test_large_batches_become_compute_bound(h100_13b):
    # matmul time 2 * 12,853,473,280 * B / 989.4e12 exceeds the weight read (7.6737 ms) from
    # B = 7.6737e-3 * 989.4e12 / 25,706,946,560 = 295.3 on: the H100's ridge point.
    terms = [h100_13b.decode_breakdown([64] * b) for b in (295, 296)]
    assert terms[0]["matmul"] < terms[0]["weights"] < terms[1]["matmul"]
    assert terms[1]["matmul"] == pytest.approx(2 * 12_853_473_280 * 296 / 989.4e12, rel=1e-12)


def test_prefill_of_2k_tokens_is_compute_bound(h100_13b):
    # linear: 2 * 12,853,473,280 * 2048 = 5.26478e13 FLOPs; attention: 4 * 40 layers * 40 heads * 128
    # = 819,200 FLOPs per (query, key) pair * 2048 * 2049 / 2 causal pairs = 1.71883e12 FLOPs.
    # (5.26478e13 + 1.71883e12) / 989.4e12 = 54.949 ms, 7x the 7.674 ms weight read.
    flops = 2 * 12_853_473_280 * 2048 + 819_200 * 2048 * 2049 // 2
    assert h100_13b.prefill_seconds([2048]) == pytest.approx(flops / 989.4e12, rel=1e-12)
    assert h100_13b.prefill_seconds([2048]) == pytest.approx(54.949e-3, rel=1e-4)
    # 16 tokens: 4.1e11 FLOPs = 0.42 ms of compute, under the weight read: the floor holds.
    assert h100_13b.prefill_seconds([16]) == pytest.approx(W_S, rel=1e-12)


def test_efficiency_and_overhead_enter_as_documented():
    c = CostConstants(flops_efficiency=0.5, prefill_overhead_s=0.002, decode_overhead_s=0.001,
                      kv_bandwidth_efficiency=0.25)
    model = CostModel(H100_SXM, OPT_13B, c)
    flops = 2 * 12_853_473_280 * 2048 + 819_200 * 2048 * 2049 // 2
    assert model.prefill_seconds([2048]) == pytest.approx(0.002 + flops / (989.4e12 * 0.5), rel=1e-12)
    # decode of one 128-token sequence: 1 ms + 7.6737 ms + 128 U / 0.25
    assert model.decode_seconds([128]) == pytest.approx(0.001 + W_S + 128 * U / 0.25, rel=1e-12)


def test_prefill_sums_over_the_batch(h100_13b):
    # Two prompts cost their tokens' FLOPs added, and the attention of each prompt on its own.
    flops = 2 * 12_853_473_280 * (1000 + 3000) + 819_200 * (1000 * 1001 // 2 + 3000 * 3001 // 2)
    assert h100_13b.prefill_seconds([1000, 3000]) == pytest.approx(flops / 989.4e12, rel=1e-12)


def test_empty_calls_cost_nothing_and_bad_lengths_are_refused(h100_13b):
    assert h100_13b.prefill_seconds([]) == 0.0
    assert h100_13b.decode_seconds([]) == 0.0
    with pytest.raises(ValueError, match="kv_lens must all be >= 1"):
        h100_13b.decode_seconds([10, 0])
    with pytest.raises(ValueError, match="prompt_lens must all be >= 1"):
        h100_13b.prefill_seconds([-3])


def test_transfer_is_latency_plus_bytes_over_bandwidth(h100_13b):
    # PCIe Gen5 x16 one way: 6 us + 1e9 B / 64e9 B/s = 15.631 ms; NVLink: 6 us + 1e9 / 450e9 = 2.2282 ms
    assert h100_13b.transfer_seconds(10**9, "pcie") == pytest.approx(6e-6 + 1e9 / 64e9, rel=1e-12)
    assert h100_13b.transfer_seconds(10**9, "nvlink") == pytest.approx(6e-6 + 1e9 / 450e9, rel=1e-12)
    assert h100_13b.transfer_seconds(0, "pcie") == 0.0
    half = CostModel(H100_SXM, OPT_13B, CostConstants(pcie_efficiency=0.5))
    assert half.transfer_seconds(10**9, "pcie") == pytest.approx(6e-6 + 1e9 / 32e9, rel=1e-12)
    with pytest.raises(ValueError, match="unknown link 'infiniband'; known links: pcie, nvlink"):
        h100_13b.transfer_seconds(1, "infiniband")
    with pytest.raises(ValueError, match=">= 0"):
        h100_13b.transfer_seconds(-1, "pcie")


def test_transfers_on_one_link_finish_back_to_back(h100_13b):
    link = h100_13b.link_timeline("pcie")
    one = 6e-6 + 64e6 / 64e9  # 64 MB over PCIe: 1.006 ms
    assert link.schedule(64 * 10**6, now=0.0) == pytest.approx((0.0, one))
    # Submitted at the same moment, the second waits for the first and ends one transfer later.
    assert link.schedule(64 * 10**6, now=0.0) == pytest.approx((one, 2 * one))
    # One submitted after the link went idle starts at once.
    assert link.schedule(64 * 10**6, now=0.010) == pytest.approx((0.010, 0.010 + one))
    # The other direction, or another link, is a separate timeline: no wait there.
    assert h100_13b.link_timeline("pcie").schedule(64 * 10**6, now=0.0) == pytest.approx((0.0, one))


def test_link_timeline_rejects_nonsense():
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        LinkTimeline(0.0, 1e-6, "pcie")
    with pytest.raises(ValueError, match="byte count must be >= 0"):
        LinkTimeline(1e9, 0.0).schedule(-5, 0.0)


def test_constants_are_checked():
    with pytest.raises(ValueError, match="flops_efficiency must be a finite number > 0"):
        CostConstants(flops_efficiency=0)
    with pytest.raises(ValueError, match="decode_overhead_s must be a finite number >= 0"):
        CostConstants(decode_overhead_s=-1e-3)
    assert CostConstants.from_dict(CostConstants(flops_efficiency=0.4).to_dict()).flops_efficiency == 0.4


def test_wave_sum_matches_building_the_units():
    # The vectorised wave sum equals the plain construction (repeat, pad, per-wave max) on random
    # cases, including items whose heads straddle two waves and more heads than SMs.
    rng = np.random.default_rng(0)
    for _ in range(2000):
        items = rng.integers(1, 5000, int(rng.integers(1, 50)))
        repeat, slots = int(rng.integers(1, 70)), int(rng.integers(1, 140))
        units = np.repeat(items, repeat)
        plain = np.pad(units, (0, -units.size % slots)).reshape(-1, slots).max(axis=1).sum()
        assert wave_sum(items, repeat, slots) == plain


def test_a_mixed_step_adds_chunk_tokens_to_the_linear_layers_and_their_attention(h100_13b):
    # 4 decode sequences of KV 100 and one chunk [512, 1024) of a prompt:
    # linear: 2 * 12,853,473,280 FLOPs/token * (4 + 512) tokens / 989.4e12 = 13.407 ms, over the
    #   7.674 ms weight read, so compute-bound;
    # chunk attention: 4 * 40 layers * 40 heads * 128 FLOPs per (query, key) pair, pairs =
    #   sum_{p=512}^{1023} (p + 1) = (1024 * 1025 - 512 * 513) / 2 = 393,472; / 989.4e12;
    # decode attention: 4 * 40 = 160 units in 2 waves of 132, each 100 tokens long: 200 U.
    linear = 2 * 12_853_473_280 * 516 / 989.4e12
    pairs = (1024 * 1025 - 512 * 513) // 2
    chunk_attention = 4 * 40 * 40 * 128 * pairs / 989.4e12
    expected = linear + chunk_attention + 200 * U
    assert h100_13b.step_seconds([100] * 4, [(512, 1024)]) == pytest.approx(expected, rel=1e-9)
    # No chunks: a decode step; a chunk from 0 alone: a prefill of that prompt.
    assert h100_13b.step_seconds([100] * 4, []) == h100_13b.decode_seconds([100] * 4)
    assert h100_13b.step_seconds([], [(0, 700)]) == pytest.approx(h100_13b.prefill_seconds([700]), rel=1e-12)
    with pytest.raises(ValueError, match="start < end"):
        h100_13b.step_seconds([], [(10, 10)])

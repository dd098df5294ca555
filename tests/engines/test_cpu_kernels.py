"""The CPU kernels (engines/torch/cpu_kernels.py) against the torch ops they replace.

The attention kernel is checked in test_attention_paths.py and, through the "paged" path,
against transformers in test_smollm2_paths.py; here the fused elementwise ops: the same values
as transformers' formulas (normalise in float32, cast, multiply by the weight in the dtype; silu
rounded before the product), within a rounding step or two of the dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.torch import cpu_kernels

MANTISSA = {torch.float32: 23, torch.bfloat16: 7}


@pytest.fixture(scope="module")
def ops():
    module = cpu_kernels.kernels()
    assert module is not None, cpu_kernels.unavailable()
    return module


def reference_norm(x, w, eps):
    return w * F.rms_norm(x.float(), w.shape, eps=eps).to(x.dtype)


def within_ulps(got, want, ulps: int) -> float:
    """Assert every value within `ulps` units in the last place of want's (in its dtype); return
    the share of values equal bit for bit."""
    v = want.float().abs().clamp_min(1e-3)
    ulp = torch.exp2(torch.floor(torch.log2(v)) - MANTISSA[want.dtype])
    diff = (got.float() - want.float()).abs()
    assert (diff <= ulps * ulp).all(), f"{(diff / ulp).max().item():.1f} ulps off"
    return (diff == 0).float().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_the_residual_add(ops, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 576, generator=g) * 3).to(dtype)
    h = torch.randn(37, 576, generator=g).to(dtype)
    w = (torch.rand(576, generator=g) + 0.5).to(dtype)
    # float32: the sum of squares in another order, a few ulps; bfloat16 rounds that away
    exact = within_ulps(ops.rms_norm(x, w, 1e-5), reference_norm(x, w, 1e-5), ulps=8 if dtype == torch.float32 else 1)
    if dtype == torch.bfloat16:
        assert exact > 0.99
    x2 = x.clone()
    normed = ops.add_rms_norm_(x2, h, w, 1e-5)
    assert torch.equal(x2, x + h)  # the residual sum, rounded to the dtype, written in place
    within_ulps(normed, reference_norm(x + h, w, 1e-5), ulps=8 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(ops, dtype):
    gate_up = (torch.randn(19, 2 * 1536, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    gate, up = gate_up.split(1536, dim=-1)
    # silu's exp is vectorised (another approximation within float32's last bits): a silu rounded
    # the other way moves the bfloat16 product by up to two steps, at a few values in a thousand
    exact = within_ulps(ops.silu_mul(gate_up), F.silu(gate) * up, ulps=8 if dtype == torch.float32 else 2)
    if dtype == torch.bfloat16:
        assert exact > 0.99


def test_refusals_name_the_shapes(ops):
    with pytest.raises(RuntimeError, match="rms_norm: x \\[rows, hidden\\], weight \\[hidden\\]"):
        ops.rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="silu_mul: gate_up \\[rows, 2 \\* intermediate\\]"):
        ops.silu_mul(torch.zeros(2, 7))


def test_gpu_tensors_take_torchs_ops():
    assert cpu_kernels.fused_ops(torch.zeros(2, 3, device="meta")) is None
    assert cpu_kernels.fused_ops(torch.zeros(2, 3, 4)) is None  # 2-D rows only


def test_without_the_kernels_the_engine_runs_torchs_ops(demo_engine_dir, monkeypatch):
    # What a machine without a C++ compiler gets: "auto" takes varlen, "paged" is refused naming
    # why, the layers use torch's ops, and the tokens are the kernels' (float32).
    from engines.base import PrefillRequest
    from engines.base import EngineError
    from engines.torch.engine import TorchEngine

    prompts = [[1, 5, 9, 200, 33] * k for k in (1, 3, 7)]

    def greedy(engine):
        ids = [f"r{i}" for i in range(len(prompts))]
        out = engine.prefill([PrefillRequest(i, p) for i, p in zip(ids, prompts)]).tokens
        seqs = {i: [out[i]] for i in ids}
        for _ in range(6):
            step = engine.decode(ids).tokens
            for i in ids:
                seqs[i].append(step[i])
        return seqs

    with_kernels = TorchEngine(demo_engine_dir, device="cpu", kv_blocks=64)
    assert with_kernels.attention == "paged"
    expected = greedy(with_kernels)
    monkeypatch.setattr(cpu_kernels, "_build", lambda: (None, "RuntimeError: no C++ compiler"))
    assert cpu_kernels.fused_ops(torch.zeros(2, 3)) is None
    engine = TorchEngine(demo_engine_dir, device="cpu", kv_blocks=64)
    assert engine.attention == "varlen"
    assert greedy(engine) == expected
    with pytest.raises(EngineError, match="attention 'paged': the CPU kernels could not be built "
                                          r"\(RuntimeError: no C\+\+ compiler\); use 'varlen'"):
        TorchEngine(demo_engine_dir, device="cpu", kv_blocks=64, attention="paged")

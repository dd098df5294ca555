"""The CPU kernels (engines/torch/cpu_kernels.py) against the torch ops they replace and float64.

The fused elementwise ops: the same values as transformers' formulas (normalise in float32,
cast, multiply by the weight in the dtype; silu rounded before the product), within a rounding
step or two of the dtype. The attention kernels (paged decode, each implementation; prefill on
AMX) and the AMX matmul: within bfloat16's rounding of float64, as close as torch's own bfloat16
ops. Through the engine they are checked against transformers in test_smollm2_paths.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.cpu_info import cpu_flags
from engines.torch import cpu_kernels

MANTISSA = {torch.float32: 23, torch.bfloat16: 7}
AMX_FLAGS = {"amx_tile", "amx_bf16", "avx512_bf16"}
"""What the AMX kernels (prefill_attention, paged_decode's "amx") need of the CPU."""


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


def reference_decode(q, kv_blocks, tables, lens):
    """Each row's attention over its first lens[r] cached tokens, in float64 by torch's ops."""
    rows, heads, hd = q.shape
    kvh = kv_blocks.shape[3]
    out = torch.empty(rows, heads, hd, dtype=torch.float64)
    for r in range(rows):
        L = int(lens[r])
        k, v = (kv_blocks[i][tables[r]].reshape(-1, kvh, hd)[:L].double() for i in (0, 1))
        k, v = (x.repeat_interleave(heads // kvh, dim=1).transpose(0, 1) for x in (k, v))  # [heads, L, hd]
        w = torch.softmax(q[r].double()[:, None, :] @ k.transpose(1, 2) * hd ** -0.5, dim=-1)
        out[r] = (w @ v)[:, 0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hd,heads,kvh", [(64, 9, 3), (128, 8, 2), (64, 4, 4), (32, 4, 2)])
def test_paged_decode_both_implementations_against_float64(ops, dtype, hd, heads, kvh):
    # (64, 9, 3) is SmolLM2's layout, (128, 8, 2) a Llama's; (32, ...) has no vectorized kernel.
    # Lengths cross the 16-token blocks and the vectorized kernel's 256-token chunks.
    g = torch.Generator().manual_seed(hd + heads)
    lens = torch.tensor([1, 15, 16, 17, 255, 256, 257, 600, 3])
    bs, width = 16, (600 + 15) // 16
    kv = torch.randn(2, len(lens) * width + 3, bs, kvh, hd, generator=g).to(dtype)
    tables = torch.randperm(len(lens) * width + 3, generator=g)[:len(lens) * width].view(len(lens), width)
    q = (torch.randn(len(lens), heads, hd, generator=g) * 2).to(dtype)
    want = reference_decode(q, kv, tables, lens)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    impls = ["portable"]
    if "avx512f" in cpu_flags() and hd in (64, 128):
        impls.append("avx512")
    if AMX_FLAGS <= cpu_flags() and dtype == torch.bfloat16 and hd in (64, 128):
        impls.append("amx")
    for impl in impls:
        got = ops.paged_decode(q, kv, tables, lens, hd ** -0.5, impl)
        assert got.dtype == dtype and got.shape == q.shape
        err = (got.double() - want).abs().max().item()
        assert err < tol, f"{impl}: {err:.2e} off float64"
    assert torch.equal(ops.paged_decode(q, kv, tables, lens, hd ** -0.5), got)  # "auto" is the last, the fastest
    for impl in {"avx512", "amx"} - set(impls):
        with pytest.raises(RuntimeError, match=f"the {impl} kernel does not apply"):
            ops.paged_decode(q, kv, tables, lens, hd ** -0.5, impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cache_is_apply_rotary_and_index_copy_bit_for_bit(ops, dtype):
    from engines.torch.rope import apply_rotary

    g = torch.Generator().manual_seed(2)
    rows, heads, kvh, hd = 37, 9, 3, 64
    qkv = (torch.randn(rows, heads + 2 * kvh, hd, generator=g) * 3).to(dtype)
    angles = torch.randint(0, 30_000, (rows, 1), generator=g).float() * torch.rand(hd // 2, generator=g)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slots = torch.randperm(20 * 16, generator=g)[:rows]
    cache = torch.zeros(2, 20, 16, kvh, hd, dtype=dtype)
    rotated = apply_rotary(qkv[:, :heads + kvh], cos, sin)
    got = qkv.clone()
    ops.rope_cache_(got, cos, sin, heads, cache, slots)
    assert torch.equal(got[:, :heads + kvh], rotated)  # q and k rotated in place, same rounding
    assert torch.equal(got[:, heads + kvh:], qkv[:, heads + kvh:])  # v untouched
    assert torch.equal(cache[0].view(-1, kvh, hd)[slots], rotated[:, heads:])
    assert torch.equal(cache[1].view(-1, kvh, hd)[slots], qkv[:, heads + kvh:])
    untouched = torch.ones(20 * 16, dtype=torch.bool)
    untouched[slots] = False
    assert not cache[:, :, :].view(2, -1, kvh, hd)[:, untouched].any()  # no other slot written


def test_rope_cache_refuses_what_it_would_write_wrong(ops):
    qkv, cs = torch.zeros(2, 5, 8), torch.zeros(2, 8)
    cache = torch.zeros(2, 4, 4, 1, 8)
    with pytest.raises(RuntimeError, match="kv_layer .* contiguous"):
        ops.rope_cache_(qkv, cs, cs, 3, torch.zeros(2, 4, 4, 2, 8)[:, :, :, :1], torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="slot 16 outside the cache's 16"):
        ops.rope_cache_(qkv, cs, cs, 3, cache, torch.tensor([0, 16]))
    with pytest.raises(RuntimeError, match="head layout mismatch"):
        ops.rope_cache_(qkv, cs, cs, 2, cache, torch.tensor([0, 1]))


def test_argmax_rows_is_torch_argmax(ops):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 49152, generator=g)
    logits[1, 17] = logits[1, 40000] = 99.0  # a tie: the first one
    logits[2] = float("-inf")  # nothing above -inf: index 0
    logits[3, 5] = float("nan")  # a NaN counts as the maximum
    logits[3, 7] = float("nan")
    logits[4, -1] = 1e9  # the last index
    logits[5] = torch.round(logits[5])  # many ties at the top value
    assert torch.equal(ops.argmax_rows(logits), logits.argmax(dim=-1))
    assert ops.argmax_rows(logits)[[1, 3, 4]].tolist() == [17, 5, 49151]


needs_amx = pytest.mark.skipif(not AMX_FLAGS <= cpu_flags(), reason="amx_linear needs a CPU with AMX-BF16")
needs_bf16 = pytest.mark.skipif("avx512_bf16" not in cpu_flags(),
                                reason="prefill_attention needs a CPU with AVX512-BF16 (or AMX-BF16)")
PREFILL_IMPLS = ["avx512"] + (["amx"] if AMX_FLAGS <= cpu_flags() else [])
"""The prefill kernels this CPU runs: every one is checked (on a CPU with AMX, both)."""


def test_prefill_attention_is_there_exactly_where_the_cpu_has_bf16_dot_products(ops):
    assert ops.prefill_attention_available() == ("avx512_bf16" in cpu_flags())
    want = "amx" if AMX_FLAGS <= cpu_flags() else "avx512" if "avx512_bf16" in cpu_flags() else ""
    assert ops.prefill_attention_impl() == want


def reference_prefill(q, k, v):
    """Causal attention in float64: row i (position keys - rows + i) sees keys up to its position."""
    rows, heads, hd = q.shape
    keys, kvh = k.shape[:2]
    kk, vv = (x.double().repeat_interleave(heads // kvh, dim=1).transpose(0, 1) for x in (k, v))
    s = q.double().transpose(0, 1) @ kk.transpose(1, 2) * hd ** -0.5  # [heads, rows, keys]
    seen = torch.arange(keys)[None, :] <= torch.arange(keys - rows, keys)[:, None]
    return (torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1) @ vv).transpose(0, 1)


@needs_bf16
@pytest.mark.parametrize("impl", PREFILL_IMPLS)
@pytest.mark.parametrize("hd,heads,kvh", [(64, 9, 3), (128, 8, 2), (64, 4, 4)])
@pytest.mark.parametrize("rows,keys", [(1, 1), (15, 15), (16, 16), (17, 17), (64, 64), (65, 65), (333, 333),
                                       (5, 300), (100, 137), (1, 70)])
def test_prefill_attention_against_float64_and_sdpa(ops, impl, hd, heads, kvh, rows, keys):
    # (64, 9, 3) is SmolLM2's layout, (128, 8, 2) a Llama's; the lengths cross the kernel's tiles (16
    # and 32 keys) and chunks (64); rows < keys is a chunk continuing cached KV.
    g = torch.Generator().manual_seed(rows * 1000 + keys + hd)
    q = (torch.randn(rows, heads, hd, generator=g) * 2).to(torch.bfloat16)
    k, v = (torch.randn(keys, kvh, hd, generator=g).to(torch.bfloat16) for _ in range(2))
    want = reference_prefill(q, k, v)
    out = torch.full_like(q, float("nan"))
    ops.prefill_attention(q, k, v, out, hd ** -0.5, impl)
    seen = torch.arange(keys)[None, :] <= torch.arange(keys - rows, keys)[:, None]
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          attn_mask=seen, enable_gqa=True)[0].transpose(0, 1)
    err, sdpa_err = (out.double() - want).abs(), (sdpa.double() - want).abs()
    # As close as torch's SDPA in bfloat16 on average (both round the softmax weights to bfloat16
    # before multiplying V, and the output), and every value within two output roundings plus 4e-3.
    assert err.mean() <= 1.2 * sdpa_err.mean(), f"mean error {err.mean():.2e} against SDPA's {sdpa_err.mean():.2e}"
    bound = want.abs() * 2.0 ** -7 + 4e-3
    assert (err <= bound).all(), f"{(err / bound).max().item():.2f}x the bound off float64"


@needs_bf16
@pytest.mark.parametrize("impl", PREFILL_IMPLS)
def test_prefill_attention_rescales_as_the_maximum_grows_and_writes_into_views(ops, impl):
    # Scores that grow along the sequence move every row's running maximum chunk after chunk (the
    # kernel's rescaling), with a spread of thousands (no overflow); out is a slice of a larger tensor.
    g = torch.Generator().manual_seed(7)
    keys, heads, kvh, hd = 700, 6, 2, 64
    q = torch.ones(keys, heads, hd).to(torch.bfloat16)
    k = (torch.linspace(0, 40, keys)[:, None, None] * torch.ones(keys, kvh, hd)
         + torch.randn(keys, kvh, hd, generator=g)).to(torch.bfloat16)
    v = torch.randn(keys, kvh, hd, generator=g).to(torch.bfloat16)
    big = torch.zeros(keys + 10, heads, hd, dtype=torch.bfloat16)
    ops.prefill_attention(q, k, v, big[5:keys + 5], hd ** -0.5, impl)
    got = big[5:keys + 5].double()
    assert torch.isfinite(got).all() and (big[:5] == 0).all() and (big[keys + 5:] == 0).all()
    assert (got - reference_prefill(q, k, v)).abs().max().item() < 2e-2


@needs_bf16
def test_prefill_attention_refuses_what_it_cannot_do(ops):
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        ops.prefill_attention(q.float(), q.float(), q.float(), q.float(), 0.1)
    with pytest.raises(RuntimeError, match="head size 64 or 128"):
        q32 = torch.zeros(4, 2, 32, dtype=torch.bfloat16)
        ops.prefill_attention(q32, q32, q32, q32.clone(), 0.1)
    with pytest.raises(RuntimeError, match="head layout mismatch"):  # fewer keys than rows
        ops.prefill_attention(q, q[:2], q[:2], q.clone(), 0.1)
    with pytest.raises(RuntimeError, match="impl is auto, amx or avx512, not tiles"):
        ops.prefill_attention(q, q, q, q.clone(), 0.1, "tiles")
    if "amx" not in PREFILL_IMPLS:
        with pytest.raises(RuntimeError, match="no AMX-BF16 here"):
            ops.prefill_attention(q, q, q, q.clone(), 0.1, "amx")


@needs_amx
@pytest.mark.parametrize("rows", [1, 15, 32, 64, 65, 130])
@pytest.mark.parametrize("out_dim,in_dim,bias", [(960, 576, False), (576, 1536, True), (16, 32, True)])
def test_amx_linear_against_float64(ops, rows, out_dim, in_dim, bias):
    # SmolLM2's qkv and down projections and the smallest shape; 65 and 130 rows take more than
    # one pass over the weight (64 rows a pass), 15 a partial tile.
    assert ops.amx_gemm_available() == (AMX_FLAGS <= cpu_flags())
    g = torch.Generator().manual_seed(rows + out_dim)
    w = torch.randn(out_dim, in_dim, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, in_dim, generator=g).to(torch.bfloat16)
    b = torch.randn(out_dim, generator=g).to(torch.bfloat16) if bias else torch.empty(0)
    got = ops.amx_linear(x, ops.amx_pack(w), b)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_dim)
    # float32 sums of bfloat16 products, rounded once to bfloat16: half an ulp plus the sums' error.
    within = (got.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-3 * in_dim ** 0.5
    assert within.all(), f"{(~within).sum().item()} values off float64"
    torch.testing.assert_close(got, F.linear(x, w, b if bias else None), rtol=2 ** -7, atol=1e-2)
    # float_out: the same float32 sums before rounding (logits), so within float32's error of float64.
    sums = ops.amx_linear(x, ops.amx_pack(w), b, float_out=True)
    assert sums.dtype == torch.float32 and torch.equal(sums.to(torch.bfloat16), got)
    assert ((sums.double() - want).abs() <= want.abs() * 1e-5 + 1e-4).all()


@needs_amx
def test_amx_pack_and_linear_refuse_what_they_cannot_do(ops):
    with pytest.raises(RuntimeError, match="multiple of 16 and K of 32, got 20 x 64"):
        ops.amx_pack(torch.zeros(20, 64, dtype=torch.bfloat16))
    packed = ops.amx_pack(torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="x has 32 inputs, the weight 64"):
        ops.amx_linear(torch.zeros(2, 32, dtype=torch.bfloat16), packed, torch.empty(0))
    with pytest.raises(RuntimeError, match="bias of 32"):
        ops.amx_linear(torch.zeros(2, 64, dtype=torch.bfloat16), packed, torch.zeros(5, dtype=torch.bfloat16))

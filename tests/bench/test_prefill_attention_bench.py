"""bench/prefill_attention.py runs on any CPU: this project's kernel (AMX or AVX512-BF16) beside
torch's SDPA where the CPU has one, SDPA alone elsewhere, each time beside the rate of the
prefill's linear-layer matmul."""
from __future__ import annotations

import json

from bench.prefill_attention import causal_flops, main
from engines.torch.cpu_kernels import kernels


def test_it_times_sdpa_and_the_matmul_rate_it_compares_with(tmp_path, capsys):
    out = tmp_path / "pa.json"
    assert main(["--lengths", "32", "--repeats", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    ops = kernels()
    impl = ops.prefill_attention_impl() if ops is not None else ""
    assert set(row["ms"]) == {"sdpa", "sdpa-contiguous"} | ({impl, "avx512"} if impl else set())
    assert row["ms"]["sdpa"] > 0 and row["gflop_s"]["sdpa"] > 0 and row["matmul_gflop_s"] > 0
    assert all(e < 0.05 for e in row["max_err_vs_float64"].values())  # bfloat16 inputs against float64
    assert "| 32 |" in capsys.readouterr().out


def test_causal_flops_count_each_query_key_pair_once():
    # 9 heads x 64 dims x (QK^T and PV) x 2 flops, over T(T+1)/2 pairs
    assert causal_flops(1) == 2 * 2 * 9 * 64
    assert causal_flops(4) == 10 * causal_flops(1)

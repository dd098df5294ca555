"""Named profiles: derived sizes, the registry, and that each profile is what its source says."""
from __future__ import annotations

import pytest

from engines.sim.profiles import (
    PROFILES, HardwareProfile, ModelProfile, hardware_profile, model_profile,
)


def test_derived_sizes_of_opt_13b_and_llama_3_8b():
    opt = model_profile("OPT-13B")
    assert opt.weight_bytes == 25_706_946_560  # 12,853,473,280 params * 2 B
    assert opt.kv_bytes_per_token == 819_200  # 2 * 40 layers * 40 KV heads * 128 * 2 B
    assert opt.flops_per_token == 2 * 12_853_473_280
    llama = model_profile("Llama-3-8B")
    assert llama.kv_bytes_per_token == 131_072  # 2 * 32 * 8 KV heads (GQA) * 128 * 2 B
    assert (llama.heads, llama.kv_heads) == (32, 8)


@pytest.mark.parametrize("name", ["OPT-2.7B", "OPT-6.7B", "OPT-13B", "OPT-30B", "Llama-3-8B", "Llama-3-70B"])
def test_param_counts_follow_from_the_config_shapes(name):
    # Recount from the shapes (OPT: biases, learned positions, tied head; Llama: untied head, no biases).
    m = model_profile(name)
    d, f, L, V = m.hidden, m.intermediate, m.layers, m.vocab
    if name.startswith("OPT"):
        assert m.kv_heads == m.heads and m.head_dim * m.heads == d
        count = V * d + 2050 * d + L * (4 * d * d + 2 * d * f + f + 9 * d) + 2 * d
    else:
        assert m.kv_heads == 8
        q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
        count = 2 * V * d + L * (2 * d * q + 2 * d * kv + 3 * d * f + 2 * d) + d
    assert m.params == count


def test_hardware_takes_dense_bf16_and_one_way_links():
    h100 = hardware_profile("h100-sxm")  # case-insensitive
    assert h100.dense_flops == pytest.approx(1979e12 / 2, rel=1e-3)  # datasheet's sparse figure / 2
    assert h100.nvlink_bandwidth == 900e9 / 2 and h100.pcie_bandwidth == 128e9 / 2
    assert (h100.sm_count, h100.hbm_bytes) == (132, 80 * 10**9)
    assert hardware_profile("H200").hbm_bandwidth == 4.8e12
    assert hardware_profile("A100-80GB").dense_flops == 312e12


def test_lookup_errors_list_the_known_names():
    with pytest.raises(KeyError, match="unknown model profile 'OPT-175B'; known model profiles: OPT-2.7B, "):
        model_profile("OPT-175B")
    with pytest.raises(KeyError, match="known hardware profiles: H100-SXM, H200, A100-80GB"):
        hardware_profile("OPT-13B")  # a model is not hardware
    assert all(isinstance(p, (HardwareProfile, ModelProfile)) and p.source for p in PROFILES.values())


def test_profiles_round_trip_and_are_checked():
    m = model_profile("Llama-3-70B")
    assert ModelProfile.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="heads .* must be a multiple of kv_heads"):
        ModelProfile("bad", layers=1, hidden=8, heads=3, kv_heads=2, head_dim=4, intermediate=8, vocab=10,
                     params=100, max_seq_len=16)
    with pytest.raises(ValueError, match="sm_count must be > 0"):
        HardwareProfile.from_dict({**hardware_profile("H200").to_dict(), "sm_count": 0})


def test_from_hf_config_reads_llama_and_opt_key_names():
    llama = ModelProfile.from_hf_config("x", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 300,
                                              "max_position_embeddings": 512}, params=10_000, bytes_per_param=4)
    assert (llama.kv_heads, llama.head_dim, llama.intermediate, llama.bytes_per_param) == (2, 16, 128, 4)
    opt = ModelProfile.from_hf_config("y", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                            "ffn_dim": 256, "vocab_size": 300, "max_position_embeddings": 512},
                                      params=10_000, bytes_per_param=2)
    assert (opt.kv_heads, opt.intermediate) == (4, 256)


def test_the_sim_package_does_not_import_torch():
    # The sim engine must run where torch is absent or slow to import; the calibration CLI's
    # measuring module (bench/torch_timings.py) imports it, outside this package.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, engines.sim.profiles, engines.sim.cost_model, engines.sim.calibration; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", f"torch modules imported: {run.stdout}"

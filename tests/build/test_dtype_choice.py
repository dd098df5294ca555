"""`--dtype auto`: bfloat16 where the CPU computes in it natively, float32 elsewhere."""
from __future__ import annotations

import torch

from build_scripts.build_engine import main
from build_scripts.dtype_choice import cpu_flags, default_dtype
from engines.manifest import read_manifest

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f {extra}
bogomips\t: 4000.00

processor\t: 1
flags\t\t: fpu vme sse sse2 avx2 avx512f {extra}
"""


def test_cpu_flags_decide_the_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = {"amx_bf16 amx_tile avx512_bf16": ("bfloat16", "amx_bf16 and avx512_bf16"),
             "avx512_bf16": ("bfloat16", "avx512_bf16"),
             "avx512_vnni": ("float32", "emulated")}
    for extra, (dtype, why) in cases.items():
        info = tmp_path / "cpuinfo"
        info.write_text(CPUINFO.format(extra=extra))
        assert cpu_flags(info) >= set(extra.split())
        got, reason = default_dtype(info)
        assert got == dtype and why in reason, (extra, got, reason)
    assert cpu_flags(tmp_path / "missing") == set()
    assert default_dtype(tmp_path / "missing")[0] == "float32"


def test_auto_build_records_and_prints_the_choice(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--model", "demo", "--out", str(out), "--max-seq-len", "256", "--kv-memory-gb", "0.05"]) in (0, None)
    dtype, why = default_dtype()
    assert read_manifest(out).dtype == dtype
    assert f"dtype: {dtype} ({why}" in capsys.readouterr().out
    pinned = tmp_path / "pinned"
    main(["--model", "demo", "--out", str(pinned), "--max-seq-len", "256", "--kv-memory-gb", "0.05", "--dtype", "float32"])
    assert read_manifest(pinned).dtype == "float32"

"""The compute dtype an engine is built for when none is given (`--dtype auto`).

bfloat16 where the hardware computes in it natively, float32 elsewhere:
- a CUDA GPU that supports bfloat16 (`torch.cuda.is_bf16_supported()`);
- a CPU with AMX-BF16 or AVX512-BF16 (Sapphire Rapids and later; Zen 4 and later): there oneDNN
  runs bfloat16 matmuls natively. Measured on this project's 2-core Xeon with AMX (SmolLM2-135M,
  docs/benchmarks.md): a prefill of 4,280 tokens in 1.9 s instead of 8.2 s in float32, a decode
  step of 32 mixed sequences in ~110 ms instead of ~190 ms. Without those instructions bfloat16
  is emulated and slower than float32.
float32 stays selectable (`--dtype float32`), and is what the equality tests against
transformers use.
"""
from __future__ import annotations

from pathlib import Path

from engines.cpu_info import cpu_flags

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags under which a CPU runs bfloat16 matmuls natively."""


def default_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, str]:
    """(dtype, why) for this machine: the GPU decides where one is visible, else the CPU."""
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"{torch.cuda.get_device_name(0)} supports bfloat16"
        return "float32", f"{torch.cuda.get_device_name(0)} has no bfloat16"
    have = [f for f in BF16_CPU_FLAGS if f in cpu_flags(cpuinfo)]
    if have:
        return "bfloat16", f"the CPU has {' and '.join(have)}"
    return "float32", f"the CPU has none of {', '.join(BF16_CPU_FLAGS)} (bfloat16 would be emulated)"

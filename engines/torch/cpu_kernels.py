"""The torch engine's CPU kernels (kernels/*.cpp), compiled on first use.

- `paged_decode`: each decode row attends to its sequence's KV straight from the cache blocks,
  one task per row over torch's thread pool, instead of gathering the blocks into a padded
  tensor and running SDPA over it (the "varlen" path). Three implementations of the same
  contract, the fastest that applies taken by default (`impl`): in bfloat16 on a CPU with
  AMX-BF16 the scores on AMX tiles (kernels/paged_decode_amx.cpp), else AVX-512 loops, else
  portable loops (kernels/paged_decode.cpp says how). Measured on this project's 2-core Xeon,
  SmolLM2 shapes, 32 rows of 64-1,500 KV tokens (`bench/attention_paths.py`, docs/benchmarks.md).
- `prefill_attention`: causal attention of a prompt or chunk in bfloat16, on AMX tiles where
  the CPU has AMX-BF16, else with AVX512-BF16 dot products (`prefill_attention_impl`;
  kernels/prefill_attention.cpp), in place of torch's CPU flash attention on the "paged" path
  (`bench/prefill_attention.py`: ~2x SDPA with AMX on the Xeon, ~3x with AVX512-BF16 on an AMD
  EPYC).
- `amx_pack`, `amx_linear`: a decode step's weight matmuls on AMX tiles, the weights packed in
  the tiles' reading order (kernels/small_gemm.cpp; packed_linear.py uses them,
  `bench/decode_matmuls.py`).
- `decode_layers`: every decoder layer of a pure decode step in C++, the same calls as
  models/layers.py (kernels/decode_layers.cpp).
- `rms_norm`, `add_rms_norm_`, `silu_mul`: a decoder layer's elementwise work in one pass each,
  rounding as the unfused torch ops do (kernels/fused_norm.cpp); `models/layers.py` uses them for
  CPU tensors (`fused_ops`).
- `rope_cache_`: the rotary embedding of q and k and the store of k and v in the cache, in one
  pass, bit for bit what apply_rotary and index_copy_ give (kernels/rope_cache.cpp).
- `argmax_rows`: the greedy pick, torch.argmax's result; aten::argmax was 6% of a profiled 32-row
  decode step of SmolLM2 (`bench/profile_step.py`, docs/benchmarks.md) and is gone from it.

The AMX kernels exist where the building CPU has AMX-BF16 (`prefill_attention_impl`,
`amx_gemm_available`), the prefill kernel's AVX512-BF16 form where it has that
(`prefill_attention_available`); elsewhere the engine takes the AVX-512 or portable loops, torch's
SDPA and oneDNN.
`torch.utils.cpp_extension.load` builds them with the machine's C++ compiler and ninja into
torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions): ~30 s the
first time on this machine, a check of the cached build after that. Built for the building CPU
(-march=native). Where they cannot be built (no compiler), `kernels()` returns None,
`unavailable()` says why, the engine's "auto" path falls back to "varlen" and the layers to
torch's ops.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

from engines.cpu_info import cpu_flags

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "kernels" / name
           for name in ("bindings.cpp", "paged_decode.cpp", "fused_norm.cpp", "rope_cache.cpp", "prefill_attention.cpp", "paged_decode_amx.cpp", "decode_layers.cpp", "small_gemm.cpp")]
NAME = "alignedserve_cpu_kernels"
"""The extension's name, suffixed with a hash of this CPU's flags (`_name`): a build for one CPU
(-march=native) is never loaded on another that shares the cache directory."""
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
"""-fopenmp: ATen's parallel_for is inline OpenMP (torch's libgomp, already loaded, is the one used)."""


def _name() -> str:
    return f"{NAME}_{hashlib.sha256(' '.join(sorted(cpu_flags())).encode()).hexdigest()[:10]}"


@functools.lru_cache(maxsize=1)
def _build():
    try:
        from torch.utils.cpp_extension import load

        module = load(name=_name(), sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
        return module, None
    except Exception as e:  # a compiler error, no compiler, no ninja: the engine falls back
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[-1] if text else e!r}"
        log.warning("the CPU kernels could not be built (%s); torch's ops are used instead", reason)
        return None, reason


def kernels():
    """The compiled module (the functions of the module docstring), or None where it cannot be built.

    paged_decode(q [rows, heads, hd], kv_blocks [2, blocks, block_size, kv_heads, hd],
    block_tables [rows, max_blocks] int64, kv_lens [rows] int64, scale, impl="auto")
    -> [rows, heads, hd]."""
    return _build()[0]


def unavailable() -> str | None:
    """Why the kernels cannot be used here, or None when they can."""
    return _build()[1]


def fused_ops(x: torch.Tensor):
    """The kernels for a 2-D CPU tensor, else None (GPU tensors take torch's ops)."""
    if x.device.type != "cpu" or x.dim() != 2:
        return None
    return kernels()

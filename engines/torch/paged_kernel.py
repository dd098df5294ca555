"""The CPU paged decode-attention kernel (kernels/paged_decode.cpp), compiled on first use.

Each decode row attends to its sequence's KV straight from the cache blocks, one task per row
over torch's thread pool, instead of gathering the blocks into a padded tensor and running SDPA
over it (the "varlen" path). Measured on this project's 2-core Xeon, SmolLM2 shapes, 32 rows of
64-1,500 KV tokens (bench/attention_paths.py; docs/benchmarks.md): 1.1 ms a layer in bfloat16
against 1.7 ms for gather + SDPA, 1.2 ms against 10 ms in float32; a whole decode step 83 ms
against 97 ms in bfloat16.

`torch.utils.cpp_extension.load` builds it with the machine's C++ compiler into torch's extension
cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions): ~25 s the first time on this
machine, a check of the cached build after that. Built for the building CPU (-march=native).
Where it cannot be built (no compiler, no ninja), `kernel()` returns None, `unavailable()` says
why, and the engine's "auto" path falls back to "varlen".
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "kernels" / "paged_decode.cpp"
NAME = "alignedserve_paged_decode"
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
"""-fopenmp: ATen's parallel_for is inline OpenMP (torch's libgomp, already loaded, is the one used)."""


@functools.lru_cache(maxsize=1)
def _build():
    try:
        from torch.utils.cpp_extension import load

        module = load(name=NAME, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
        return module.paged_decode, None
    except Exception as e:  # a compiler error, no compiler, no ninja: the engine falls back
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
        log.warning("the paged decode kernel could not be built (%s); decode attention uses gather + SDPA", reason)
        return None, reason


def kernel():
    """paged_decode(q [rows, heads, hd], kv_blocks [2, blocks, block_size, kv_heads, hd],
    block_tables [rows, max_blocks] int64, kv_lens [rows] int64, scale) -> [rows, heads, hd];
    None where it cannot be built."""
    return _build()[0]


def unavailable() -> str | None:
    """Why the kernel cannot be used here, or None when it can."""
    return _build()[1]

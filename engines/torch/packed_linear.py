"""Weights prepacked for the few rows of a decode step, on a CPU with bfloat16 matmuls.

`F.linear` in bfloat16 on CPU hands oneDNN a plain weight, which it reorders into its blocked
layout on every call. A decode step multiplies a few rows by every weight of the model, so that
reorder costs about as much as the matmul: measured on this project's Xeon (AMX), a [1, 576] x
[576, 3072] matmul took 311 us plain and 172 us with the weight packed once, 2.4 ms and 1.3 ms
for SmolLM2's [576, 49152] head; at 32 rows 1.5x faster. Two packings, chosen at `pack`:

- On a CPU with AMX-BF16 (and the CPU kernels built): the kernels' own tile order (`amx_pack`,
  kernels/small_gemm.cpp), multiplied by `amx_linear` for up to `AMX_MAX_ROWS` rows. SmolLM2's
  layer weights interleaved as a decode step reads them (qkv, o, gate_up, down, 30 layers):
  12.2 ms at 32 rows against 16.5 ms for oneDNN's packed matmul, 9.2 against 13.4 ms at one row
  (`bench/decode_matmuls.py`, docs/benchmarks.md). Above 64 rows oneDNN was faster, so more
  rows take plain F.linear.
- Else oneDNN's layout (`_reorder_linear_weight`), used up to `PACK_MAX_ROWS` rows: for
  thousands of rows (a prefill) the plain call was as fast or faster (8.1 ms against 9.9 ms at
  4,280 rows).

The packed copy sits beside the checkpoint's weight (which the fused projections, the tied
embeddings and the tests read): ~2x the memory of the matmul weights, only where packing is on
(bfloat16 on a CPU with native bfloat16). Outputs are the same matmul in bfloat16; the blocked
order of accumulation may round the last bit differently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch.cpu_kernels import kernels as cpu_kernels

PACK_MAX_ROWS = 256
"""Rows up to which a oneDNN-packed weight is used (decode steps, small chunks); plain F.linear above."""
AMX_MAX_ROWS = 64
"""Rows up to which an AMX-packed weight is used; plain F.linear above."""


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """bfloat16 on a CPU where oneDNN computes in it natively, with the ops present in this torch."""
    mkldnn = torch.ops.mkldnn
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")
            and mkldnn._is_mkldnn_bf16_supported())


def _amx():
    """The CPU kernels where they run AMX matmuls here, else None."""
    module = cpu_kernels()
    return module if module is not None and module.amx_gemm_available() else None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] packed for few rows: AMX tile order (4-D) where the CPU and the shape
    allow it, else oneDNN's layout (2-D)."""
    out, inp = weight.shape
    if (amx := _amx()) is not None and out % 16 == 0 and inp % 32 == 0:
        return amx.amx_pack(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def max_rows(packed: torch.Tensor) -> int:
    """Rows up to which `project` multiplies through this packed weight."""
    return AMX_MAX_ROWS if packed.dim() == 4 else PACK_MAX_ROWS


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            packed: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias over the last dimension, through `packed` when given and x has few rows."""
    if packed is not None and x.shape[0] <= max_rows(packed):
        if packed.dim() == 4:
            return cpu_kernels().amx_linear(x, packed, _NO_BIAS if bias is None else bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def project_float(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  packed: torch.Tensor | None) -> torch.Tensor:
    """`project` in float32 (logits): through an AMX-packed weight the float32 sums come out
    unrounded, where every other path rounds them to the weight's dtype first. Rounding logits to
    bfloat16 (steps of 0.125 at 16-32) ties tokens that float32 tells apart: SmolLM2's first
    answer token to "What is the capital of France?" ("The", 0.1 above "L" in float32) tied
    with "L" after the AMX prefill attention's bfloat16 rounding and lost the tie."""
    if packed is not None and packed.dim() == 4 and x.shape[0] <= AMX_MAX_ROWS:
        return cpu_kernels().amx_linear(x, packed, _NO_BIAS if bias is None else bias, float_out=True)
    return project(x, weight, bias, packed).float()


_NO_BIAS = torch.empty(0)


class Linear(nn.Linear):
    """nn.Linear (same parameters, so checkpoints load by name) that uses a packed weight once
    `pack_model` has given it one."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias, self.packed)


def pack_model(model: nn.Module) -> int:
    """Pack every weight the forward multiplies by: the fused projections (`fused_projections`
    groups, read as `<group>_weight`, packed as `<group>_packed`) and each `Linear` not part of
    one. Returns how many weights were packed."""
    fused_parts = set()
    count = 0
    for name, module in model.named_modules():
        for group, parts in getattr(module, "fused_projections", {}).items():
            fused_parts.update(f"{name}.{p}" if name else p for p in parts)
            setattr(module, f"{group}_packed", pack(getattr(module, f"{group}_weight")))
            count += 1
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name not in fused_parts:
            module.packed = pack(module.weight)
            count += 1
    return count

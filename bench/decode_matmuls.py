"""A decode step's weight matmuls on the CPU: AMX-packed (kernels/small_gemm.cpp) against oneDNN's
prepacked matmul and plain F.linear.

    python -m bench.decode_matmuls [--rows 1 8 32 64] [--repeats 5] [--out bench/results/decode_matmuls.json]

SmolLM2-135M's layer weights (random, bfloat16: qkv 960x576, o 576x576, gate_up 3072x576, down
576x1536; 30 layers, 213 MB), multiplied in the order a decode step reads them (layer by layer),
by `rows` rows of activations:

- onednn: `torch.ops.mkldnn._linear_pointwise` on weights from `_reorder_linear_weight`
  (packed_linear.py's oneDNN packing);
- amx: `amx_linear` on weights from `amx_pack` (packed_linear.py's packing on a CPU with AMX-BF16);
- plain: `F.linear` on the checkpoint's weights.

Candidates alternate within each repeat; the table gives the best milliseconds of a whole pass
and the weights' bytes per second. Needs a CPU with AMX-BF16 (exits 2 otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.cpu_record import write_record
from engines.torch.cpu_kernels import kernels

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LAYERS = 30
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "decode_matmuls.json")
    a = p.parse_args(argv)
    ops = kernels()
    if ops is None or not ops.amx_gemm_available():
        print("amx_linear needs the CPU kernels built on a CPU with AMX-BF16", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    plain = [{n: torch.randn(o, i, generator=g).to(torch.bfloat16) for n, (o, i) in SHAPES.items()}
             for _ in range(LAYERS)]
    onednn = [{n: torch.ops.mkldnn._reorder_linear_weight(w, 1) for n, w in layer.items()} for layer in plain]
    amx = [{n: ops.amx_pack(w) for n, w in layer.items()} for layer in plain]
    weight_bytes = sum(w.numel() * 2 for layer in plain for w in layer.values())
    no_bias = torch.empty(0)
    op = torch.ops.mkldnn._linear_pointwise
    calls = {
        "onednn": lambda x, i, n: op(x, onednn[i][n], None, "none", [], ""),
        "amx": lambda x, i, n: ops.amx_linear(x, amx[i][n], no_bias),
        "plain": lambda x, i, n: F.linear(x, plain[i][n]),
    }
    rows_out = []
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for rows in a.rows:
            xs = {n: torch.randn(rows, i, generator=g).to(torch.bfloat16) for n, (o, i) in SHAPES.items()}
            best = {name: float("inf") for name in calls}
            for _ in range(a.repeats):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    for i in range(LAYERS):
                        for n in SHAPES:
                            call(xs[n], i, n)
                    best[name] = min(best[name], time.perf_counter() - t0)
            rows_out.append({"rows": rows, "ms": {k: 1e3 * v for k, v in best.items()},
                             "gb_per_s": {k: weight_bytes / v / 1e9 for k, v in best.items()}})
            print(f"rows={rows}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in best.items()), file=sys.stderr)
    print("| rows | onednn ms (GB/s) | amx ms (GB/s) | plain ms (GB/s) | onednn / amx |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows_out:
        m, b = r["ms"], r["gb_per_s"]
        print(f"| {r['rows']} | {m['onednn']:.1f} ({b['onednn']:.1f}) | {m['amx']:.1f} ({b['amx']:.1f}) | "
              f"{m['plain']:.1f} ({b['plain']:.1f}) | {m['onednn'] / m['amx']:.2f}x |")
    write_record(a.out, "bench.decode_matmuls", argv, load_before, weight_mb=weight_bytes / 1e6, rows=rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The sim's decode attention dispatch models against the GPU probe (`python -m bench.sim_dispatch`).

    python -m bench.sim_dispatch [--probe bench/results/decode_bubble-h100.json] [--hardware H100-SXM]

Refits the `greedy` model's constants on the probe's FlashAttention-2 varlen timings
(engines/sim/dispatch.py `fit_greedy`), prints them beside the ones in `dispatch.KERNELS`, the
error per case, the bubble ratios (same batch size and total KV, different spread) measured and
modelled, and what the other dispatch models (roofline constants) give for the same batches.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.sim.cost_model import CostModel
from engines.sim.dispatch import DISPATCH_MODELS, H100_PROBE, KERNELS, fit_greedy, load_probe
from engines.sim.profiles import hardware_profile, model_profile

PAIRS = [("b 34x500+2x9500 longs last", "a 36x1000"), ("b 34x500+2x9500 longs first", "a 36x1000"),
         ("c 60x300+4x8000", "c-ref 64x781"), ("d 124x500+4x16500", "d-ref 128x1000")]
"""The probe's equal-total pairs (decode_bubble_gpu.py PAIRS)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", type=Path, default=H100_PROBE)
    p.add_argument("--hardware", default="H100-SXM", help="the profile of the probe's GPU")
    a = p.parse_args(argv)
    hw = hardware_profile(a.hardware)
    head, cases = load_probe(a.probe)
    fit = fit_greedy(cases, hw)
    d, table = fit.dispatch, KERNELS["fa2-varlen"]
    print(f"probe: {a.probe} ({head.get('device')}, {head.get('sms')} SMs, torch {head.get('torch')}), "
          f"{len(cases)} fa2-varlen cases")
    for name, k in (("fit", d), ("KERNELS", table)):
        print(f"{name:8s} slots/SM {k.slots_per_sm}, e {k.kv_bandwidth_efficiency:.2f}, r "
              f"{k.unit_bandwidth / 1e9:.2f} GB/s per unit, c0 {k.unit_overhead_s * 1e6:.2f} us per unit, "
              f"launch {k.launch_s * 1e6:.1f} us per layer")
    print()
    print(fit.table())
    by = {(c.shape, c.case): (c, pred) for c, pred in zip(cases, fit.predicted)}
    print("\n| shape | pair | measured | greedy | " + " | ".join(m for m in DISPATCH_MODELS if m != "greedy") + " |")
    print("|---|---|---:|---:|" + "---:|" * (len(DISPATCH_MODELS) - 1))
    for shape in dict.fromkeys(c.shape for c in cases):
        others = {m: CostModel(hw, model_profile(shape), dispatch=m) for m in DISPATCH_MODELS if m != "greedy"}
        for x, y in PAIRS:
            if (shape, x) not in by or (shape, y) not in by:
                continue
            (cx, px), (cy, py) = by[shape, x], by[shape, y]
            ratios = [others[m].attention_seconds(cx.kv_lens) / others[m].attention_seconds(cy.kv_lens) for m in others]
            print(f"| {shape} | {x} / {y} | {cx.seconds / cy.seconds:.2f} | {px / py:.2f} | "
                  + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

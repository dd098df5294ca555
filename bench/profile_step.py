"""Where a torch-engine decode step and a prefill spend their time: torch.profiler's top ops.

    python -m bench.profile_step --model-dir /tmp/smol [--dtype bfloat16] [--attention varlen] [--rows 12]

The decode step: 32 sequences of mixed KV lengths (64, 64, 512, 1500 repeated; 17,120 tokens of
KV, the longest 1,500), each prefilled alone first, then 3 warm-up steps and 3 profiled steps.
The prefill: one call with 8 mixed prompts (64, 64, 512, 1500, twice: 4,280 tokens), after one
warm-up call. Prints, for each, the wall time per call and the top ops by self CPU time (share
of the profiled time, milliseconds per call, calls per call). Uses only the engine's public
constructor and calls (`attention` only when given), so the same file profiles an older engine:
run it with PYTHONPATH pointing at that checkout.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engines.base import PrefillRequest
from engines.torch.engine import TorchEngine

MIXED = (64, 64, 512, 1500)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(100, 20_000, (n - 1,), generator=g).tolist()


def top_rows(prof, calls: int, rows: int) -> list[str]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    out = ["| op | share of self CPU time | ms per call | op calls per call |", "|---|---|---|---|"]
    for e in events[:rows]:
        out.append(f"| `{e.key}` | {e.self_cpu_time_total / total:.1%} | {e.self_cpu_time_total / 1e3 / calls:.1f} | "
                   f"{e.count / calls:.0f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attention", default=None, help="the engine's attention path (omit for an engine without one)")
    p.add_argument("--what", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    p.add_argument("--rows", type=int, default=12)
    a = p.parse_args(argv)
    kwargs = {"attention": a.attention} if a.attention else {}
    engine = TorchEngine(a.model_dir, device="cpu", dtype=a.dtype, max_seq_len=2048, kv_blocks=2400, **kwargs)
    label = f"{a.dtype}, attention={a.attention or '(engine default)'}, {torch.get_num_threads()} threads"
    with torch.inference_mode():
        if "decode" in a.what:
            ids = [f"d{i}" for i in range(32)]
            for i, rid in enumerate(ids):
                engine.prefill([PrefillRequest(rid, prompt(MIXED[i % 4] - 3, i))])
            for _ in range(3):
                engine.decode(ids)
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    engine.decode(ids)
            wall = (time.perf_counter() - t0) / 3
            print(f"\ndecode step, 32 mixed sequences, {label}: {wall:.3f} s per step (profiled)\n")
            print("\n".join(top_rows(prof, 3, a.rows)))
            engine.free(ids)
        if "prefill" in a.what:
            reqs = [[PrefillRequest(f"{tag}{i}", prompt(n, 100 + i)) for i, n in enumerate(MIXED * 2)]
                    for tag in ("w", "p")]
            engine.prefill(reqs[0])
            engine.free([r.request_id for r in reqs[0]])
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.prefill(reqs[1])
            wall = time.perf_counter() - t0
            print(f"\nprefill, 8 mixed prompts (4,280 tokens) in one call, {label}: {wall:.2f} s (profiled)\n")
            print("\n".join(top_rows(prof, 1, a.rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

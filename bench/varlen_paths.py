"""The torch engine's attention paths end to end: prefill packed vs padded on mixed prompts, and
a decode step varlen vs padded on mixed KV lengths.

    python -m bench.varlen_paths --model-dir /tmp/smol [--dtype bfloat16 float32] [--repeats 3]

Prefill: 8 prompts of 64, 64, 512, 1500, 64, 64, 512, 1500 tokens (4,280 real tokens; padded to
8 x 1500 = 12,000) in one call on each path, and the same prompts one call each (no padding on
either path). Decode: one step over 32 sequences, uniform (all 64) and mixed (64, 64, 512, 1500
repeated: 17,120 tokens of KV against 48,000 padded), each sequence prefilled alone first and
warmed up by one step. The two engines (one per path, same weights) alternate within every
repeat; the table gives medians and the padded / varlen ratio. JSON under
bench/results/varlen_paths.json, markdown on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from engines.base import PrefillRequest
from engines.torch.engine import TorchEngine

RESULTS = Path(__file__).resolve().parent / "results"
MIXED = (64, 64, 512, 1500)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(100, 20_000, (n - 1,), generator=g).tolist()


def prefill_seconds(engine: TorchEngine, lens: list[int], together: bool) -> float:
    reqs = [PrefillRequest(f"p{i}", prompt(n, i)) for i, n in enumerate(lens)]
    t0 = time.perf_counter()
    if together:
        engine.prefill(reqs)
    else:
        for r in reqs:
            engine.prefill([r])
    seconds = time.perf_counter() - t0
    engine.free([r.request_id for r in reqs])
    return seconds


class DecodeCase:
    """32 sequences prefilled one by one to the given KV lengths, decoded one step per call."""

    def __init__(self, engine: TorchEngine, lens: list[int]):
        self.engine, self.ids = engine, [f"d{i}" for i in range(len(lens))]
        for rid, n in zip(self.ids, lens):
            engine.prefill([PrefillRequest(rid, prompt(n - 1, 7))])
        engine.decode(self.ids)  # warm-up

    def step_seconds(self) -> float:
        return self.engine.decode(self.ids).timing.seconds

    def close(self):
        self.engine.free(self.ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "varlen_paths.json")
    a = p.parse_args(argv)
    rows = []
    load = [os.getloadavg()[0]]
    for dtype in a.dtype:
        engines = {path: TorchEngine(a.model_dir, device="cpu", dtype=dtype, attention=path, max_seq_len=2048,
                                     kv_blocks=1400) for path in ("padded", "varlen")}
        for e in engines.values():  # warm-up (first calls allocate)
            prefill_seconds(e, [64, 512], together=True)
        lens = list(MIXED * 2)
        for together in (True, False):
            times = {path: [] for path in engines}
            for _ in range(a.repeats):
                for path, e in engines.items():
                    times[path].append(prefill_seconds(e, lens, together))
            rows.append({"dtype": dtype, "what": "prefill 8 mixed prompts, " + ("one call" if together else
                                                                                 "one call per prompt"),
                         **{path: statistics.median(t) for path, t in times.items()}})
            print(rows[-1], file=sys.stderr, flush=True)
        for name, kv in (("uniform 64", [64] * 32), ("mixed", [MIXED[i % 4] for i in range(32)])):
            cases = {path: DecodeCase(e, kv) for path, e in engines.items()}
            times = {path: [] for path in engines}
            for _ in range(a.repeats):
                for path, c in cases.items():
                    times[path].append(c.step_seconds())
            for c in cases.values():
                c.close()
            rows.append({"dtype": dtype, "what": f"decode step, 32 sequences, KV {name} (sum {sum(kv)}, "
                         f"32 x longest {32 * max(kv)})", **{path: statistics.median(t) for path, t in times.items()}})
            print(rows[-1], file=sys.stderr, flush=True)
        for e in engines.values():
            e.close()
    load.append(os.getloadavg()[0])
    result = {"command": "python -m bench.varlen_paths " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                         f"torch {torch.__version__}", "load_avg_before_after": [round(x, 2) for x in load],
              "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| dtype | call | padded s | varlen s | padded / varlen |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['what']} | {r['padded']:.3f} | {r['varlen']:.3f} | {r['padded'] / r['varlen']:.2f}x |")
    print(f"\nwritten to {a.out}; load average {load[0]:.2f} -> {load[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

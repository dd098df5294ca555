"""The peer benchmark's workload through the orchestrator in this process: where its time goes.

    python -m bench.peer.inprocess [--engine-dir engines_built/smollm2] [--policy fcfs aligned]
        [--requests 32] [--output-len 128]

The same prompts as `python -m bench.peer` (real text, 64/512/1,500 tokens, seeded; 128 output
tokens, EOS ignored, greedy), all submitted at once to an `Orchestrator` on the engine, stepped
from this thread until every request finishes: no Triton, no HTTP, no client. Prints, per policy,
the output tok/s, the seconds spent in the engine's prefill and decode calls, and the median
decode step of the full batch with its KV tokens. Beside the served figures of `bench.peer` (same
commit, same machine) the difference is what serving and the benchmark client cost on the same
cores: tokenizing, streaming, HTTP, the client's own work (which vLLM's figure carries too).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from bench.peer.prompts import make_prompts
from engines.base import Engine
from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.service import Orchestrator


def run(engine: Engine, prompts: list[list[int]], policy: str, output_len: int) -> dict:
    orch = Orchestrator(engine, ServeConfig(policy=policy, max_queue=max(1024, len(prompts))))
    metrics = orch.loop.metrics
    metrics.history, metrics.timings = collections.deque(), collections.deque()  # keep every record
    t0 = time.perf_counter()
    requests = [orch.submit(p, max_tokens=output_len) for p in prompts]
    while not all(r.finished for r in requests):
        orch.step()
    wall = time.perf_counter() - t0
    calls = list(metrics.timings)
    seconds = collections.Counter()
    for c in calls:
        seconds[c.op] += c.seconds
    full = [c for c in calls if c.op == "decode" and c.num_seqs == len(prompts)]
    return {
        "policy": policy, "wall_s": wall, "output_tok_s": sum(len(r.output_ids) for r in requests) / wall,
        "seconds_by_call": dict(seconds),
        "full_batch_decode_step_ms": statistics.median(c.seconds for c in full) * 1e3 if full else None,
        "full_batch_kv_tokens": statistics.median(c.kv_tokens for c in full) if full else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", type=Path, default=Path("engines_built/smollm2"))
    p.add_argument("--policy", nargs="+", default=["fcfs", "aligned"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512, 1500])
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-gib", type=int, default=2, help="device KV in GiB, as bench.peer gives the server")
    a = p.parse_args(argv)
    tokenizer = Tokenizer.from_file(str(a.engine_dir / "tokenizer.json"))
    prompts = [tokenizer.encode(x.text).ids for x in make_prompts(tokenizer, a.prompt_lengths, a.requests, a.seed)]
    manifest = json.loads((a.engine_dir / "manifest.json").read_text())
    # As bench.peer's server loads it: the manifest's dtype and host pool, kv_gib of device blocks.
    engine = load_engine(a.engine_dir, device="cpu", kv_blocks=a.kv_gib * 2**30 // manifest["bytes_per_block"])
    print(f"{len(prompts)} prompts, {sum(map(len, prompts)):,} tokens; {engine.describe().model.dtype}, "
          f"{torch.get_num_threads()} threads")
    print("| policy | output tok/s | wall s | prefill calls s | decode calls s | full-batch decode step ms (KV tokens) |")
    print("|---|---:|---:|---:|---:|---:|")
    for policy in a.policy:
        r = run(engine, prompts, policy, a.output_len)
        by = r["seconds_by_call"]
        step = f"{r['full_batch_decode_step_ms']:.1f} ({r['full_batch_kv_tokens']:,.0f})" if r["full_batch_decode_step_ms"] else "-"
        print(f"| {policy} | {r['output_tok_s']:.1f} | {r['wall_s']:.2f} | {by.get('prefill', 0):.2f} | "
              f"{by.get('decode', 0) + by.get('mixed', 0):.2f} | {step} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

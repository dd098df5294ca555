"""Triton's own load generator, perf_analyzer, against every model name AlignedServe serves (`make perf-analyzer`).

    python -m bench.perf_analyzer [--engine-dir engines_built/smollm2 | --url 127.0.0.1:8001]
        [--models aligned_llm ensemble tensorrt_llm_bls tensorrt_llm] [--concurrency 1 4]
        [--request-count 32] [--max-tokens 32] [--pa-venv .cache/perf-analyzer] [--out DIR]

perf_analyzer is the binary in the `tritonclient` 2.51 wheel (`make perf-analyzer` installs it in
its own venv with the CUDA runtime library it links against, and Debian's libb64; no GPU is
used). With --engine-dir a tritonserver serving model_repo/ is started on free loopback ports and
stopped at the end; with --url the one there is measured. Each model gets the input its
interface takes, as perf_analyzer's --input-data JSON: text for `aligned_llm`, `ensemble` and
`tensorrt_llm_bls` (decoupled: gRPC streaming), token ids for `tensorrt_llm` (unary calls, as
upstream's non-decoupled deployment). Requests per second and latency percentiles per model and
concurrency, from perf_analyzer's CSV; exit 1 if it failed on any model.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = ("aligned_llm", "ensemble", "tensorrt_llm_bls", "tensorrt_llm")
DECOUPLED = {"aligned_llm", "ensemble", "tensorrt_llm_bls"}
PROMPT = "Triton Inference Server is"
PROMPT_IDS = [5, 17, 23, 42, 7]
PA_VENV = Path(".cache/perf-analyzer")


def input_data(model: str, max_tokens: int) -> dict:
    """perf_analyzer --input-data for one model: the inputs its interface requires."""
    if model == "tensorrt_llm":
        return {"data": [{"input_ids": {"content": PROMPT_IDS, "shape": [len(PROMPT_IDS)]},
                          "input_lengths": [len(PROMPT_IDS)], "request_output_len": [max_tokens]}]}
    return {"data": [{"text_input": [PROMPT], "max_tokens": [max_tokens]}]}


def binary(pa_venv: Path) -> tuple[Path, dict[str, str]]:
    """perf_analyzer and the environment it runs in (libcudart from the nvidia-cuda-runtime wheel)."""
    exe = pa_venv / "bin" / "perf_analyzer"
    if not exe.is_file():
        raise SystemExit(f"no perf_analyzer at {exe}: `make perf-analyzer` installs it")
    libs = sorted(pa_venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*(str(p) for p in libs), env.get("LD_LIBRARY_PATH", "")])
    return exe, env


def measure(exe: Path, env: dict, url: str, model: str, concurrency: int, request_count: int,
            max_tokens: int, workdir: Path, timeout: float = 900) -> dict:
    """perf_analyzer on one model at one concurrency: its CSV row."""
    data, out = workdir / f"{model}.json", workdir / f"{model}-c{concurrency}.csv"
    data.write_text(json.dumps(input_data(model, max_tokens)))
    cmd = [str(exe), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(data),
           "--concurrency-range", str(concurrency), "--request-count", str(request_count), "-f", str(out)]
    if model in DECOUPLED:
        cmd.append("--streaming")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not out.is_file():
        raise RuntimeError(f"perf_analyzer on {model} at concurrency {concurrency} exited {r.returncode}:\n"
                           f"{(r.stdout + r.stderr)[-2000:]}")
    with out.open() as f:
        return next(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--engine-dir", type=Path, help="start a tritonserver serving model_repo/ with this engine")
    where.add_argument("--url", help="a running server's gRPC address, host:port")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4])
    p.add_argument("--request-count", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--pa-venv", type=Path, default=PA_VENV)
    p.add_argument("--out", type=Path, default=None, help="keep perf_analyzer's CSVs and a summary here")
    p.add_argument("--timeout", type=float, default=900, help="seconds one perf_analyzer run may take")
    a = p.parse_args(argv)
    exe, env = binary(a.pa_venv)
    server = None
    if a.engine_dir:
        from serving.triton_server import TritonServer, free_port
        port = free_port(3)
        log = Path(tempfile.mkdtemp(prefix="perf-analyzer-")) / "server.log"
        server = TritonServer(a.engine_dir, port, port + 1, port + 2, log_path=log,
                              env={"ALIGNED_OPENAI_PORT": "0", "ALIGNED_ADMIN_PORT": "0"})
        server.start(timeout=300)  # the first start compiles the CPU kernels
    rows, failed = [], []
    try:
        url = f"127.0.0.1:{server.grpc_port}" if server else a.url
        with tempfile.TemporaryDirectory() as tmp:
            workdir = a.out or Path(tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            for model in a.models:
                for c in a.concurrency:
                    try:
                        rows.append(dict(measure(exe, env, url, model, c, a.request_count, a.max_tokens, workdir,
                                                 a.timeout), model=model))
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        failed.append(f"{model} at {c}")
                        print(e, file=sys.stderr)
    finally:
        if server:
            server.stop()
    lines = [f"| model | concurrency | requests/s | p50 latency (ms) | p99 latency (ms) |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['Concurrency']} | {float(row['Inferences/Second']):.2f} | "
                     f"{float(row['p50 latency']) / 1e3:.0f} | {float(row['p99 latency']) / 1e3:.0f} |")
    print("\n".join(lines))
    if a.out:
        (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    if failed:
        print(f"perf_analyzer failed on: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

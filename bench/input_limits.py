"""What a huge prompt costs everyone else: the delay an 8 MB and a 32 MB prompt (refused: over
max_prompt_bytes) add to a small request sent beside them, through Triton's HTTP generate
endpoint and through the OpenAI API, on a real `tritonserver` (issue 18's target: under 100 ms).

    python -m bench.input_limits --engine-dir engines_built/smollm2 --trials 5

For each size and front end: the small request's latency alone (median of `--trials`), then with
the huge one sent 50 ms before it, and the huge one's own answer (status, time, error text).
Writes a markdown table (stdout) and JSON (--out)."""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import requests

from serving.triton_server import TritonServer, free_port

SIZES_MB = (8, 32)
SMALL = "What is the capital of France?"
MODEL = {"name": ""}
"""The OpenAI API's model name (asked from /v1/models)."""


def small(url: str, openai: bool) -> float:
    t0 = time.perf_counter()
    if openai:
        r = requests.post(f"{url}/v1/completions", json={"model": MODEL["name"], "prompt": SMALL, "max_tokens": 4,
                                                         "temperature": 0}, timeout=300)
    else:
        r = requests.post(f"{url}/v2/models/aligned_llm/generate", json={"text_input": SMALL, "max_tokens": 4},
                          timeout=300)
    r.raise_for_status()
    return time.perf_counter() - t0


def huge(url: str, openai: bool, mb: int, out: dict) -> None:
    text = "hello world " * (mb * 1024 * 1024 // 12)
    t0 = time.perf_counter()
    try:
        if openai:
            r = requests.post(f"{url}/v1/completions", json={"model": MODEL["name"], "prompt": text, "max_tokens": 4},
                              timeout=300)
        else:
            r = requests.post(f"{url}/v2/models/aligned_llm/generate", json={"text_input": text, "max_tokens": 4},
                              timeout=300)
        out.update(status=r.status_code, body=r.text[:200])
    except requests.RequestException as e:
        out.update(status=None, body=f"{type(e).__name__}: {e}"[:200])
    out["seconds"] = time.perf_counter() - t0


def measure(url: str, openai: bool, trials: int) -> dict:
    alone = statistics.median(small(url, openai) for _ in range(trials))
    rows = {"alone_s": alone}
    for mb in SIZES_MB:
        beside, answers = [], []
        for _ in range(trials):
            answer: dict = {}
            t = threading.Thread(target=huge, args=(url, openai, mb, answer))
            t.start()
            time.sleep(0.05)  # the huge body is on its way when the small request arrives
            beside.append(small(url, openai))
            t.join()
            answers.append(answer)
        rows[f"{mb}MB"] = {"beside_s": statistics.median(beside), "delay_ms": 1000 * (statistics.median(beside) - alone),
                           "huge_status": answers[-1]["status"], "huge_seconds": statistics.median(a["seconds"] for a in answers),
                           "huge_answer": answers[-1]["body"]}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-dir", default="engines_built/smollm2")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    port, oai = free_port(3), free_port()
    srv = TritonServer(Path(a.engine_dir), port, port + 1, port + 2, env={"ALIGNED_OPENAI_PORT": str(oai),
                                                                          "ALIGNED_ADMIN_PORT": "0"})
    srv.start(timeout=300)
    try:
        from serving.triton_server import wait_for_http
        wait_for_http(f"http://127.0.0.1:{oai}/v1/models", 60, srv.proc)
        MODEL["name"] = requests.get(f"http://127.0.0.1:{oai}/v1/models", timeout=10).json()["data"][0]["id"]
        results = {"triton": measure(srv.http_url, False, a.trials),
                   "openai": measure(f"http://127.0.0.1:{oai}", True, a.trials)}
    finally:
        srv.stop()
    print("| front end | small request alone | beside 8 MB | beside 32 MB | 8 MB answer | 32 MB answer |")
    print("|---|---|---|---|---|---|")
    for front, r in results.items():
        cells = [f"{1000 * r['alone_s']:.0f} ms"]
        cells += [f"{1000 * r[f'{mb}MB']['beside_s']:.0f} ms (+{r[f'{mb}MB']['delay_ms']:.0f} ms)" for mb in SIZES_MB]
        cells += [f"{r[f'{mb}MB']['huge_status']} in {r[f'{mb}MB']['huge_seconds']:.2f} s" for mb in SIZES_MB]
        print(f"| {front} | " + " | ".join(cells) + " |")
    for front, r in results.items():
        for mb in SIZES_MB:
            print(f"{front} {mb} MB answer: {r[f'{mb}MB']['huge_answer']}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

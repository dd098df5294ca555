"""Send a workload to a running server over Triton's HTTP generate_stream (`make load`).

    python -m bench.load_generator [--url http://127.0.0.1:8000] [--workload azure-code]
        [--requests 200] [--rate 2.0] [--max-prompt-tokens 200] [--concurrency 32] [--seed 0]

For watching the admin dashboard (or Triton's metrics) under real traffic: requests come from
`bench.workloads` (their output lengths; prompts of random bytes as text, cut to
--max-prompt-tokens so they fit the demo engine's window), arrive as a Poisson process at --rate
(or all at once with --rate 0), and stream back through `generate_stream` with end_id 0, as a
client would. At the end it prints completed / failed counts and TTFT / TPOT percentiles
measured by this client. It is a traffic source, not a benchmark: `make bench` and
`make simulate` measure policies.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from tqdm import tqdm

from bench.workloads import arrival_offsets, make_workload

MODEL_NAME = "aligned_llm"


def prompt_text(n_tokens: int, seed: int, index: int) -> str:
    """About n_tokens tokens of the demo byte tokenizer: printable ASCII letters."""
    rng = np.random.default_rng((seed, 99, index))
    return "".join(chr(c) for c in rng.integers(97, 123, size=max(1, n_tokens - 1)))


def send(url: str, text: str, max_tokens: int, scheduled: float, t0: float) -> dict:
    """One streamed request; its client-side timings."""
    delay = t0 + scheduled - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    start = t0 + scheduled
    body = {"text_input": text, "max_tokens": int(max_tokens), "stream": True, "end_id": 0}
    times, reason, error = [], None, None
    try:
        with requests.post(f"{url}/v2/models/{MODEL_NAME}/generate_stream", json=body, stream=True,
                           timeout=600) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    break
                times.append(time.monotonic())
                reason = event.get("finish_reason") or reason
    except requests.RequestException as e:
        error = str(e)
    if error or not times:
        return {"error": error or "no tokens"}
    ttft = times[0] - start
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"ttft": ttft, "tpot": tpot, "tokens": len(times), "reason": reason}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--workload", default="azure-code")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second (0: all at once)")
    p.add_argument("--max-prompt-tokens", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64, help="cap on each request's output length")
    p.add_argument("--concurrency", type=int, default=32, help="most requests in flight from this client")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        requests.get(f"{a.url}/v2/health/ready", timeout=5).raise_for_status()
    except requests.RequestException as e:
        print(f"error: no ready server at {a.url} ({e}); start one with `make serve`", file=sys.stderr)
        return 2
    wl = make_workload(a.workload, a.requests, a.seed)
    offsets = arrival_offsets(a.requests, math.inf if a.rate == 0 else a.rate, a.seed)
    jobs = [(prompt_text(min(r.prompt_len, a.max_prompt_tokens), a.seed, i), min(r.output_len, a.max_tokens), off)
            for i, (r, off) in enumerate(zip(wl.requests, offsets))]
    bar = tqdm(total=len(jobs), desc=f"{a.workload} at {a.rate or 'all at once'}/s", unit="req")
    lock = threading.Lock()
    results = []
    t0 = time.monotonic()

    def one(job):
        out = send(a.url, *job, t0)
        with lock:
            results.append(out)
            bar.update()
        return out

    with ThreadPoolExecutor(a.concurrency) as pool:
        list(pool.map(one, jobs))
    bar.close()
    done = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]

    def pct(values):
        v = [x for x in values if x is not None]
        return " / ".join(f"{1e3 * np.percentile(v, q):.0f}" for q in (50, 90, 99)) if v else "-"

    print(f"completed {len(done)}, failed {len(failed)} in {time.monotonic() - t0:.1f} s; "
          f"TTFT ms p50/p90/p99 {pct(r['ttft'] for r in done)}; TPOT ms {pct(r['tpot'] for r in done)}")
    for r in failed[:5]:
        print(f"  failed: {r['error']}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

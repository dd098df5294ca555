"""Overload behaviour (issue 18): offered vs served vs refused requests, and the latency of the
served, as open-loop load grows past what the server can serve, on a real `tritonserver` with a
small bounded admission queue.

    python -m bench.overload --engine-dir engines_built/smollm2 [--out bench/results/overload] [--quick]

First the server's capacity: a closed loop of `--concurrency` clients for `--capacity-s` seconds
(completed requests/s), measured again at the end (a shared machine drifts). Then Poisson arrivals at 0.5x, 1x, 2x, 4x and 8x that rate for `--step-s`
seconds each. Every request is the same work: one short prompt, `--max-tokens` tokens, end of
sequence ignored (OpenAI `ignore_eos`, Triton `min_tokens` = `max_tokens`); they alternate between
the OpenAI API (/v1/completions, non-streaming) and Triton's HTTP generate endpoint, half each.

A refusal is an OpenAI 429 or 503 with Retry-After, or a Triton HTTP 400 whose error names the
queue; anything else that is not a full answer is an error (there must be none). Per step: offered,
served and refused requests/s, latency p50/p99 of the served, time to refusal p50/p99 (it must be
immediate), and the delta of the server's Prometheus `alignedserve_requests_refused_total`, which
must equal the refusals the clients saw. Writes results.json and report.md under --out."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from serving.lifecycle import process_tree
from serving.triton_server import REPO_ROOT, TritonServer, free_port, wait_for_http

LOADS = (0.5, 1.0, 2.0, 4.0, 8.0)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LOG = REPO_ROOT / ".cache" / "triton" / "overload-server.log"
"""The server's log (tritonserver and aligned_llm), kept out of the results."""
TIMEOUT_S = 120.0
"""Per-request client timeout: generous, so a request that never gets an answer shows as an error."""


@dataclass
class Outcome:
    """One request's end: "served", "refused" or "error" (with why), and its latency from sending."""

    protocol: str
    kind: str
    seconds: float
    ended_at: float
    detail: str = ""


@dataclass
class Target:
    """Where the server answers, and what every request asks for."""

    triton: str
    openai: str
    admin: str
    model: str
    max_tokens: int
    _local: threading.local = field(default_factory=threading.local)
    _sessions: list = field(default_factory=list)

    def session(self) -> requests.Session:
        """This thread's keep-alive connection."""
        if not hasattr(self._local, "s"):
            self._local.s = requests.Session()
            self._sessions.append(self._local.s)
        return self._local.s

    def close(self) -> None:
        """Close every connection: tritonserver's shutdown otherwise waits for idle keep-alive ones."""
        for s in self._sessions:
            s.close()

    def send(self, protocol: str) -> Outcome:
        t0 = time.perf_counter()
        try:
            if protocol == "openai":
                r = self.session().post(f"{self.openai}/v1/completions", timeout=TIMEOUT_S, json={
                    "model": self.model, "prompt": PROMPT, "max_tokens": self.max_tokens, "temperature": 0,
                    "ignore_eos": True})
            else:
                r = self.session().post(f"{self.triton}/v2/models/aligned_llm/generate", timeout=TIMEOUT_S, json={
                    "text_input": PROMPT, "max_tokens": self.max_tokens, "min_tokens": self.max_tokens})
            kind, detail = classify(protocol, r, self.max_tokens)
        except requests.RequestException as e:
            kind, detail = "error", f"{type(e).__name__}: {e}"[:300]
        end = time.perf_counter()
        return Outcome(protocol, kind, end - t0, end, detail)

    def refused_total(self) -> dict[str, float]:
        """The server's `alignedserve_requests_refused_total`, by reason."""
        text = requests.get(f"{self.admin}/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in
                re.finditer(r'^alignedserve_requests_refused_total\{reason="([^"]*)"\} (\S+)$', text, re.M)}


def classify(protocol: str, r: requests.Response, max_tokens: int) -> tuple[str, str]:
    """("served" | "refused" | "error", why) for one answer."""
    if protocol == "openai":
        if r.status_code in (429, 503) and "Retry-After" in r.headers:
            return "refused", ""
        if r.status_code != 200:
            return "error", f"openai HTTP {r.status_code}: {r.text[:200]}"
        got = r.json().get("usage", {}).get("completion_tokens")
    else:
        if r.status_code == 400 and str(_json(r).get("error", "")).startswith("queue"):
            return "refused", ""
        if r.status_code != 200 or "error" in _json(r):
            return "error", f"triton HTTP {r.status_code}: {r.text[:200]}"
        got = len(_json(r).get("output_ids", [])) or None
    if got is not None and got != max_tokens:
        return "error", f"{protocol}: {got} tokens, not {max_tokens}"
    return "served", ""


def _json(r: requests.Response) -> dict:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def capacity(target: Target, concurrency: int, seconds: float) -> dict:
    """Completed requests/s of a closed loop of `concurrency` clients, each sending its next
    request when its last is answered, alternating protocols."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + seconds

    def client(i: int) -> None:
        n = i
        while time.perf_counter() < deadline:
            o = target.send("openai" if n % 2 else "triton")
            n += 1
            with lock:
                outcomes.append(o)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    served = [o for o in outcomes if o.kind == "served"]
    return {"concurrency": concurrency, "seconds": elapsed, "completed": len(served),
            "not_served": len(outcomes) - len(served), "rps": len(served) / elapsed,
            "latency_p50_s": pct([o.seconds for o in served], 50),
            "errors": sorted({o.detail for o in outcomes if o.kind != "served"})[:5]}


def step(target: Target, rate: float, seconds: float, seed: int, server_pid: int) -> dict:
    """Poisson arrivals at `rate` requests/s for `seconds` (open loop: a request is sent at its
    time whatever is still unanswered), then wait for every answer."""
    rng = random.Random(seed)
    before = target.refused_total()
    cpu0 = cpu_seconds([os.getpid()]), cpu_seconds(process_tree(server_pid))
    futures, lag = [], []
    pool = ThreadPoolExecutor(max_workers=max(64, int(rate * 4)))
    t0 = time.perf_counter()
    due, n = t0, 0

    def sent_late(protocol: str, at: float) -> Outcome:
        lag.append(time.perf_counter() - at)
        return target.send(protocol)

    while True:
        due += rng.expovariate(rate)
        if due - t0 >= seconds:
            break
        time.sleep(max(0.0, due - time.perf_counter()))
        futures.append(pool.submit(sent_late, "openai" if n % 2 else "triton", due))
        n += 1
    outcomes: list[Outcome] = [f.result() for f in futures]  # each ends within TIMEOUT_S
    pool.shutdown()
    wall = max(time.perf_counter() - t0, seconds)
    client_cpu, server_cpu = cpu_seconds([os.getpid()]) - cpu0[0], cpu_seconds(process_tree(server_pid)) - cpu0[1]
    after = target.refused_total()
    served = [o for o in outcomes if o.kind == "served"]
    refused = [o for o in outcomes if o.kind == "refused"]
    errors = [o for o in outcomes if o.kind == "error"]
    served_span = max((o.ended_at for o in served), default=t0 + seconds) - t0
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if after.get(k, 0.0) != before.get(k, 0.0)}
    return {
        "offered": len(outcomes), "served": len(served), "refused": len(refused), "errors": len(errors),
        "offered_rps": len(outcomes) / seconds, "served_rps": len(served) / max(served_span, seconds),
        "refused_rps": len(refused) / seconds,
        "served_p50_s": pct([o.seconds for o in served], 50), "served_p99_s": pct([o.seconds for o in served], 99),
        "refusal_p50_s": pct([o.seconds for o in refused], 50), "refusal_p99_s": pct([o.seconds for o in refused], 99),
        "refused_by_protocol": {p: sum(o.protocol == p for o in refused) for p in ("openai", "triton")},
        "prometheus_refused_delta": sum(delta.values()), "prometheus_refused_by_reason": delta,
        "send_lag_p99_s": pct(lag, 99), "client_cpu_cores": client_cpu / wall, "server_cpu_cores": server_cpu / wall,
        "error_samples": sorted({o.detail for o in errors})[:5],
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (a process that ends takes its share with it)."""
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def machine() -> dict:
    model = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model.split(":", 1)[-1].strip(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average": os.getloadavg()}


def report(res: dict) -> str:
    ms = lambda s: "–" if s is None else f"{1000 * s:.0f} ms"  # noqa: E731
    m, cap = res["machine"], res["capacity"]
    lines = [
        "# Overload: offered vs served vs refused", "",
        f"`{res['command']}`", "",
        f"Machine: {m['nproc']} CPUs, {m['cpu']}, load average {m['load_average'][0]:.2f} at start; {m['date']}.",
        f"Engine: `{res['engine_dir']}`. Server: max_queue={res['max_queue']}, "
        f"max_batch_size={res['max_batch_size'] or 'default'}, max_queue_tokens default. Every request: "
        f"{res['max_tokens']} tokens, end of sequence ignored; half over the OpenAI API (/v1/completions), "
        f"half over Triton HTTP generate. Poisson arrivals, {res['step_s']:g} s a step.", "",
        *(["**Quick run** (a test's length: short steps, few requests at the low loads); indicative only.", ""] if res["quick"] else []),
        f"Capacity (closed loop, {cap['concurrency']} clients, {cap['seconds']:.0f} s): "
        f"**{cap['rps']:.2f} req/s** (latency p50 {ms(cap['latency_p50_s'])}); measured again after the steps: "
        f"{res['capacity_after']['rps']:.2f} req/s.", "",
        "| load | offered req/s | served req/s | refused req/s | other errors | served p50 | served p99 "
        "| refusal p50 | refusal p99 | refused (client / Prometheus) | send lag p99 | CPU cores (client / server) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in res["steps"]:
        lines.append(
            f"| {s['load']:g}x | {s['offered_rps']:.2f} | {s['served_rps']:.2f} | {s['refused_rps']:.2f} "
            f"| {s['errors']} | {ms(s['served_p50_s'])} | {ms(s['served_p99_s'])} | {ms(s['refusal_p50_s'])} "
            f"| {ms(s['refusal_p99_s'])} | {s['refused']} / {s['prometheus_refused_delta']:.0f} "
            f"| {ms(s['send_lag_p99_s'])} | {s['client_cpu_cores']:.2f} / {s['server_cpu_cores']:.2f} |")
    lines += ["", "Served req/s: served requests over the time from the step's start to the last served answer "
              "(the backlog in the batch and queue drains after the offered window). Send lag: how late the load "
              "generator sent a request after its Poisson arrival time (large: the client, not the server, "
              "limited the offered load). CPU cores: CPU seconds over the step's wall time, of this benchmark's "
              "process and of the server's process tree; on a machine with few cores the client and the "
              "server's front ends compete with the engine."]
    errs = [e for s in res["steps"] for e in s["error_samples"]]
    if errs:
        lines += ["", "Errors:", *[f"- {e}" for e in errs]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-dir", default="engines_built/smollm2")
    p.add_argument("--out", type=Path, default=Path("bench/results/overload"))
    p.add_argument("--quick", action="store_true", help="a test's run: 2 s warm-up, 4 s capacity, 3 s a step")
    p.add_argument("--max-queue", type=int, default=16, help="the server's ALIGNED_MAX_QUEUE")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="the server's ALIGNED_MAX_BATCH_SIZE (0: its default); equal to --concurrency, the "
                        "capacity loop fills the batch, so its rate is what the server can serve")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens each request generates (default 128)")
    p.add_argument("--warmup-s", type=float, default=None, help="default 10 (--quick: 2)")
    p.add_argument("--capacity-s", type=float, default=None, help="default 20 (--quick: 4)")
    p.add_argument("--step-s", type=float, default=None, help="default 30 (--quick: 3)")
    a = p.parse_args(argv)
    capacity_s = a.capacity_s or (4.0 if a.quick else 20.0)
    step_s = a.step_s or (3.0 if a.quick else 30.0)
    warmup_s = a.warmup_s or (2.0 if a.quick else 10.0)
    a.out.mkdir(parents=True, exist_ok=True)

    port, oai, admin = free_port(3), free_port(), free_port()
    env = {"ALIGNED_OPENAI_PORT": str(oai), "ALIGNED_ADMIN_PORT": str(admin), "ALIGNED_MAX_QUEUE": str(a.max_queue)}
    if a.max_batch_size:
        env["ALIGNED_MAX_BATCH_SIZE"] = str(a.max_batch_size)
    res = {"command": "python -m bench.overload " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "engine_dir": str(a.engine_dir), "max_queue": a.max_queue,
           "max_batch_size": a.max_batch_size, "max_tokens": a.max_tokens, "step_s": step_s, "quick": a.quick}
    srv = TritonServer(Path(a.engine_dir), port, port + 1, port + 2, env=env, log_path=LOG)
    srv.start(timeout=300)
    target = None
    try:
        wait_for_http(f"http://127.0.0.1:{oai}/v1/models", 60, srv.proc)
        wait_for_http(f"http://127.0.0.1:{admin}/metrics", 60, srv.proc)
        model = requests.get(f"http://127.0.0.1:{oai}/v1/models", timeout=10).json()["data"][0]["id"]
        target = Target(srv.http_url, f"http://127.0.0.1:{oai}", f"http://127.0.0.1:{admin}", model, a.max_tokens)
        # Warm up: the engine's first steps at each batch size are slow (measured: 5 s a request at first).
        res["warmup"] = capacity(target, a.concurrency, warmup_s)
        res["capacity"] = cap = capacity(target, a.concurrency, capacity_s)
        print(f"capacity: {cap['rps']:.2f} req/s ({cap['completed']} in {cap['seconds']:.1f} s)", flush=True)
        res["steps"] = []
        for i, load in enumerate(LOADS):
            s = {"load": load, **step(target, load * cap["rps"], step_s, seed=i, server_pid=srv.proc.pid)}
            res["steps"].append(s)
            print(f"{load:g}x: offered {s['offered_rps']:.2f}/s served {s['served_rps']:.2f}/s refused "
                  f"{s['refused_rps']:.2f}/s errors {s['errors']} (Prometheus refused {s['prometheus_refused_delta']:.0f})",
                  flush=True)
        # Measured again: on a shared machine the rate drifts, and served-at-overload is judged against both.
        res["capacity_after"] = after = capacity(target, a.concurrency, capacity_s)
        print(f"capacity after the steps: {after['rps']:.2f} req/s", flush=True)
    finally:
        if target is not None:
            target.close()
        srv.stop()  # drains, then SIGTERM, then SIGKILL of its whole process group
    (a.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "report.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make serve`'s launcher as processes see it: it refuses ports someone else holds (naming the
port), its server dies with it whatever kills it, and SIGTERM drains: a stream in flight gets its
final answer, then every process exits."""
from __future__ import annotations

import contextlib
import http.server
import json
import shlex
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from serving.lifecycle import alive, model_processes, port_owned_by, ports_in_use, process_tree
from serving.triton_server import REPO_ROOT, free_port

pytestmark = pytest.mark.integration


def launch(engine_dir: Path, port: int, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """The launcher as `make serve` runs it; ports: HTTP, gRPC, metrics, admin, OpenAI."""
    return subprocess.Popen([sys.executable, "-m", "serving.triton_server", "--engine-dir", str(engine_dir),
                             "--http-port", str(port), "--admin-port", str(port + 3), "--openai-port", str(port + 4),
                             *extra], cwd=REPO_ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **(env or {})})


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while "is ready" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.3)


@contextlib.contextmanager
def served(engine_dir: Path, tmp_path: Path, *extra: str, env: dict | None = None):
    """The launcher started and ready: yields (proc, HTTP port, log, tree), tree being the
    launcher and its processes (a test may add to it); at the end, what is left of it is killed."""
    port = free_port(5)
    log = tmp_path / "serve.log"
    proc = launch(engine_dir, port, log, *extra, env=env)
    tree = [proc.pid]
    try:
        wait_ready(proc, log)
        tree += process_tree(proc.pid)[1:]
        yield proc, port, log, tree
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tree[1:]:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive (not zombies) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


class _Ready(http.server.BaseHTTPRequestHandler):
    """Another server that answers Triton's readiness probe."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("which", [0, 3])  # the HTTP port, the admin port
def test_a_port_someone_else_holds_is_named_and_nothing_starts(demo_engine_dir, tmp_path, which):
    """The issue's case: another server already on the port answered the readiness probe and
    `make serve` said "ready" and exited 0. Now it exits 1 before starting anything, naming it."""
    port = free_port(5)
    other = http.server.HTTPServer(("127.0.0.1", port + which), _Ready)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        proc = launch(demo_engine_dir, port, tmp_path / "serve.log")
        assert proc.wait(timeout=60) == 1
        out = (tmp_path / "serve.log").read_text()
        name = {0: "HTTP", 3: "admin"}[which]
        assert f"{name} port {port + which} on 127.0.0.1 already in use" in out and "is ready" not in out
        assert "starting tritonserver" not in out
    finally:
        other.shutdown()
        other.server_close()


def test_ports_are_checked_as_a_server_binds_them():
    port = free_port(2)
    assert ports_in_use("127.0.0.1", {"HTTP": port, "off": 0}) == []
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert ports_in_use("127.0.0.1", {"HTTP": port, "gRPC": port + 1}) == [f"HTTP port {port}"]
        assert port_owned_by(port, [os.getpid()]) and not port_owned_by(port, [1])


def test_the_server_dies_with_its_launcher_even_under_sigkill(demo_engine_dir, tmp_path):
    port = free_port(5)
    log = tmp_path / "serve.log"
    proc = launch(demo_engine_dir, port, log)
    try:
        wait_ready(proc, log)
        tree = process_tree(proc.pid)
        assert len(tree) >= 3  # the launcher, tritonserver, the model stubs
        proc.kill()
        proc.wait()
        left = wait_gone(tree[1:], timeout=60)
        assert not left, [open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:120] for p in left if alive(p)]
        assert ports_in_use("127.0.0.1", {"HTTP": port, "OpenAI": port + 4}) == []
    finally:
        for p in process_tree(proc.pid)[1:] if alive(proc.pid) else []:
            os.kill(p, signal.SIGKILL)


@pytest.mark.parametrize("drain", [0, 120])
def test_sigterm_drains_the_streams_in_flight_then_every_process_exits(demo_engine_dir, tmp_path, drain):
    """SIGTERM: no new request is taken; the streams in flight finish within the drain deadline
    (120 s: they need a few seconds, more on a loaded machine; the drain ends when they do) or,
    past it (0 s), end with a final error saying the server is shutting down; never without a
    final answer."""
    n = 16
    with served(demo_engine_dir, tmp_path, "--drain-timeout", str(drain)) as (proc, port, log, tree):
        finals: dict[int, dict] = {}
        started = threading.Barrier(n + 1)

        def stream(i: int) -> None:
            with requests.post(f"http://127.0.0.1:{port}/v2/models/aligned_llm/generate_stream", stream=True,
                               json={"text_input": f"Hello {i}", "max_tokens": 240, "stream": True, "end_id": 0},
                               timeout=60) as r:
                first = True
                for line in r.iter_lines():
                    if line.startswith(b"data: "):
                        event = json.loads(line[6:])
                        if first:
                            started.wait(60)
                            first = False
                        if event.get("finish_reason") or "error" in event:
                            finals[i] = event

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # after SIGTERM: refused (or the port is already closed), never served
            late = requests.post(f"http://127.0.0.1:{port + 4}/v1/completions", timeout=30,
                                 json={"model": "demo", "prompt": "late", "max_tokens": 4})
            assert late.status_code != 200, late.text
        except requests.ConnectionError:
            pass
        for t in threads:
            t.join(60)
        assert len(finals) == n, f"{n - len(finals)} streams never got a final answer"
        reasons = sorted(e.get("finish_reason") or e["error"] for e in finals.values())
        if drain:
            assert set(reasons) == {"length"}
        else:
            assert set(reasons) <= {"length", "the server is shutting down"}
            assert "the server is shutting down" in reasons
        assert proc.wait(timeout=60) == 0
        assert "stopping tritonserver: no new requests" in log.read_text()
        assert not wait_gone(tree[1:], timeout=30)


@pytest.mark.parametrize("restarts", [1, 0])
def test_a_killed_model_process_ends_its_streams_and_the_launcher_restarts_or_exits(
        demo_engine_dir, tmp_path, restarts):
    """The model process SIGKILLed while 24 streams are open. Triton alone would go on saying
    ready and leave those streams open forever (measured with tritonserver 2.51); the launcher
    sees the death, kills the server (which closes every stream: each client's read ends at
    once), then starts it again and serves, or, with --max-restarts 0, exits 1 naming the model."""
    n = 24
    with served(demo_engine_dir, tmp_path, "--max-restarts", str(restarts)) as (proc, port, log, tree):
        model = [pid for pid, name in model_processes(tree).items() if name.startswith("aligned_llm")]
        assert len(model) == 1, model_processes(tree)
        ended: dict[int, float] = {}
        started = threading.Barrier(n + 1)

        def stream(i: int) -> None:
            first = True
            try:
                with requests.post(f"http://127.0.0.1:{port}/v2/models/aligned_llm/generate_stream", stream=True,
                                   json={"text_input": f"Hello {i}", "max_tokens": 240, "stream": True,
                                         "ignore_eos": True}, timeout=60) as r:
                    for line in r.iter_lines():
                        if first and line.startswith(b"data: "):
                            started.wait(60)
                            first = False
            except requests.RequestException:
                pass  # the connection closed under it: the client knows the stream failed
            finally:
                ended[i] = time.monotonic()
                if first:
                    started.wait(60)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        started.wait(60)
        os.kill(model[0], signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(30)
        assert len(ended) == n and max(ended.values()) - killed < 10, "a stream hung after the model died"
        if restarts == 0:
            assert proc.wait(timeout=60) == 1
            text = log.read_text()
            assert f"model process aligned_llm_0_0 (pid {model[0]}) died" in text
            assert "not restarting: 0 restarts already (--max-restarts 0)" in text
        else:
            deadline = time.monotonic() + 180
            while "is ready again (restart 1)" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
            r = requests.post(f"http://127.0.0.1:{port}/v2/models/aligned_llm/generate", timeout=60,
                              json={"text_input": "Hello", "max_tokens": 8})
            assert r.status_code == 200 and r.json()["finish_reason"] in ("length", "stop"), r.text
            tree += process_tree(proc.pid)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=90) == 0
        assert not wait_gone(tree[1:], timeout=30)


def test_overload_is_refused_at_once_and_counted(demo_engine_dir, tmp_path):
    """One request decoding, one waiting (max_queue 1): the rest of a burst are refused at once,
    naming the queue, and Prometheus counts them. (aligned_llm answers them UNAVAILABLE; Triton's
    generate endpoint turns every error of a decoupled model's response into HTTP 400.)"""
    port = free_port(5)
    log = tmp_path / "serve.log"
    proc = launch(demo_engine_dir, port, log, env={"ALIGNED_MAX_QUEUE": "1", "ALIGNED_MAX_BATCH_SIZE": "1"})
    tree: list[int] = []
    try:
        wait_ready(proc, log)
        tree = process_tree(proc.pid)
        answers: list[requests.Response] = []

        def one(i: int) -> None:
            answers.append(requests.post(f"http://127.0.0.1:{port}/v2/models/aligned_llm/generate", timeout=120,
                                         json={"text_input": f"Hello {i}", "max_tokens": 200, "end_id": 0}))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = sorted(r.status_code for r in answers)
        refused = [r for r in answers if r.status_code != 200]
        assert set(codes) <= {200, 400} and refused and codes.count(200) >= 2, codes
        assert all(r.json()["error"].startswith("queue: ") and "max_queue=1" in r.json()["error"] for r in refused)
        metrics = requests.get(f"http://127.0.0.1:{port + 3}/metrics", timeout=10).text
        assert f'alignedserve_requests_refused_total{{reason="queue"}} {float(len(refused))}' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert not wait_gone(tree[1:], timeout=30)


def test_the_launcher_follows_make_when_make_is_killed(demo_engine_dir, tmp_path):
    """`make` runs the launcher as its child; killed (SIGKILL), it leaves the launcher orphaned.
    The launcher's own parent-death signal makes it drain and stop the server: nothing is left."""
    port = free_port(5)
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "serving.triton_server", "--engine-dir", str(demo_engine_dir), "--http-port",
           str(port), "--admin-port", str(port + 3), "--openai-port", str(port + 4), "--drain-timeout", "5"]
    make = subprocess.Popen(["sh", "-c", " ".join(shlex.quote(c) for c in cmd) + f" > {shlex.quote(str(log))} 2>&1; true"],
                            cwd=REPO_ROOT, start_new_session=True)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not log.exists() or "is ready" not in log.read_text():
            assert make.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else ""
            time.sleep(0.3)
        tree = process_tree(make.pid)
        assert len(tree) >= 4  # sh, the launcher, tritonserver, model stubs
        make.kill()
        make.wait()
        assert not wait_gone(tree[1:], timeout=60)
        assert "stopping tritonserver: no new requests" in log.read_text()
    finally:
        for p in tree[1:]:
            if alive(p):
                os.kill(p, signal.SIGKILL)

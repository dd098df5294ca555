"""The server under soak: one this soak starts (`make serve`'s launcher on free ports) or one it
attaches to, and the admin API it reads (state, faults, policy).

A started server lives in its own process group; `stop` sends SIGTERM to the launcher (which
drains and takes tritonserver and the model stubs with it), then kills by pid whatever of that
tree is still alive, so no process is left behind."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from serving.lifecycle import alive, process_tree
from serving.triton_server import REPO_ROOT, free_port

FAULT_ENV = "ALIGNED_FAULT_INJECTION"
"""Set in a started server's environment when faults are asked for: the fault API answers 403 without it."""


@dataclass
class Endpoints:
    """Where the server answers. Triton HTTP, Triton gRPC ("host:port"), OpenAI base, admin base."""

    http: str
    grpc: str
    openai: str
    admin: str
    token: str = ""

    @classmethod
    def on_port(cls, port: int, token: str, host: str = "127.0.0.1") -> "Endpoints":
        """The launcher's layout: HTTP P, gRPC P+1, admin P+3, OpenAI P+4."""
        return cls(f"http://{host}:{port}", f"{host}:{port + 1}", f"http://{host}:{port + 4}/v1",
                   f"http://{host}:{port + 3}", token)


@dataclass
class Launched:
    """A server this soak started: the launcher process and its log."""

    proc: subprocess.Popen
    log: Path
    pids: list[int] = field(default_factory=list)

    def stop(self, timeout: float = 90) -> list[int]:
        """SIGTERM the launcher's process group, wait, then SIGKILL what is left (by pid). Returns
        the pids that had to be killed."""
        self.pids = sorted(set(self.pids) | set(process_tree(self.proc.pid)))
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(p) for p in self.pids):
            time.sleep(0.3)
        killed = [p for p in self.pids if alive(p)]
        for p in killed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        return killed


def launch(engine_dir: Path, log: Path, token: str, faults: bool, policy: str | None = None,
           timeout: float = 600) -> tuple[Launched, Endpoints]:
    """`python -m serving.triton_server` on five free loopback ports, as `make serve` runs it;
    returns once it says it is ready."""
    port = free_port(5)
    env = {**os.environ, "ALIGNED_ADMIN_TOKEN": token}
    if faults:
        env[FAULT_ENV] = "1"
    if policy:
        env["ALIGNED_POLICY"] = policy
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "serving.triton_server", "--engine-dir", str(engine_dir),
                             "--http-port", str(port), "--admin-port", str(port + 3), "--openai-port", str(port + 4)],
                            cwd=REPO_ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    server = Launched(proc, log)
    deadline = time.monotonic() + timeout
    try:
        while "is ready" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready; "
                                   f"its log ({log}) ends:\n{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in {timeout:.0f} s; see {log}")
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise
    server.pids = process_tree(proc.pid)
    return server, Endpoints.on_port(port, token)


class Admin:
    """The admin API: /api/state, /api/config, /api/faults, /api/policy."""

    def __init__(self, ends: Endpoints):
        self.base = ends.admin
        self.headers = {"Authorization": f"Bearer {ends.token}"} if ends.token else {}

    def get(self, path: str) -> requests.Response:
        return requests.get(self.base + path, headers=self.headers, timeout=30)

    def state(self) -> dict:
        r = self.get("/api/state")
        r.raise_for_status()
        return r.json()

    def config(self) -> dict:
        r = self.get("/api/config")
        r.raise_for_status()
        return r.json()

    def faults(self) -> dict | None:
        """GET /api/faults, or None where this server has no fault API."""
        r = self.get("/api/faults")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def arm(self, kind: str, count: int = 1) -> tuple[bool, str]:
        r = requests.post(self.base + "/api/faults", headers=self.headers, json={"kind": kind, "count": count},
                          timeout=30)
        return r.ok, _detail(r)

    def switch_policy(self, policy: str, patience_s: float = 30) -> tuple[bool, str]:
        """POST /api/policy, retried while the server refuses it (409: requests sit in parts the
        new policy does not schedule)."""
        deadline = time.monotonic() + patience_s
        while True:
            r = requests.post(self.base + "/api/policy", headers=self.headers, json={"policy": policy}, timeout=60)
            if r.ok or r.status_code != 409 or time.monotonic() > deadline:
                return r.ok, _detail(r)
            time.sleep(1.0)


def in_flight(state: dict) -> int:
    """Requests the server holds in any part of its pool."""
    return sum(state["counts"].values())


def blocks_held(state: dict) -> dict[str, int]:
    """Per tier, the larger of the blocks the engine holds and the blocks the ledger granted."""
    return {tier: max(b["used"], b["reserved"]) for tier, b in state["kv_blocks"].items()}


def _detail(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    return f"HTTP {r.status_code}: {body.get('detail', json.dumps(body)[:200]) if isinstance(body, dict) else body}"




"""Start and stop the two servers of the peer benchmark, each by its PID, on free loopback ports.

Each runs in a session of its own (its PID is its process group's id), with its output in a
log file. `stop()` sends SIGINT to that PID, as Ctrl-C would (the AlignedServe launcher then
stops tritonserver and its model stubs; vLLM its engine core), waits, and only then signals
the group it started: nothing else on the machine is touched.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serving.triton_server import free_port

GIB = 1 << 30
TCMALLOC = "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
"""Debian's libtcmalloc-minimal4, preloaded as vLLM's CPU docs ask."""


@dataclass
class Server:
    """One server process: how to start it, where it answers, its log."""

    name: str
    """"vllm" or "aligned"."""
    command: list[str]
    env: dict[str, str]
    port: int
    """Its OpenAI API port."""
    log_path: Path
    settings: dict = field(default_factory=dict)
    """What it was started with, recorded beside its results."""
    proc: subprocess.Popen | None = None
    started_s: float = 0.0
    ready_after_s: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> "Server":
        """Start it and wait until GET /v1/models answers; on failure, raise with its log's tail."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        print(f"[peer] starting {self.name}: {' '.join(self.command)}", flush=True)
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = self.started_s + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                                   f"the end of {self.log_path}:\n{self.log_tail()}")
            if self._answers():
                self.ready_after_s = time.monotonic() - self.started_s
                print(f"[peer] {self.name} ready in {self.ready_after_s:.0f} s (pid {self.proc.pid}, "
                      f"{self.base_url})", flush=True)
                return self
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; the end of {self.log_path}:\n"
                           f"{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=2) as r:
                return r.status == 200 and bool(json.load(r).get("data"))
        except OSError:
            return False

    def pids(self) -> list[int]:
        """Its process and every descendant now (for CPU accounting)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return _descendants(self.proc.pid)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGINT to its PID, then SIGTERM and SIGKILL to its own process group if it lingers."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            try:
                if sig == signal.SIGINT:
                    os.kill(p.pid, sig)
                else:
                    os.killpg(p.pid, sig)  # the group this server started in (start_new_session)
            except ProcessLookupError:
                break
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                print(f"[peer] {self.name} (pid {p.pid}) still running after {sig.name}", file=sys.stderr)
        try:  # children left behind in its group (a model stub, an engine core)
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        print(f"[peer] {self.name} stopped (pid {p.pid})", flush=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def vllm_server(venv: Path, engine_dir: Path, model_name: str, port: int, kv_gib: int, threads_bind: str,
                max_seq_len: int, dtype: str, log_path: Path) -> Server:
    """`vllm serve` on the engine directory's weights, at vLLM's documented CPU settings: both
    cores for its OpenMP threads (VLLM_CPU_OMP_THREADS_BIND), the engine's compute dtype `dtype`
    (vLLM's CPU guide recommends bfloat16 where the CPU has it), its KV cache size
    (VLLM_CPU_KVCACHE_SPACE, whole GiB), tcmalloc and Intel's OpenMP preloaded. Prefix caching is
    off: the benchmark sends the same prompts to every run, which a prefix cache would answer
    from memory, and AlignedServe has none."""
    iomp = venv / "lib" / "libiomp5.so"
    preload = [str(p) for p in (Path(TCMALLOC), iomp) if p.exists()]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": threads_bind, "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
           "LD_PRELOAD": ":".join(preload), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [str(venv / "bin" / "vllm"), "serve", str(engine_dir), "--dtype", dtype,
               "--served-model-name", model_name, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(max_seq_len), "--no-enable-prefix-caching"]
    settings = {"VLLM_CPU_OMP_THREADS_BIND": threads_bind, "VLLM_CPU_KVCACHE_SPACE": kv_gib,
                "LD_PRELOAD": env["LD_PRELOAD"], "args": command[2:]}
    return Server("vllm", command, env, port, log_path, settings)


def aligned_server(engine_dir: Path, model_name: str, port: int, kv_blocks: int, policy: str,
                   log_path: Path) -> Server:
    """AlignedServe through `make serve`'s launcher (tritonserver + the OpenAI API), the admin
    dashboard off, with `kv_blocks` device KV blocks (the same bytes as vLLM's KV cache) and
    scheduling policy `policy`; everything else is the launcher's default."""
    http = free_port(3)  # Triton's HTTP, gRPC (+1) and metrics (+2)
    env = {**os.environ, "ALIGNED_POLICY": policy, "ALIGNED_KV_BLOCKS": str(kv_blocks)}
    command = [sys.executable, "-m", "serving.triton_server", "--engine-dir", str(engine_dir),
               "--http-port", str(http), "--openai-port", str(port), "--admin-port", "0",
               "--served-model-name", model_name]
    settings = {"ALIGNED_POLICY": policy, "ALIGNED_KV_BLOCKS": kv_blocks, "args": command[1:]}
    return Server("aligned", command, env, port, log_path, settings)

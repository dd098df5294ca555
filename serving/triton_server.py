"""Start and stop a real `tritonserver` serving this repository's `model_repo/`.

The binary comes from the PyPI package nvidia-pytriton (a CPU-capable tritonserver 2.51 with its
Python backend). Its Python-backend stub lives outside the backends folder, so a backend
directory of our own is assembled with the library, the utils module and the stub for the
Python that will run model.py. On GPU hosts the NGC Triton image serves `model_repo/` the same
way with its own binary (`--tritonserver PATH`).

    python -m serving.triton_server --engine-dir engines_built/smollm2 --http-port 8000

The OpenAI-compatible API (--openai-port, default 8080) and the admin dashboard (--admin-port,
default 8010) run inside the model's process, on the same orchestrator; the launcher passes
their settings as ALIGNED_* variables and says ready once every port answers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from engines.manifest import read_manifest
from serving.lifecycle import (alive, die_with_parent, dies_with_parent, model_processes, port_owned_by, ports_in_use,
                               process_tree)

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPO = REPO_ROOT / "model_repo"
MODEL_NAME = "aligned_llm"
STOP_GRACE_S = 5
"""After a drain, seconds tritonserver gets to exit on SIGTERM before its process group is killed."""
UNLOAD_MARGIN_S = 15
"""Seconds tritonserver waits for the models' unload beyond the drain: ending the requests left,
sending their final answers, stopping the OpenAI and admin servers."""


class TritonNotFound(RuntimeError):
    pass


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as e:
        raise TritonNotFound(
            "the Triton server package is not installed: `pip install -e .[serve]` "
            "(it brings nvidia-pytriton, which carries tritonserver)") from e
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def make_backend_dir(dest: Path) -> Path:
    """Assemble `<dest>/python/` with the Python backend and the stub for this interpreter."""
    root = pytriton_root()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotFound(f"no Triton Python-backend stub for Python {py} at {stub}")
    target = dest / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends/python/libtriton_python.so",
                root / "backends/python/triton_python_backend_utils.py", stub):
        dst = target / src.name
        if not dst.exists():
            shutil.copy2(src, dst)
    return dest


def free_port(count: int = 1) -> int:
    """A loopback port P such that P..P+count-1 were all free just now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        ok = True
        for p in range(base + 1, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free run of loopback ports found")


@dataclass
class TritonServer:
    """One tritonserver process (and its model stubs, in the same process group)."""

    engine_dir: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    model_repo: Path = MODEL_REPO
    workdir: Path = REPO_ROOT / ".cache" / "triton"
    tritonserver: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    drain_s: int = 30
    """On stop, in-flight requests get this long to finish: aligned_llm stops admitting, waits for
    them (ServeConfig.drain_timeout_s), then ends what is left with a final error ("the server is
    shutting down"); tritonserver's --exit-timeout-secs bounds the whole unload (UNLOAD_MARGIN_S more)."""
    proc: subprocess.Popen | None = None
    models: dict[int, str] = field(default_factory=dict)
    """The model processes (Python-backend stubs) once ready: pid -> model instance."""
    drain_file: Path | None = None
    """Created by `stop` to ask aligned_llm to drain (ALIGNEDSERVE_DRAIN_FILE); it answers in `.done`."""
    _ready: bool = False

    def command(self) -> list[str]:
        binary = self.tritonserver or pytriton_root() / "bin" / "tritonserver"
        backends = make_backend_dir(self.workdir / "backends")
        return [
            str(binary), "--model-repository", str(self.model_repo),
            "--backend-directory", str(backends),
            "--http-address", self.host, "--http-port", str(self.http_port),
            "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
            "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
            "--allow-gpu-metrics=false", "--exit-on-error=true", "--log-verbose=0",
            f"--exit-timeout-secs={self.drain_s + UNLOAD_MARGIN_S}",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        root = pytriton_root()
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(root.parent.parent / "nvidia_pytriton.libs")]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in [*libs, env.get("LD_LIBRARY_PATH", "")] if p)
        # The stub runs `python` from PATH semantics of this venv, so model.py sees our packages.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
        env["ALIGNED_ENGINE_DIR"] = str(Path(self.engine_dir).resolve())
        env["ALIGNED_DRAIN_TIMEOUT_S"] = str(self.drain_s)
        if self.drain_file is not None:
            env["ALIGNEDSERVE_DRAIN_FILE"] = str(self.drain_file)
        env.update(self.env)
        return env

    def start(self, timeout: float = 120.0) -> "TritonServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.drain_file = self.workdir / f"drain-{os.getpid()}-{id(self)}"
        for stale in (self.drain_file, self.drain_file.with_suffix(".done")):
            stale.unlink(missing_ok=True)
        out = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen(
            self.command(), env=self.environment(), stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # its own process group, so stop() reaches the model stubs too
            preexec_fn=dies_with_parent(signal.SIGTERM))  # and it drains and exits if its starter dies
        if out:
            out.close()
        self.wait_ready(timeout)
        return self

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {self.proc.returncode} before it was ready"
                    + (f"; see {self.log_path}" if self.log_path else ""))
            if self.ready():
                self.check_owned(self.http_port, "HTTP")
                self.models = model_processes(process_tree(self.proc.pid))
                self._ready = True
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"tritonserver not ready within {timeout:.0f}s")

    def check_owned(self, port: int, name: str) -> None:
        """RuntimeError unless this server's processes listen on `port`: an answer from another
        server on the same port is not this server being ready."""
        if self.proc is not None and not port_owned_by(port, process_tree(self.proc.pid)):
            self.stop()
            raise RuntimeError(f"{name} port {port} on {self.host} answered, but not from this tritonserver: "
                               "another server holds the port")

    def dead_models(self) -> list[str]:
        """The model instances whose process has died since the server got ready ("aligned_llm_0_0
        (pid 123)"). Triton then still says ready and leaves their open streams hanging."""
        return [f"{name} (pid {pid})" for pid, name in self.models.items() if not alive(pid)]

    def kill(self) -> None:
        """SIGKILL every process of the server at once: no drain (a dead model cannot answer its
        streams; closing their connections is what ends them for the clients)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._ready = False

    def stop(self, timeout: float | None = None) -> int | None:
        """Drain (a server that got ready: aligned_llm stops admitting and its requests in flight
        finish or end within drain_s), then SIGTERM tritonserver, which unloads the models (their
        stubs exit with them); SIGKILL the whole process group after `timeout`. Once drained,
        nothing is in flight and the timeout is STOP_GRACE_S: tritonserver would otherwise wait
        its whole exit timeout for idle keep-alive HTTP connections. Undrained (it never got
        ready), the default is its exit timeout + 10 s."""
        if self.proc is None:
            return None
        drained = self.proc.poll() is None and self._ready and self._drain()
        if timeout is None:
            timeout = STOP_GRACE_S if drained else self.drain_s + UNLOAD_MARGIN_S + 10
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # stubs outlive a killed server; the group kill reaches them
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode

    def _drain(self) -> bool:
        """Ask aligned_llm to drain and wait for its answer (drain_s and a margin at most); whether
        it answered. Before tritonserver's SIGTERM: on SIGTERM it first waits for every HTTP
        connection to close while the model still admits, then unloads the models."""
        done = self.drain_file.with_suffix(".done")
        self.drain_file.write_text("drain\n")
        deadline = time.monotonic() + self.drain_s + UNLOAD_MARGIN_S
        while not done.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        answered = done.exists()
        for f in (self.drain_file, done):
            f.unlink(missing_ok=True)
        return answered

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def backend_missing(engine_dir: Path) -> str | None:
    """Why this machine cannot serve the engine's backend (a TensorRT-LLM engine without
    TensorRT-LLM installed), before starting tritonserver; None when it can."""
    from engines.loader import backend_unavailable
    from engines.manifest import ManifestError
    try:
        return backend_unavailable(engine_dir)
    except ManifestError:
        return None  # the model's load reports a broken manifest or an unknown backend with its own message


def admin_line(host: str, port: int) -> str:
    """What `make serve` says about the admin dashboard."""
    if not port:
        return "  admin dashboard: off (--admin-port 0)"
    token = "set" if os.environ.get("ALIGNED_ADMIN_TOKEN") else "not set: operator actions are refused until ALIGNED_ADMIN_TOKEN is"
    return f"  admin dashboard: http://{host}:{port}/   (JSON API /docs, Prometheus /metrics; admin token {token})"


def openai_lines(host: str, port: int, model: str) -> str:
    """What `make serve` says about the OpenAI-compatible API."""
    if not port:
        return "  OpenAI API: off (--openai-port 0)"
    base = f"http://{host}:{port}/v1"
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'
    return (f"  OpenAI API: {base}   (model \"{model}\"; no API key: clients may send any)\n"
            f"  try:  curl {base}/chat/completions -H 'Content-Type: application/json' -d '{body}'")


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until GET `url` answers 200; TimeoutError after `timeout` s, RuntimeError if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve model_repo/ with a real tritonserver.")
    p.add_argument("--engine-dir", default=os.environ.get("ALIGNED_ENGINE_DIR", "engines_built/smollm2"))
    p.add_argument("--host", default="127.0.0.1", help="listen address (default loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=None, help="default: http port + 1")
    p.add_argument("--metrics-port", type=int, default=None, help="default: http port + 2")
    p.add_argument("--tritonserver", type=Path, default=None, help="use this binary instead of nvidia-pytriton's")
    p.add_argument("--admin-port", type=int, default=int(os.environ.get("ALIGNED_ADMIN_PORT", 8010)),
                   help="admin dashboard and API port (default 8010; 0 turns it off)")
    p.add_argument("--openai-port", type=int, default=int(os.environ.get("ALIGNED_OPENAI_PORT", 8080)),
                   help="OpenAI-compatible API port (default 8080, or $ALIGNED_OPENAI_PORT; 0 turns it off)")
    p.add_argument("--served-model-name", default=os.environ.get("ALIGNED_OPENAI_MODEL_NAME", ""),
                   help="the model name OpenAI clients send (default: the engine directory's name)")
    p.add_argument("--drain-timeout", type=int, default=int(float(os.environ.get("ALIGNED_DRAIN_TIMEOUT_S", 30))),
                   help="on SIGTERM, SIGINT or SIGHUP, seconds in-flight requests get to finish before the "
                        "rest end with a final error, \"the server is shutting down\" (default 30)")
    p.add_argument("--max-restarts", type=int, default=int(os.environ.get("ALIGNED_MAX_RESTARTS", 3)),
                   help="when a model process or tritonserver dies, restart the server up to this many times, "
                        "then exit 1 (default 3; 0: exit at the first death)")
    p.add_argument("--transfer-timeout", type=float,
                   default=float(os.environ.get("ALIGNED_TRANSFER_TIMEOUT_S", 10)),
                   help="seconds a KV move may take before its requests fail (default 10)")
    p.add_argument("--fault-injection", action="store_true",
                   default=os.environ.get("ALIGNED_FAULT_INJECTION", "") in ("1", "true", "yes"),
                   help="let POST /api/faults (admin token) make engine calls fail: soak and fault tests only")
    a = p.parse_args(argv)
    die_with_parent(signal.SIGTERM)  # `make` killed, any way: this launcher drains and stops the server
    engine_dir = Path(a.engine_dir)
    if not (engine_dir / "manifest.json").is_file():
        print(f"error: {engine_dir} is not an engine directory (no manifest.json); "
              "run `make build-engine` first", file=sys.stderr)
        return 2
    served_env = {"ALIGNED_ADMIN_PORT": str(a.admin_port), "ALIGNED_ADMIN_HOST": a.host,
                  "ALIGNED_OPENAI_PORT": str(a.openai_port), "ALIGNED_OPENAI_HOST": a.host,
                  "ALIGNED_OPENAI_MODEL_NAME": a.served_model_name,
                  "ALIGNED_TRANSFER_TIMEOUT_S": str(a.transfer_timeout),
                  "ALIGNED_FAULT_INJECTION": "1" if a.fault_injection else "0"}
    model_name = a.served_model_name or engine_dir.resolve().name
    missing = backend_missing(engine_dir)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    server = TritonServer(engine_dir, a.http_port, a.grpc_port or a.http_port + 1,
                          a.metrics_port or a.http_port + 2, host=a.host, tritonserver=a.tritonserver,
                          env=served_env, drain_s=a.drain_timeout)
    busy = ports_in_use(a.host, {"HTTP": server.http_port, "gRPC": server.grpc_port, "metrics": server.metrics_port,
                                 "admin": a.admin_port, "OpenAI": a.openai_port})
    if busy:
        print(f"error: {', '.join(busy)} on {a.host} already in use; stop what holds it, or pick other ports "
              "(HTTP_PORT=... for make serve; --grpc-port, --metrics-port, --admin-port, --openai-port)",
              file=sys.stderr)
        return 1
    print(f"starting tritonserver for {engine_dir} ...", flush=True)
    started = time.monotonic()
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # explicit: a background job ignores SIGINT
        signal.signal(sig, lambda *_: stopping.append(1))
    if not bring_up(server, a):
        return 1
    url = server.http_url
    manifest = read_manifest(engine_dir)
    print(f"""
AlignedServe is ready (model "{MODEL_NAME}", engine {engine_dir}, {manifest.num_params / 1e6:.0f}M parameters, \
{manifest.dtype}; started in {time.monotonic() - started:.0f} s).
  {manifest.kv_summary()}
  HTTP  {url}   gRPC {server.host}:{server.grpc_port}   metrics http://{server.host}:{server.metrics_port}/metrics
  try:  curl -N -X POST {url}/v2/models/{MODEL_NAME}/generate_stream -d '{{"text_input": "Hello", "max_tokens": 16, "stream": true}}'
  TensorRT-LLM's clients: models ensemble, tensorrt_llm_bls (text) and tensorrt_llm (token ids), on the same orchestrator
{openai_lines(a.host, a.openai_port, model_name)}
{admin_line(a.host, a.admin_port)}
Ctrl-C (or SIGTERM) stops the server: requests in flight get {a.drain_timeout} s to finish.""", flush=True)
    restarts = 0
    while True:
        dead: list[str] = []
        while not stopping and server.proc.poll() is None and not dead:
            time.sleep(0.2)
            dead = server.dead_models()
        if stopping:
            break
        # Triton keeps saying "ready" with a dead model and leaves its streams open forever:
        # killing the whole server is what closes them, so every client gets its final error now.
        why = (f"model process {', '.join(dead)} died" if dead
               else f"tritonserver exited with code {server.proc.returncode}")
        server.kill()
        print(f"error: {why}; the server was stopped, and the requests in flight ended with a closed "
              "connection", file=sys.stderr, flush=True)
        if restarts >= a.max_restarts:
            print(f"error: not restarting: {restarts} restarts already (--max-restarts {a.max_restarts})",
                  file=sys.stderr)
            return 1
        restarts += 1
        print(f"restarting the server ({restarts} of at most {a.max_restarts}) ...", flush=True)
        if not bring_up(server, a):
            return 1
        print(f"AlignedServe is ready again (restart {restarts}).", flush=True)
    print(f"stopping tritonserver: no new requests; those in flight get up to {a.drain_timeout} s ...", flush=True)
    server.stop()
    return 0


def bring_up(server: TritonServer, a: argparse.Namespace) -> bool:
    """Start the server and wait until Triton, the OpenAI API and the admin API answer from its
    own processes; on failure say why, stop it and return False."""
    try:
        server.start(timeout=300)
        if a.openai_port:  # started by the model's initialize; say ready only once it answers
            wait_for_http(f"http://{a.host}:{a.openai_port}/v1/models", 60, server.proc)
            server.check_owned(a.openai_port, "OpenAI")
        if a.admin_port:
            wait_for_http(f"http://{a.host}:{a.admin_port}/api/policies", 60, server.proc)
            server.check_owned(a.admin_port, "admin")
    except (RuntimeError, TimeoutError, TritonNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        server.stop()
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())

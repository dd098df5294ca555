"""`make serve-cluster WORKERS=N`: Dynamo's frontend and N AlignedServe workers on one host.

    python -m serving.cluster.launch --workers 2 --router kv

Starts, each as its own process and all on loopback (`--host` to change the frontend's):
- the event plane's ZMQ broker (`event_broker.py`: Dynamo's own publishers would bind 0.0.0.0);
- N workers (`worker.py`), worker i with its dashboard on `admin_port + i` and its own share of
  the CPU cores (affinity and OMP_NUM_THREADS, as each worker would have its own GPU);
- with `--router length`, the length-aware router (`length_router.py`) that the frontend sends
  every request to; with `kv` or `round-robin`, none: Dynamo's frontend routes itself;
- Dynamo's frontend (`python -m dynamo.frontend`): the OpenAI API on `--http-port`.
Discovery is Dynamo's `file` backend in a fresh directory (no etcd, no NATS). Every process dies
with the launcher (prctl's parent-death signal); Ctrl-C, SIGTERM or `make stop-cluster` stop
them all. `Cluster` is the same thing as a context manager, for the tests and benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from engines.manifest import read_manifest
from serving.lifecycle import alive, die_with_parent, dies_with_parent, ports_in_use
from serving.triton_server import free_port

ROUTERS = ("length", "kv", "round-robin")
PID_FILE = Path(".cache/cluster.pid")
"""Where `make serve-cluster` writes the launcher's pid for `make stop-cluster`."""
STOP_GRACE_S = 15.0
"""How long processes get after SIGTERM before SIGKILL."""


def core_shares(workers: int, cpus: list[int]) -> list[list[int]]:
    """Cores for each worker: disjoint, as even as the count allows; shared round-robin when
    there are more workers than cores."""
    if workers <= len(cpus):
        per = len(cpus) // workers
        return [cpus[i * per:(i + 1) * per] for i in range(workers)]
    return [[cpus[i % len(cpus)]] for i in range(workers)]


@dataclass
class Cluster:
    """The frontend, the workers (and the length router) of one host; `start()`, `stop()`."""

    engine_dir: Path
    workers: int = 2
    router: str = "kv"
    """"kv" or "round-robin": Dynamo's own, in its frontend; "length": AlignedServe's length router."""
    host: str = "127.0.0.1"
    http_port: int = 8080
    admin_port: int = 8010
    """Worker i's dashboard on admin_port + i; 0: no dashboards."""
    policy: str = ""
    """The workers' decode policy ("" the default)."""
    log_dir: Path | None = None
    """Each process's log, <name>.log (default: beside the discovery files, kept after stop)."""
    length_weight: float | None = None
    """The length router's --length-weight (None: its default)."""
    devices: tuple[str, ...] = ()
    """Worker i's engine device is devices[i % len] (ALIGNED_DEVICE); none: the config's ("auto")."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every process (ALIGNED_* settings of the workers, DYN_* of Dynamo)."""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _store: Path | None = None
    _logs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router {self.router!r}: expected one of {', '.join(ROUTERS)}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        self.engine_dir = Path(self.engine_dir).resolve()
        self.model_name = self.engine_dir.name
        self.manifest = read_manifest(self.engine_dir)

    @property
    def url(self) -> str:
        """The OpenAI base URL (what a client takes as base_url)."""
        return f"http://{self.host}:{self.http_port}/v1"

    def dashboards(self) -> list[str]:
        if not self.admin_port:
            return []
        return [f"http://127.0.0.1:{self.admin_port + i}/" for i in range(self.workers)]

    def ports(self) -> dict[str, int]:
        ports = {"frontend HTTP": self.http_port}
        if self.admin_port:
            ports.update({f"worker {i} dashboard": self.admin_port + i for i in range(self.workers)})
        return ports

    def environment(self) -> dict[str, str]:
        """Every Dynamo socket on loopback, file discovery in this cluster's own directory."""
        xsub, xpub = self._broker_ports
        return {**os.environ, **self.env,
                "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(self._store), "DYN_REQUEST_PLANE": "tcp",
                "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
                "DYN_EVENT_PLANE": "zmq", "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1",
                "DYN_ZMQ_BROKER_ENABLED": "1",
                "DYN_ZMQ_BROKER_URL": f"xsub=tcp://127.0.0.1:{xsub} , xpub=tcp://127.0.0.1:{xpub}",
                "PYTHONUNBUFFERED": "1"}

    def start(self, timeout: float = 300.0) -> "Cluster":
        busy = ports_in_use(self.host, self.ports())
        if busy:
            raise RuntimeError(f"{', '.join(busy)} already in use; stop what holds it or pick other ports "
                               "(HTTP_PORT=..., ADMIN_PORT=... for make serve-cluster)")
        self._store = Path(tempfile.mkdtemp(prefix="alignedserve-dynamo-"))
        if self.log_dir is None:
            self.log_dir = self._store / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        base = free_port(2)
        self._broker_ports = (base, base + 1)
        env = self.environment()
        py = sys.executable
        try:
            self._spawn("broker", [py, "-m", "serving.cluster.event_broker", f"tcp://127.0.0.1:{base}",
                                   f"tcp://127.0.0.1:{base + 1}"], env)
            pool = "alignedserve-pool" if self.router == "length" else "alignedserve"
            shares = core_shares(self.workers, sorted(os.sched_getaffinity(0)))
            for i in range(self.workers):
                cmd = [py, "-m", "serving.cluster.worker", "--engine-dir", str(self.engine_dir),
                       "--namespace", pool, "--admin-port", str(self.admin_port + i if self.admin_port else 0)]
                if self.policy:
                    cmd += ["--policy", self.policy]
                wenv = {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(len(shares[i])))}
                if self.devices:
                    wenv["ALIGNED_DEVICE"] = self.devices[i % len(self.devices)]
                self._spawn(f"worker-{i}", cmd, wenv, cores=shares[i])
            if self.router == "length":
                cmd = [py, "-m", "serving.cluster.length_router", "--engine-dir", str(self.engine_dir),
                       "--pool-namespace", pool]
                if self.length_weight is not None:
                    cmd += ["--length-weight", str(self.length_weight)]
                self._spawn("router", cmd, env)
            mode = "round-robin" if self.router == "length" else self.router  # length: one router instance
            self._spawn("frontend", [py, "-m", "dynamo.frontend", "--discovery-backend", "file",
                                     "--http-host", self.host, "--http-port", str(self.http_port),
                                     "--namespace", "alignedserve", "--router-mode", mode], env)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cores: list[int] | None = None) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(log)
        pdeath = dies_with_parent(signal.SIGKILL)

        def preexec() -> None:
            pdeath()
            if cores:
                os.sched_setaffinity(0, cores)
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=preexec, cwd=Path(__file__).resolve().parents[2])

    def dead(self) -> list[str]:
        """The processes that exited, with their code."""
        return [f"{n} (exit {p.returncode})" for n, p in self.procs.items() if p.poll() is not None]

    def wait_ready(self, timeout: float) -> None:
        """Until the frontend lists the model and every worker is registered and answers on its
        dashboard; RuntimeError naming a process that exited (and its log), TimeoutError."""
        deadline = time.monotonic() + timeout
        for url in self.dashboards():
            self._wait(lambda u=url: _get(u + "api/policies") is not None, deadline, url)
        self._wait(lambda: self.model_name in self.models(), deadline, f"{self.url}/models")
        self._wait(lambda: self.registered() >= self.workers, deadline, "the workers' registration")

    def _wait(self, check, deadline: float, what: str) -> None:
        while not check():
            if self.dead():
                name = self.dead()[0].split()[0]
                raise RuntimeError(f"{', '.join(self.dead())} before {what} was ready; see "
                                   f"{self.log_dir / (name + '.log')}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready in time; logs in {self.log_dir}")
            time.sleep(0.25)

    def models(self) -> list[str]:
        body = _get(f"{self.url}/models")
        return [m["id"] for m in json.loads(body)["data"]] if body else []

    def registered(self) -> int:
        """Workers registered in discovery (one instance file each under the workers' endpoint)."""
        pool = "alignedserve-pool" if self.router == "length" else "alignedserve"
        root = self._store / "v1" / "instances"
        if not root.is_dir():
            return 0
        return sum(1 for p in root.rglob("*") if p.is_file() and f"{pool}/worker/generate" in _unquote(p, root))

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """SIGTERM every process (the frontend first, then the router, the workers, the broker),
        SIGKILL what is left after `timeout` s; remove the discovery directory."""
        order = ["frontend", "router"] + [n for n in self.procs if n.startswith("worker")] + ["broker"]
        for name in order:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._store is not None and self.log_dir is not None and not self.log_dir.is_relative_to(self._store):
            shutil.rmtree(self._store, ignore_errors=True)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if alive(p.pid)]

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read() if r.status == 200 else None
    except OSError:
        return None


def _unquote(path: Path, root: Path) -> str:
    from urllib.parse import unquote
    return unquote(str(path.relative_to(root)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.cluster.launch",
                                description="Dynamo's frontend and N AlignedServe workers on this host.")
    p.add_argument("--engine-dir", default=os.environ.get("ALIGNED_ENGINE_DIR", "engines_built/smollm2"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--router", default="kv", choices=ROUTERS,
                   help="kv (default), round-robin: Dynamo's own; length: AlignedServe's length-aware router "
                        "(docs/cluster.md says when it pays)")
    p.add_argument("--host", default="127.0.0.1", help="the frontend's listen address (default loopback only)")
    p.add_argument("--http-port", type=int, default=8080, help="the OpenAI API (default 8080)")
    p.add_argument("--admin-port", type=int, default=8010, help="worker i's dashboard on this + i (0: none)")
    p.add_argument("--policy", default="", help="the workers' decode policy (default: adaptive)")
    p.add_argument("--devices", nargs="*", default=[], help="worker i runs on the i-th (e.g. cuda:0 cuda:1)")
    p.add_argument("--log-dir", type=Path, default=Path(".cache/cluster-logs"))
    p.add_argument("--pid-file", type=Path, default=PID_FILE, help="where `make stop-cluster` finds this launcher")
    a = p.parse_args(argv)
    die_with_parent(signal.SIGTERM)
    if not (Path(a.engine_dir) / "manifest.json").is_file():
        print(f"error: {a.engine_dir} is not an engine directory (no manifest.json); run `make build-engine`",
              file=sys.stderr)
        return 2
    cluster = Cluster(Path(a.engine_dir), a.workers, a.router, a.host, a.http_port, a.admin_port, a.policy,
                      a.log_dir, devices=tuple(a.devices))
    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.append(1))
    print(f"starting Dynamo's frontend and {a.workers} AlignedServe workers ({a.router} routing) ...", flush=True)
    started = time.monotonic()
    try:
        cluster.start()
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    a.pid_file.parent.mkdir(parents=True, exist_ok=True)
    a.pid_file.write_text(str(os.getpid()))
    boards = "\n".join(f"  worker {i} dashboard  {u}" for i, u in enumerate(cluster.dashboards()))
    print(f"""
AlignedServe cluster is ready: {a.workers} workers of {cluster.model_name} behind Dynamo's frontend, \
{a.router} routing (started in {time.monotonic() - started:.0f} s).
  OpenAI API  {cluster.url}   (model "{cluster.model_name}")
{boards}
  logs        {cluster.log_dir}
  try:  curl {cluster.url}/chat/completions -H 'Content-Type: application/json' \\
          -d '{{"model": "{cluster.model_name}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'
Ctrl-C, SIGTERM or `make stop-cluster` stops every process.""", flush=True)
    code = 0
    while not stopping:
        if cluster.dead():
            print(f"error: {', '.join(cluster.dead())}; stopping the cluster (logs in {cluster.log_dir})",
                  file=sys.stderr, flush=True)
            code = 1
            break
        time.sleep(0.5)
    print("stopping the cluster ...", flush=True)
    cluster.stop()
    a.pid_file.unlink(missing_ok=True)
    print("stopped.", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The admin app served by uvicorn on a daemon thread of the process that runs the orchestrator
(Triton's model.py, a benchmark, a script)."""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from orchestrator.service import Orchestrator
from serving.admin.app import create_app

log = logging.getLogger("alignedserve.admin")


class AdminServer:
    """`start()` binds host:port (port 0: a free one, then in `.port`) and serves on its own
    thread; `stop()` ends the event streams and the server. Read-only endpoints are open, so keep
    host on loopback unless something in front controls access."""

    def __init__(self, orch: Orchestrator, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.orch = orch
        self.host = host
        self.port = port
        self.app = create_app(orch, token=token)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> "AdminServer":
        if self._thread is not None:
            raise RuntimeError("the admin server is already started")
        # Bind here, not in uvicorn: a busy port fails in the caller with a clear error, and
        # port 0's choice is known before the thread runs.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"admin server: cannot listen on {self.host}:{self.port} ({e}); set admin_port "
                          "(ALIGNED_ADMIN_PORT) to a free port, or 0 to pick one") from e
        sock.listen(128)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                                access_log=False)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name="alignedserve-admin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the admin server stopped while starting; see the log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the admin server did not start within {timeout}s")
            time.sleep(0.01)
        self._sock = sock
        log.info("admin API and dashboard on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the event streams, then the server; returns when its thread has."""
        if self._server is None or self._thread is None:
            return
        self.app.state.stopping.set()
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._sock.close()
        self._server = self._thread = None

    def __enter__(self) -> "AdminServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

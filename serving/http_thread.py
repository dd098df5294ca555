"""An ASGI app served by uvicorn on a daemon thread of the process that runs the orchestrator
(Triton's model.py, a benchmark, a script): how the admin dashboard and the OpenAI API run
beside Triton without a second copy of the model."""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

log = logging.getLogger("alignedserve.http")


class HttpThread:
    """`start()` binds host:port (port 0: a free one, then in `.port`) and serves `app` on its own
    thread; `stop()` ends the server and returns when its thread has.

    name: what error messages call it ("admin server"); port_setting: the setting a user changes
    when the port is taken ("admin_port (ALIGNED_ADMIN_PORT)")."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, name: str, port_setting: str):
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self.port_setting = port_setting
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, timeout: float = 30.0) -> "HttpThread":
        if self._thread is not None:
            raise RuntimeError(f"the {self.name} is already started")
        # Bind here, not in uvicorn: a busy port fails in the caller with a clear error, and
        # port 0's choice is known before the thread runs.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"{self.name}: cannot listen on {self.host}:{self.port} ({e}); set "
                          f"{self.port_setting} to a free port, or 0 to pick one") from e
        sock.listen(128)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                                access_log=False)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name=f"alignedserve-{self.name.replace(' ', '-')}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the {self.name} stopped while starting; see the log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name} did not start within {timeout}s")
            time.sleep(0.01)
        self._sock = sock
        log.info("%s on %s", self.name, self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit (open connections get a few seconds), then force it."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

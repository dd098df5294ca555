"""The admin app served by uvicorn on a daemon thread of the process that runs the orchestrator
(Triton's model.py, a benchmark, a script)."""
from __future__ import annotations

from orchestrator.service import Orchestrator
from serving.admin.app import create_app
from serving.http_thread import HttpThread


class AdminServer(HttpThread):
    """`start()` binds host:port (port 0: a free one, then in `.port`) and serves on its own
    thread; `stop()` ends the event streams and the server. Read-only endpoints are open, so keep
    host on loopback unless something in front controls access."""

    def __init__(self, orch: Orchestrator, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.orch = orch
        super().__init__(create_app(orch, token=token), host, port, name="admin server",
                         port_setting="admin_port (ALIGNED_ADMIN_PORT)")

    def stop(self, timeout: float = 10.0) -> None:
        """End the event streams, then the server; returns when its thread has."""
        if self.running:
            self.app.state.stopping.set()
        super().stop(timeout)

"""The admin dashboard in standalone mode, for benchmarks and simulations (`--dashboard PORT`).

    with watch(orch, port):   # serves http://127.0.0.1:PORT/ for this orchestrator
        ... drive the run loop ...

A benchmark runs one orchestrator after another (a policy, a replica); each is shown on the same
port while it runs, so a browser left open there follows the run (the page reconnects on its
own). Under the sim engine the clock is virtual: the time-series charts count virtual seconds.
Read-only: no token, so operator actions are refused (403).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from orchestrator.service import Orchestrator


@contextlib.contextmanager
def watch(orch: Orchestrator, port: int | None, host: str = "127.0.0.1") -> Iterator[None]:
    """Serve the dashboard for `orch` on host:port while the block runs; nothing when port is
    None or 0."""
    if not port:
        yield
        return
    from serving.admin import AdminServer

    server = AdminServer(orch, host=host, port=port, token=None).start()
    try:
        yield
    finally:
        server.stop()

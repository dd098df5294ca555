"""AdminServer for real: uvicorn on its own thread, listening on 127.0.0.1, spoken to over HTTP with
httpx; the page, the OpenAPI schema, server-sent events, and a clean stop."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.service import Orchestrator
from serving.admin import AdminServer

TOKEN = "server-token"


@pytest.fixture(scope="module")
def engine(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=48, host_kv_blocks=200)
    yield eng
    eng.close()


@pytest.fixture
def served(engine):
    """An orchestrator with its run loop thread, and its admin server on a free port."""
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=3, kmin=2)).start()
    server = AdminServer(orch, host="127.0.0.1", port=0, token=TOKEN).start()
    yield orch, server
    server.stop()
    orch.stop()


def read_events(lines, n: int) -> list[tuple[str, dict]]:
    """The next n events from an SSE response's lines as (event name, data). The caller holds
    the line iterator: once it is dropped, httpx closes the connection."""
    events, name, data = [], None, []
    for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line == "" and data:
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
            if len(events) == n:
                break
    return events


def test_listens_on_a_free_loopback_port_and_serves_the_api(served):
    orch, server = served
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/"
    for i in range(4):
        orch.submit([1] + list(range(40, 50 + 20 * i)), max_tokens=6, end_id=0)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<html" in page.text.lower()
        assert client.get("/static/dashboard.js").status_code == 200
        schema = client.get("/openapi.json").json()
        for path in ("/api/state", "/api/requests", "/api/requests/{request_id}", "/api/timeseries", "/api/gpus",
                     "/api/config", "/api/policies", "/api/events", "/metrics", "/api/drain", "/api/resume",
                     "/api/requests/{request_id}/cancel", "/api/policy"):
            assert path in schema["paths"], path
        assert {"State", "Member", "Point", "Gpus", "Policies", "PolicyChange"} <= set(schema["components"]["schemas"])
        deadline = time.monotonic() + 30
        while client.get("/api/state").json()["totals"]["finished"].get("length", 0) < 4:
            assert time.monotonic() < deadline, "the requests did not finish"
            time.sleep(0.05)
        assert len(client.get("/api/requests").json()["requests"]) == 4
        assert client.post("/api/drain", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert orch.draining


def test_a_busy_port_is_a_clear_error(engine):
    orch = Orchestrator(engine, ServeConfig())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError, match=f"admin server: cannot listen on 127.0.0.1:{taken.getsockname()[1]}"):
            AdminServer(orch, port=taken.getsockname()[1]).start()


def test_server_sent_events_stream_updates(served):
    orch, server = served
    for i in range(6):
        orch.submit([1] + list(range(40, 60 + 10 * i)), max_tokens=40, end_id=0)
    with httpx.stream("GET", server.url + "api/events", timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        events = read_events(lines, 2)
        assert server.app.state.open_streams == 1
    assert [name for name, _ in events] == ["update", "update"]
    for _, data in events:
        assert set(data) == {"state", "requests", "point"}
        assert data["state"]["policy"] == "aligned" and "counts" in data["state"]
        assert data["point"] is None or "decode_tok_s" in data["point"]
        # The table's rows come from the counts' snapshot: its live rows are exactly the counted ones.
        live = [r for r in data["requests"] if r["finish_reason"] is None]
        assert len(data["requests"]) < 50 and len(live) == sum(data["state"]["counts"].values())
    assert events[1][1]["state"]["time"] > events[0][1]["state"]["time"]
    # The client went away: its stream ends on the server too.
    deadline = time.monotonic() + 5
    while server.app.state.open_streams:
        assert time.monotonic() < deadline, "the event stream outlived its client"
        time.sleep(0.02)


def test_stop_ends_open_event_streams_and_the_server(engine):
    orch = Orchestrator(engine, ServeConfig()).start()
    server = AdminServer(orch, port=0).start()
    received, ended = [], threading.Event()

    def listen():
        try:
            with httpx.stream("GET", server.url + "api/events", timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        received.append(line)
        except httpx.HTTPError:
            pass  # the test checks the stream ended; how the socket closed is uvicorn's business
        ended.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    deadline = time.monotonic() + 10
    while not received:
        assert time.monotonic() < deadline, "no event arrived"
        time.sleep(0.02)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    assert ended.wait(5), "the event stream did not end when the server stopped"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "api/state", timeout=2)
    orch.stop()

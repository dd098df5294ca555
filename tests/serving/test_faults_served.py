"""Faults in a served model (`make serve ... --fault-injection`, armed through the admin API):
the streams a fault touches get a final error event naming it, the others finish, the server
serves the next request, Prometheus counts the failures by cause, and no KV block stays held."""
from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import requests

from tests.serving.test_lifecycle import served, wait_gone

pytestmark = pytest.mark.integration

TOKEN = "fault-test-token"


def test_a_decode_fault_in_a_served_model_fails_only_the_streams_in_that_step(demo_engine_dir, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    n = 8
    with served(demo_engine_dir, tmp_path, "--fault-injection", env={"ALIGNED_ADMIN_TOKEN": TOKEN}) as (
            proc, port, log, tree):
        admin = f"http://127.0.0.1:{port + 3}"
        assert requests.get(f"{admin}/api/faults", timeout=10).json()["enabled"] is True
        finals: dict[int, dict] = {}
        # Armed first: on this small model a stream's 200 tokens take less time than arming it
        # over HTTP, so the fault fires in the first decode step of the streams sent next.
        r = requests.post(f"{admin}/api/faults", json={"kind": "decode_error"}, headers=auth, timeout=10)
        assert r.status_code == 200 and r.json()["armed"] == {"decode_error": 1}, r.text

        def stream(i: int) -> None:
            with requests.post(f"http://127.0.0.1:{port}/v2/models/aligned_llm/generate_stream", stream=True,
                               json={"text_input": f"Hello {i}", "max_tokens": 200},
                               timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith(b"data: "):
                        event = json.loads(line[6:])
                        if event.get("finish_reason") or "error" in event:
                            finals[i] = event

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(finals) == n, f"{n - len(finals)} streams never got a final answer"
        errors = [e["error"] for e in finals.values() if "error" in e]
        assert errors and all("injected decode step failure" in e for e in errors), finals
        assert len(errors) < n or n == 1, "every stream failed: more than one step failed"
        assert all(e.get("finish_reason") in ("length", "stop") for e in finals.values() if "error" not in e), finals
        assert requests.get(f"{admin}/api/faults", timeout=10).json()["fired"] == {"decode_error": 1}

        r = requests.post(f"http://127.0.0.1:{port}/v2/models/aligned_llm/generate", timeout=60,
                          json={"text_input": "Hello again", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["finish_reason"] in ("length", "stop"), r.text
        metrics = requests.get(f"{admin}/metrics", timeout=10).text
        assert f'alignedserve_requests_failed_total{{cause="decode"}} {float(len(errors))}' in metrics
        # Triton does not count a decoupled model's error responses as failures (README says so).
        triton = requests.get(f"http://127.0.0.1:{port + 2}/metrics", timeout=10).text
        failures = [line for line in triton.splitlines()
                    if line.startswith("nv_inference_request_failure") and 'model="aligned_llm"' in line]
        assert failures and all(line.endswith(" 0") for line in failures), failures
        deadline = time.monotonic() + 10
        while True:  # the last request's finish reaches the snapshot a moment after its answer
            state = requests.get(f"{admin}/api/state", timeout=10).json()
            if not any(t["used"] for t in state["kv_blocks"].values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert {t: b["used"] for t, b in state["kv_blocks"].items()} == dict.fromkeys(state["kv_blocks"], 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert not wait_gone(tree[1:], timeout=30)

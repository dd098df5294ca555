"""`make serve`'s entry point as a user runs it: a subprocess that builds nothing (the engine is
given), prints the endpoints when ready, answers a streaming request on Triton's HTTP endpoint
and a streaming chat completion on the OpenAI port (one orchestrator behind both), and on Ctrl-C
(SIGINT) stops the server and every model stub."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
import requests

from serving.lifecycle import process_tree
from serving.triton_server import REPO_ROOT, free_port

pytestmark = pytest.mark.integration


def test_serve_prints_endpoints_streams_and_stops_on_ctrl_c(demo_engine_dir, tmp_path):
    port = free_port(5)
    admin, oai = port + 3, port + 4  # the free run: HTTP, gRPC, metrics, admin, OpenAI
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "serving.triton_server", "--engine-dir", str(demo_engine_dir),
                             "--http-port", str(port), "--admin-port", str(admin), "--openai-port", str(oai)],
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "is ready" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "server not ready in 120 s"
            time.sleep(0.3)
        banner = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{port}" in banner and f"127.0.0.1:{port + 1}" in banner
        assert "curl -N -X POST" in banner
        r = requests.post(f"http://127.0.0.1:{port}/v2/models/aligned_llm/generate_stream",
                          json={"text_input": "Hello", "max_tokens": 5, "stream": True, "end_id": 0}, timeout=30)
        events = [json.loads(l[6:]) for l in r.text.splitlines() if l.startswith("data: ")]
        assert len(events) == 5 and events[-1]["finish_reason"] == "length"
        # The OpenAI API answers on its port, from the same orchestrator, as the banner says.
        base = f"http://127.0.0.1:{oai}/v1"
        assert f"OpenAI API: {base}" in banner and f"curl {base}/chat/completions" in banner
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)
        chunks = list(client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        client.close()
        # The admin dashboard runs in the model's process, on its own port, with live state
        # while the load generator sends traffic.
        assert f"admin dashboard: http://127.0.0.1:{admin}/" in banner
        assert "dashboard.js" in requests.get(f"http://127.0.0.1:{admin}/", timeout=10).text
        load = subprocess.run([sys.executable, "-m", "bench.load_generator", "--url", f"http://127.0.0.1:{port}",
                               "--requests", "12", "--rate", "0", "--max-prompt-tokens", "60", "--max-tokens", "12"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert load.returncode == 0 and "completed 12, failed 0" in load.stdout, load.stdout + load.stderr
        state = requests.get(f"http://127.0.0.1:{admin}/api/state", timeout=10).json()
        assert state["policy"] == "adaptive" and state["totals"]["tokens"] >= 5 + 12
        assert len(requests.get(f"http://127.0.0.1:{admin}/api/requests", timeout=10).json()["requests"]) >= 14
        assert requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code == 200
        server_pids = process_tree(proc.pid)[1:]
        assert len(server_pids) >= 2  # tritonserver and the model's stub
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    assert rc == 0
    time.sleep(0.5)
    left = [p for p in server_pids if os.path.exists(f"/proc/{p}")
            and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert left == [], f"processes still running after Ctrl-C: {left}"

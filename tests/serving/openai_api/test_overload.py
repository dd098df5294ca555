"""Overload: a full admission queue (requests, or prompt tokens) refuses at once instead of
queuing without bound; the OpenAI API answers 429 with Retry-After; every refusal is counted by
reason, in the snapshot's totals and in Prometheus."""
from __future__ import annotations

import pytest
import requests
from fastapi.testclient import TestClient

from orchestrator.config import ServeConfig
from orchestrator.core import RequestRejected
from orchestrator.service import Orchestrator
from serving.admin.app import create_app
from serving.openai_api import OpenAIServer
from serving.tokenizer import load_tokenizer


def test_a_full_queue_is_refused_at_once_with_429_and_retry_after(engine, demo_engine_dir):
    orch = Orchestrator(engine, ServeConfig(max_queue=2))  # its loop never runs: nothing leaves the queue
    with OpenAIServer(orch, load_tokenizer(demo_engine_dir), demo_engine_dir, port=0) as server:
        for _ in range(2):
            orch.submit([1, 2, 3], max_tokens=4)
        body = {"model": server.model_name, "prompt": "Hello", "max_tokens": 4}
        r = requests.post(f"{server.base_url}/completions", json=body, timeout=10)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert "max_queue=2" in r.json()["error"]["message"] and r.json()["error"]["code"] == "queue_full"
        bad = requests.post(f"{server.base_url}/completions", json={**body, "max_tokens": -1}, timeout=10)
        assert bad.status_code == 400 and "Retry-After" not in bad.headers
        refused = orch.snapshot().totals["refused"]
        assert refused["queue"] == 1 and refused["max_tokens"] == 1
        with TestClient(create_app(orch, token=None)) as admin:
            text = admin.get("/metrics").text
        assert 'alignedserve_requests_refused_total{reason="queue"} 1.0' in text


def test_the_queue_is_bounded_in_prompt_tokens_too(engine):
    orch = Orchestrator(engine, ServeConfig(max_queue_tokens=10))
    orch.submit([1] * 6, max_tokens=2)
    with pytest.raises(RequestRejected) as e:
        orch.submit([1] * 6, max_tokens=2)
    assert e.value.field == "queue" and "12 prompt tokens would be waiting" in e.value.message
    assert "max_queue_tokens=10" in e.value.message
    orch.submit([1] * 4, max_tokens=2)  # exactly at the bound
    default = Orchestrator(engine, ServeConfig())
    info = engine.describe()
    assert default.loop.max_queue_tokens == 4 * info.tier_blocks(info.decode_device) * info.block_size

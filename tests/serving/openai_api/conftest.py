"""Shared by the OpenAI API tests: the demo engine under a running orchestrator, served by an
OpenAIServer on a free loopback port (real HTTP), and the official `openai` client for it."""
from __future__ import annotations

import threading
import time

import openai
import pytest

from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.service import Orchestrator
from serving.openai_api import OpenAIServer
from serving.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def engine(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=48, host_kv_blocks=200)
    yield eng
    eng.close()


@pytest.fixture
def served(engine, demo_engine_dir):
    """An orchestrator with its run loop thread, and its OpenAI API on a free port."""
    orch = Orchestrator(engine, ServeConfig(max_batch_size=4, kmin=2)).start()
    server = OpenAIServer(orch, load_tokenizer(demo_engine_dir), demo_engine_dir, port=0).start()
    yield orch, server
    server.stop()
    orch.stop()


@pytest.fixture
def slow_served(engine, demo_engine_dir):
    """An orchestrator whose loop a test thread steps every 10 ms instead of its own loop thread
    (~100 tokens/s): a 150-token request cannot finish before the client leaves."""
    orch = Orchestrator(engine, ServeConfig(max_batch_size=4, kmin=2))
    stop = threading.Event()

    def step():
        while not stop.is_set():
            orch.step()
            time.sleep(0.01)

    stepper = threading.Thread(target=step, daemon=True)
    stepper.start()
    with OpenAIServer(orch, load_tokenizer(demo_engine_dir), demo_engine_dir, port=0) as server:
        yield orch, server
    stop.set()
    stepper.join()


@pytest.fixture
def client(served):
    _, server = served
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def _wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _kv_idle(orch: Orchestrator) -> bool:
    """No request is live and no KV block is held or booked in any tier."""
    snap = orch.snapshot()
    return not snap.live and all(t.used == 0 and t.reserved == 0 for t in snap.kv.values())


@pytest.fixture(scope="session")
def wait_for():
    """The polling helper (fixtures, so test modules share helpers without a package import)."""
    return _wait_for


@pytest.fixture(scope="session")
def kv_idle():
    return _kv_idle

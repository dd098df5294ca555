"""Shared by the admin tests: polling for a condition with a deadline instead of sleeping."""
from __future__ import annotations

import time

import pytest


def _wait_for(predicate, timeout: float = 20.0, what: str = "condition", every: float = 0.02):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def wait_for():
    """The polling helper (a fixture, so test modules share it without a package import)."""
    return _wait_for

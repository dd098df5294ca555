"""Shared fixtures: the demo engine directory is built once per test session, for real."""
from __future__ import annotations

from pathlib import Path

import pytest

from build_scripts.build_engine import main as build_engine


@pytest.fixture(scope="session")
def demo_engine_dir(tmp_path_factory) -> Path:
    """A demo engine built by the same code path as `make build-engine` (max_seq_len 256 and a
    50 MiB KV budget keep the tests quick and small)."""
    out = tmp_path_factory.mktemp("engines") / "demo"
    rc = build_engine(["--out", str(out), "--max-seq-len", "256", "--kv-memory-gb", "0.05"])
    assert rc in (0, None), f"demo engine build failed with exit code {rc}"
    assert (out / "manifest.json").is_file()
    return out

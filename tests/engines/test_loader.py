"""The loader's backend registry: the manifest's backend picks how an engine directory is opened,
and the same registry says, before anything starts, why this machine could not open it."""
from __future__ import annotations

import json
import shutil

import pytest

from engines.loader import BACKENDS, backend_of, backend_unavailable, load_engine
from engines.manifest import ManifestError


def test_every_backend_is_registered_once():
    assert list(BACKENDS) == ["torch", "tensorrt_llm"]
    assert all(name == b.name for name, b in BACKENDS.items())


def test_the_torch_backend_is_always_available(demo_engine_dir):
    assert backend_of(demo_engine_dir).name == "torch"
    assert backend_unavailable(demo_engine_dir) is None


def test_an_unknown_backend_is_one_clear_error_from_both_calls(demo_engine_dir, tmp_path):
    engine_dir = shutil.copytree(demo_engine_dir, tmp_path / "eng")
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    (engine_dir / "manifest.json").write_text(json.dumps({**manifest, "backend": "vllm"}))
    message = r"backend 'vllm' is not available; known backends: torch, tensorrt_llm"
    with pytest.raises(ManifestError, match=message):
        load_engine(engine_dir)
    with pytest.raises(ManifestError, match=message):
        backend_unavailable(engine_dir)

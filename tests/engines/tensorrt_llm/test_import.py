"""The lazy import: a clear error without TensorRT-LLM, and the flavour picked from the version."""
from __future__ import annotations

import sys

import pytest

from engines.tensorrt_llm import lazy_import
from engines.tensorrt_llm.lazy_import import TensorRTLLMUnavailable
from engines.tensorrt_llm.api_surface import ENGINE, LLM_API


@pytest.mark.parametrize("version, flavour", [("1.0.0", ENGINE), ("1.2.1", ENGINE), ("1.3.0rc20", LLM_API),
                                              ("1.4.0", LLM_API), ("2.0.0", LLM_API)])
def test_build_flavour_follows_the_version(version, flavour):
    assert lazy_import.build_flavour(version) == flavour


@pytest.mark.parametrize("version", ["0.21.0", "nonsense"])
def test_old_or_unreadable_versions_are_refused(version):
    with pytest.raises(TensorRTLLMUnavailable, match="pypi.nvidia.com"):
        lazy_import.build_flavour(version)


def test_missing_package_names_what_and_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(TensorRTLLMUnavailable) as e:
        lazy_import.module("tensorrt_llm.llmapi", "serving /x")
    msg = str(e.value)
    assert msg.startswith("serving /x needs TensorRT-LLM") and "not installed" in msg
    assert "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com" in msg
    assert "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3" in msg


def test_installed_but_broken_import_says_why(monkeypatch):
    def fail(name, *a, **k):
        raise ImportError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(lazy_import.importlib, "import_module", fail)
    with pytest.raises(TensorRTLLMUnavailable, match="libcuda.so.1.*NVIDIA driver"):
        lazy_import.module("tensorrt_llm")


def test_imported_reads_the_version_from_the_package(trtllm):
    module, version = lazy_import.imported()
    assert module is sys.modules["tensorrt_llm"] and version == trtllm.VERSION

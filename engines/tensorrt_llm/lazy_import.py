"""The one door to TensorRT-LLM: imports it lazily, says clearly when it is missing, picks the flavour.

No module of this project imports `tensorrt_llm` at import time; every use goes through
`module()` here, so the orchestrator, `model_repo/` and the tests import without it, and a
machine without it gets one error that says what is missing and how to get it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import re
from types import ModuleType

from engines.base import EngineError
from engines.tensorrt_llm.api_surface import DISTRIBUTION, ENGINE, LLM_API

INSTALL_HINT = (
    "install it from NVIDIA's package index on a host with an NVIDIA driver "
    "(`pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com`; the PyPI sdist alone "
    "only redirects there), or run inside the NGC Triton TensorRT-LLM image "
    "`nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3` (docs/tensorrt-llm.md)"
)
MIN_VERSION = (1, 0)
"""Oldest release with the LLM API on the PyTorch backend and the KV Cache Connector."""
LAST_ENGINE_MINOR = (1, 2)
"""Newest minor release whose build path is `trtllm-build` (main removed TensorRT engines in 2026)."""


class TensorRTLLMUnavailable(EngineError):
    """TensorRT-LLM is not installed (or cannot be imported, or is too old) where it is needed."""


def installed_version() -> str | None:
    """The installed tensorrt-llm version, read from package metadata without importing it."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a version string like "1.2.1" or "1.3.0rc20"."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise TensorRTLLMUnavailable(f"cannot read the tensorrt-llm version {version!r}; {INSTALL_HINT}")
    return int(m.group(1)), int(m.group(2))


def build_flavour(version: str) -> str:
    """How `make build-engine BACKEND=trtllm` builds with this version: ENGINE (checkpoint
    conversion + trtllm-build) up to 1.2.x, LLM_API (checkpoint + LLM() settings file) after."""
    v = parse_version(version)
    if v < MIN_VERSION:
        raise TensorRTLLMUnavailable(
            f"tensorrt-llm {version} is older than {'.'.join(map(str, MIN_VERSION))}, which this adapter "
            f"needs (LLM API on the PyTorch backend); {INSTALL_HINT}")
    return ENGINE if v <= LAST_ENGINE_MINOR else LLM_API


def imported(what: str = "the TensorRT-LLM backend") -> tuple[ModuleType, str]:
    """Import `tensorrt_llm`; return it and its version, refusing versions older than MIN_VERSION."""
    trtllm = module("tensorrt_llm", what)
    version = str(getattr(trtllm, "__version__", None) or installed_version() or "")
    build_flavour(version)  # refuses versions that are too old, or unreadable
    return trtllm, version


def module(name: str = "tensorrt_llm", what: str = "the TensorRT-LLM backend") -> ModuleType:
    """Import a TensorRT-LLM module now, or raise TensorRTLLMUnavailable saying what and how.

    Import errors past the package itself (a missing `libcuda.so.1` when no driver is installed,
    a CUDA mismatch) are reported with the original message, since reinstalling would not help."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (e.name == "tensorrt_llm" or name.startswith(e.name + ".")
                                   or e.name.startswith("tensorrt_llm")):
            raise TensorRTLLMUnavailable(f"{what} needs TensorRT-LLM (module `{name}`), which is not installed; "
                                         f"{INSTALL_HINT}") from e
        raise TensorRTLLMUnavailable(f"{what}: importing `{name}` failed: {e}") from e
    except (ImportError, OSError) as e:
        raise TensorRTLLMUnavailable(
            f"{what}: TensorRT-LLM is installed but `{name}` failed to import ({e}); it needs an NVIDIA driver "
            f"(libcuda.so.1) and the CUDA version it was built for; {INSTALL_HINT}") from e


def llmapi(what: str = "the TensorRT-LLM backend") -> ModuleType:
    """`tensorrt_llm.llmapi`: LLM, SamplingParams, KvCacheConfig, ... (see api_surface)."""
    return module("tensorrt_llm.llmapi", what)

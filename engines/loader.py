"""Open an engine directory with the backend its manifest names (imported lazily).

Each backend is registered once in `BACKENDS`: how an engine directory of it is opened, and why
this machine could not open one (a library that is not installed). `load_engine` opens;
`backend_unavailable` answers the second question before anything is started (`make serve`
asks it before launching tritonserver), without the caller importing any engine's module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from engines.base import Engine
from engines.manifest import Manifest, ManifestError, read_manifest


def _open_torch(engine_dir: str | Path, manifest: Manifest, **options) -> Engine:
    from engines.torch.engine import TorchEngine

    return TorchEngine.from_engine_dir(engine_dir, manifest, **options)


def _open_tensorrt_llm(engine_dir: str | Path, manifest: Manifest, **options) -> Engine:
    from engines.tensorrt_llm.engine import TrtllmEngine  # imports TensorRT-LLM only now; a clear error without it

    return TrtllmEngine.from_engine_dir(engine_dir, manifest, **options)


def _tensorrt_llm_missing(engine_dir: Path) -> str | None:
    from engines.tensorrt_llm.lazy_import import TensorRTLLMUnavailable, imported

    try:
        imported(f"serving the TensorRT-LLM engine {engine_dir}")
    except TensorRTLLMUnavailable as e:
        return str(e)  # what is missing, and how to install it
    return None


@dataclass(frozen=True)
class Backend:
    """An engine backend as the loader knows it."""

    name: str
    """The manifest's `backend`."""
    open: Callable[..., Engine]
    """(engine_dir, manifest, device=, dtype=, kv_blocks=, host_kv_blocks=, helper_devices=) -> the
    engine; the backend's modules are imported only when it is called."""
    missing: Callable[[Path], str | None] = lambda engine_dir: None
    """Why this machine cannot open an engine directory of this backend (what to install), or None."""


BACKENDS = {b.name: b for b in (
    Backend("torch", _open_torch),  # torch is a dependency of the project: always there
    Backend("tensorrt_llm", _open_tensorrt_llm, _tensorrt_llm_missing),
)}


def backend_of(engine_dir: str | Path, manifest: Manifest | None = None) -> Backend:
    """The registered backend `engine_dir`'s manifest names; ManifestError if the manifest is
    broken or names a backend this project does not have."""
    if manifest is None:
        manifest = read_manifest(engine_dir)
    backend = BACKENDS.get(manifest.backend)
    if backend is None:
        raise ManifestError(
            f"{Path(engine_dir) / 'manifest.json'}: backend {manifest.backend!r} is not available; "
            f"known backends: {', '.join(BACKENDS)}"
        )
    return backend


def backend_unavailable(engine_dir: str | Path) -> str | None:
    """Why this machine cannot serve `engine_dir`'s backend (e.g. a TensorRT-LLM engine without
    TensorRT-LLM installed: the message says how to get it); None when it can. ManifestError as
    in `backend_of`."""
    return backend_of(engine_dir).missing(Path(engine_dir))


def load_engine(
    engine_dir: str | Path,
    device: str = "auto",
    dtype: str | None = None,
    kv_blocks: int | None = None,
    host_kv_blocks: int | None = None,
    helper_devices: Sequence[str] = (),
) -> Engine:
    """Build the engine for `engine_dir`.

    device: "auto" (first CUDA GPU if present, else CPU), "cpu" or "cuda:N".
    dtype: override the manifest's dtype ("float32" / "bfloat16").
    kv_blocks: override the manifest's KV blocks per device.
    host_kv_blocks: override the manifest's host KV pool (0: none, no offload).
    helper_devices: further devices that prefill and hold KV beside the decode device, e.g.
        ("cuda:1",) (peer copies; each gets a pool of kv_blocks); none by default.
    """
    manifest = read_manifest(engine_dir)
    return backend_of(engine_dir, manifest).open(engine_dir, manifest, device=device, dtype=dtype, kv_blocks=kv_blocks,
                                                 host_kv_blocks=host_kv_blocks, helper_devices=helper_devices)

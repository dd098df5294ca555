"""Open an engine directory with the backend its manifest names (imported lazily)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from engines.base import Engine
from engines.manifest import ManifestError, read_manifest

BACKENDS = ("torch", "tensorrt_llm")


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
    if manifest.backend == "torch":
        from engines.torch.engine import TorchEngine

        return TorchEngine.from_engine_dir(engine_dir, manifest, device=device, dtype=dtype, kv_blocks=kv_blocks,
                                           host_kv_blocks=host_kv_blocks, helper_devices=helper_devices)
    if manifest.backend == "tensorrt_llm":  # imports TensorRT-LLM only now; a clear error without it
        from engines.tensorrt_llm.engine import TrtllmEngine

        return TrtllmEngine.from_engine_dir(engine_dir, manifest, device=device, dtype=dtype, kv_blocks=kv_blocks,
                                            host_kv_blocks=host_kv_blocks, helper_devices=helper_devices)
    raise ManifestError(
        f"{Path(engine_dir) / 'manifest.json'}: backend {manifest.backend!r} is not available; "
        f"known backends: {', '.join(BACKENDS)}"
    )

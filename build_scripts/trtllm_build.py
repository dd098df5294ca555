"""`make build-engine BACKEND=trtllm`: an engine directory TensorRT-LLM serves, with the usual manifest.

Layout: everything the torch backend writes (config.json, safetensors weights, tokenizer.json...,
so the orchestrator and `model_repo/` read it unchanged), plus
- `llm_settings.json`: the `LLM()` settings (`llm_settings.TrtllmSettings`), also in the
  manifest's `extra`;
- on 1.2.x (flavour "engine", served by the C++ Executor), `engine/`: the TensorRT engine from
  checkpoint conversion
  (`MODEL_MAP[architecture].from_hugging_face(...).save_checkpoint(...)`, what
  examples/.../convert_checkpoint.py does) and `trtllm-build` with paged KV, max batch size, max
  sequence length and tokens per block. Later versions serve the checkpoint directly.
The manifest's backend is "tensorrt_llm", so `engines.loader` opens it with `TrtllmEngine`.

TensorRT-LLM is checked first: without it the build raises BuildError before writing anything (the
command exits with status 2). TensorRT-LLM is reached only through `engines.tensorrt_llm.lazy_import`.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from pathlib import Path

from build_scripts.checkpoint import BuildError, inspect_checkpoint
from build_scripts.staging import check_replaceable, staged_dir
from build_scripts.torch_build import build_engine
from engines.manifest import MANIFEST_NAME, Manifest, read_manifest
from engines.tensorrt_llm import lazy_import
from engines.tensorrt_llm.api_surface import ENGINE
from engines.tensorrt_llm.llm_settings import DEFAULT_MAX_NUM_TOKENS, TrtllmSettings

BACKEND = "tensorrt_llm"
DEFAULT_MAX_BATCH_SIZE = 64
TRTLLM_BUILD = "trtllm-build"
_BUILD_TIMEOUT_S = 3 * 3600


def build_trtllm_engine(model_dir: str | Path, out: str | Path, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                        cache_transceiver: str | None = None, force: bool = False, **options) -> Manifest:
    """Check TensorRT-LLM, then build like the torch backend and add what TensorRT-LLM needs.

    options: those of `build_scripts.torch_build.build_engine` (dtype, max_seq_len, block_size,
    kv_memory_gb, host_kv_memory_gb, source, progress)."""
    out = Path(out)
    check_replaceable(out, force)
    if max_batch_size <= 0:
        raise BuildError(f"--max-batch-size must be > 0, got {max_batch_size}")
    try:
        _trtllm, version = lazy_import.imported("make build-engine BACKEND=trtllm")
        flavour = lazy_import.build_flavour(version)
        if flavour == ENGINE and shutil.which(TRTLLM_BUILD) is None:
            raise lazy_import.TensorRTLLMUnavailable(
                f"tensorrt-llm {version} is installed but `{TRTLLM_BUILD}` is not on PATH; {lazy_import.INSTALL_HINT}")
    except lazy_import.TensorRTLLMUnavailable as e:
        raise BuildError(str(e)) from None
    ckpt = inspect_checkpoint(model_dir)
    with staged_dir(out, force=force) as tmp:
        hf = tmp / ".checkpoint"
        base = build_engine(model_dir, hf, **options)
        for f in hf.iterdir():
            f.rename(tmp / f.name)
        hf.rmdir()
        (tmp / MANIFEST_NAME).unlink()
        c = ckpt.config
        settings = TrtllmSettings(
            max_batch_size=max_batch_size, max_seq_len=base.max_seq_len, tokens_per_block=base.kv_block_size,
            flavour=flavour, dtype=base.dtype, kv_max_tokens=base.kv_blocks_device * base.kv_block_size,
            host_pool_blocks=0 if flavour == ENGINE else base.kv_blocks_host,
            host_cache_bytes=base.kv_blocks_host * base.bytes_per_block if flavour == ENGINE else 0,
            cache_transceiver_backend=cache_transceiver)
        if flavour == ENGINE:
            _build_tensorrt_engine(Path(model_dir), tmp / "engine", c.architecture, settings)
        settings.write(tmp)
        manifest = dataclasses.replace(base, backend=BACKEND, extra={
            "llm_settings": settings.to_dict(), "tensorrt_llm_version": version,
            "model": {"vocab_size": c.vocab_size, "num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads,
                      "head_dim": c.head_dim}})
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        read_manifest(tmp)
    return manifest


def _build_tensorrt_engine(model_dir: Path, engine_dir: Path, architecture: str, s: TrtllmSettings) -> None:
    """Checkpoint conversion, then trtllm-build with the settings the orchestrator needs."""
    models = lazy_import.module("tensorrt_llm.models", "make build-engine BACKEND=trtllm")
    if architecture not in models.MODEL_MAP:
        raise BuildError(f"TensorRT-LLM has no converter for {architecture!r}; known: {sorted(models.MODEL_MAP)[:20]}")
    with tempfile.TemporaryDirectory(prefix="alignedserve-trtllm-ckpt-") as ckpt_dir:
        # positional: the first parameter's name differs between TensorRT-LLM's model classes
        model = models.MODEL_MAP[architecture].from_hugging_face(str(model_dir), dtype=s.dtype)
        model.save_checkpoint(output_dir=ckpt_dir)
        cmd = [TRTLLM_BUILD, "--checkpoint_dir", ckpt_dir, "--output_dir", str(engine_dir),
               "--max_batch_size", str(s.max_batch_size), "--max_seq_len", str(s.max_seq_len),
               # Without these trtllm-build's defaults (1,024 and 8,192) refuse longer prompts, and
               # every resume resubmits prompt + generated tokens: a prompt may be max_seq_len long,
               # and one step must hold it whole (the Executor runs without chunked context).
               "--max_input_len", str(s.max_seq_len), "--max_num_tokens", str(max(s.max_seq_len, DEFAULT_MAX_NUM_TOKENS)),
               "--kv_cache_type", "paged", "--tokens_per_block", str(s.tokens_per_block), "--gemm_plugin", "auto"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
            raise BuildError(f"{' '.join(cmd)} failed with exit code {r.returncode}:\n{tail}")

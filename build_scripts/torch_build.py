"""The torch engine directory: check a Hugging Face checkpoint, copy it, and write its manifest.

`build_engine(model_dir, out, ...)` is what `python -m build_scripts.build_engine` runs for
--backend torch, and the base every other backend's build starts from (`trtllm_build`). The
checkpoint is checked completely before anything is written (`build_scripts.checkpoint`); a
problem raises BuildError naming the file and the problem, and leaves no engine directory behind.

The engine directory (see `build_engine` for the layout) is written into a hidden sibling and
renamed into place (`build_scripts.staging`): an existing engine directory is replaced, any
other existing path only with force. The same checkpoint and options give byte-identical
engine directories: the manifest holds no time and no temporary path.
"""
from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

from build_scripts.checkpoint import CONFIG_FILE, TOKENIZER_FILE, BuildError, Checkpoint, inspect_checkpoint
from build_scripts.kv_budget import HOST_KV_FACTOR, default_budget, free_gpu_memory
from build_scripts.staging import check_replaceable, staged_dir
from engines.manifest import MANIFEST_NAME, Manifest, WeightFile, read_manifest

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
"""Compute dtypes an engine may run in, and bytes per KV element in each."""
DEFAULT_MAX_SEQ_LEN = 4096
"""Cap on the default max_seq_len, so a 128k-context model does not reserve 128k-token requests."""
GIB = 2**30
_COPY_CHUNK = 8 * 2**20


def kv_block_bytes(ckpt: Checkpoint, dtype: str, block_size: int) -> int:
    """Bytes of one KV block: K and V, every layer, `block_size` tokens."""
    c = ckpt.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * block_size * DTYPE_BYTES[dtype]


def kv_blocks(ckpt: Checkpoint, dtype: str, block_size: int, max_seq_len: int, kv_memory_gb: float) -> int:
    """KV blocks that fit in `kv_memory_gb` GiB; BuildError if not even one longest request fits."""
    if not (math.isfinite(kv_memory_gb) and kv_memory_gb > 0):
        raise BuildError(f"--kv-memory-gb must be a number > 0, got {kv_memory_gb}")
    per_block = kv_block_bytes(ckpt, dtype, block_size)
    blocks = int(kv_memory_gb * GIB) // per_block
    need = -(-max_seq_len // block_size)
    if blocks < need:
        raise BuildError(
            f"--kv-memory-gb {kv_memory_gb} holds {blocks} KV blocks of {per_block} bytes, but one request of "
            f"--max-seq-len {max_seq_len} tokens needs {need}; raise --kv-memory-gb to at least "
            f"{need * per_block / GIB:.4g} or lower --max-seq-len"
        )
    return blocks


def weights_digest(weights: list[WeightFile] | tuple[WeightFile, ...]) -> str:
    """sha256 of the `sha256sum` listing of the weight files in name order, so
    `sha256sum *.safetensors | sha256sum` in the engine directory gives the same value."""
    listing = "".join(f"{w.sha256}  {w.file}\n" for w in sorted(weights, key=lambda w: w.file))
    return hashlib.sha256(listing.encode()).hexdigest()


def _copy_hashing(src: Path, dst: Path, bar) -> WeightFile:
    h = hashlib.sha256()
    n = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(_COPY_CHUNK):
            h.update(chunk)
            fout.write(chunk)
            n += len(chunk)
            bar.update(len(chunk))
    return WeightFile(file=dst.name, bytes=n, sha256=h.hexdigest())


def build_engine(
    model_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    max_seq_len: int | None = None,
    block_size: int = 16,
    kv_memory_gb: float | None = None,
    host_kv_memory_gb: float | None = None,
    force: bool = False,
    source: str | None = None,
    progress: bool | None = None,
) -> Manifest:
    """Check `model_dir` and write the engine directory `out`; return its manifest.

    Layout of `out`: config.json, the safetensors weights (model.safetensors, or the shards and
    model.safetensors.index.json), tokenizer.json, whichever of generation_config.json,
    tokenizer_config.json, special_tokens_map.json and chat_template.jinja the checkpoint has,
    and manifest.json (written last).

    kv_memory_gb / host_kv_memory_gb: GiB for the device pool / the host pool; None sizes them to
    the model and this machine (`build_scripts.kv_budget`; the manifest's extra says how), and a
    given device pool gets a host pool HOST_KV_FACTOR times its size.
    source: what the manifest records as the origin (default: the absolute model path).
    progress: tqdm bar while copying weights; None shows it only on a terminal.
    """
    from tqdm import tqdm

    model_dir, out = Path(model_dir), Path(out)
    if dtype not in DTYPE_BYTES:
        raise BuildError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPE_BYTES)}")
    if block_size <= 0:
        raise BuildError(f"--block-size must be > 0, got {block_size}")
    resolved_out, resolved_model = out.resolve(), model_dir.resolve()
    if resolved_out == resolved_model or resolved_out in resolved_model.parents:
        raise BuildError(f"--out {out} would replace the checkpoint {model_dir}; choose another --out")
    check_replaceable(out, force)  # before the slow part: fail fast

    ckpt = inspect_checkpoint(model_dir)
    cfg = ckpt.config
    if max_seq_len is None:
        max_seq_len = min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if not 0 < max_seq_len <= cfg.max_position_embeddings:
        raise BuildError(
            f"--max-seq-len {max_seq_len} must be in [1, {cfg.max_position_embeddings}] "
            f"(max_position_embeddings in {model_dir / CONFIG_FILE})"
        )
    per_block = kv_block_bytes(ckpt, dtype, block_size)
    extra = {}
    if kv_memory_gb is None:
        budget = default_budget(per_block // block_size, max_seq_len, ckpt.num_params * DTYPE_BYTES[dtype],
                                gpu_free=free_gpu_memory())
        need = -(-max_seq_len // block_size)
        if budget.device_bytes < need * per_block:
            raise BuildError(
                f"the memory for the KV cache on this machine ({budget.reason}: {budget.device_bytes / GIB:.3g} GiB) "
                f"holds less than one request of --max-seq-len {max_seq_len} tokens ({need * per_block / GIB:.3g} "
                "GiB); free some memory, lower --max-seq-len, or give --kv-memory-gb")
        kv_memory_gb = budget.device_bytes / GIB
        if host_kv_memory_gb is None:
            host_kv_memory_gb = budget.host_bytes / GIB
        extra["kv_budget"] = budget.reason
    blocks = kv_blocks(ckpt, dtype, block_size, max_seq_len, kv_memory_gb)
    if host_kv_memory_gb is None:
        host_kv_memory_gb = HOST_KV_FACTOR * kv_memory_gb
    if not (math.isfinite(host_kv_memory_gb) and host_kv_memory_gb >= 0):
        raise BuildError(f"--host-kv-memory-gb must be a number >= 0 (0: no host pool), got {host_kv_memory_gb}")
    host_blocks = int(host_kv_memory_gb * GIB) // per_block

    with staged_dir(out, force=force) as tmp:
        for name in (CONFIG_FILE, *ckpt.extra_files, *([ckpt.index_file] if ckpt.index_file else [])):
            shutil.copyfile(model_dir / name, tmp / name)
        total = sum((model_dir / f).stat().st_size for f in ckpt.weight_files)
        disable = None if progress is None else not progress
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="copying weights", disable=disable) as bar:
            weights = tuple(_copy_hashing(model_dir / f, tmp / f, bar) for f in ckpt.weight_files)
        manifest = Manifest(
            backend="torch",
            architecture=cfg.architecture,
            dtype=dtype,
            max_seq_len=max_seq_len,
            kv_block_size=block_size,
            kv_blocks_device=blocks,
            kv_blocks_host=host_blocks,
            bytes_per_block=per_block,
            tokenizer=TOKENIZER_FILE,
            weights=weights,
            weights_sha256=weights_digest(weights),
            num_params=ckpt.num_params,
            eos_token_ids=ckpt.eos_token_ids,
            bos_token_id=ckpt.bos_token_id,
            source=source if source is not None else str(resolved_model),
            extra=extra,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        read_manifest(tmp)  # what every loader does first; a failure here is a bug in this script
    return manifest

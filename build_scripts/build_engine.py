"""`make build-engine`: turn a Hugging Face checkpoint into an engine directory.

    python -m build_scripts.build_engine [--model HF_DIR] [--out ENGINE_DIR] [--dtype float32|bfloat16]
        [--max-seq-len N] [--block-size 16] [--kv-memory-gb 1.0] [--host-kv-memory-gb 2x] [--force]
        [--backend torch|trtllm [--max-batch-size 64] [--cache-transceiver NIXL|UCX]]

Without --model it builds the seeded random demo model (`build_scripts.demo_checkpoint`), made
afresh in a temporary directory each time. The checkpoint is checked completely before anything
is written (`build_scripts.checkpoint`); on any problem the command prints one line naming the
file and the problem and exits with status 2, leaving no engine directory behind.

The engine directory (see `build_engine` for the layout) is written into a hidden sibling and
renamed into place (`build_scripts.staging`): an existing engine directory is replaced, any
other existing path only with --force. The same checkpoint and options give byte-identical
engine directories: the manifest holds no time and no temporary path.

--backend trtllm builds for TensorRT-LLM instead (`engines.tensorrt_llm.build`, docs/tensorrt-llm.md):
the same directory and manifest plus its settings; without TensorRT-LLM installed it exits with
status 2 and one line saying how to get it, before writing anything.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import math
import shutil
import sys
import tempfile
from pathlib import Path

from build_scripts.checkpoint import CONFIG_FILE, TOKENIZER_FILE, BuildError, Checkpoint, inspect_checkpoint
from build_scripts.staging import check_replaceable, staged_dir
from engines.manifest import MANIFEST_NAME, Manifest, WeightFile, read_manifest

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
"""Compute dtypes an engine may run in, and bytes per KV element in each."""
DEFAULT_MAX_SEQ_LEN = 4096
"""Cap on the default max_seq_len, so a 128k-context model does not reserve 128k-token requests."""
GIB = 2**30
HOST_KV_FACTOR = 2
"""Without --host-kv-memory-gb the host pool is this many times the device pool: the pool of
parked requests has to be large for aligned batches to find candidates (DESIGN.md §1)."""
_COPY_CHUNK = 8 * 2**20
BUILD_BACKENDS = ("torch", "trtllm")


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
    kv_memory_gb: float = 1.0,
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
    blocks = kv_blocks(ckpt, dtype, block_size, max_seq_len, kv_memory_gb)
    if host_kv_memory_gb is None:
        host_kv_memory_gb = HOST_KV_FACTOR * kv_memory_gb
    if not (math.isfinite(host_kv_memory_gb) and host_kv_memory_gb >= 0):
        raise BuildError(f"--host-kv-memory-gb must be a number >= 0 (0: no host pool), got {host_kv_memory_gb}")
    host_blocks = int(host_kv_memory_gb * GIB) // kv_block_bytes(ckpt, dtype, block_size)

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
            bytes_per_block=kv_block_bytes(ckpt, dtype, block_size),
            tokenizer=TOKENIZER_FILE,
            weights=weights,
            weights_sha256=weights_digest(weights),
            num_params=ckpt.num_params,
            eos_token_ids=ckpt.eos_token_ids,
            bos_token_id=ckpt.bos_token_id,
            source=source if source is not None else str(resolved_model),
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        read_manifest(tmp)  # what every loader does first; a failure here is a bug in this script
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m build_scripts.build_engine",
        description="Check a Hugging Face checkpoint and write an engine directory with manifest.json.",
    )
    p.add_argument("--model", help="Hugging Face checkpoint directory; omit it to build the demo model")
    p.add_argument("--out", help="engine directory to write (default: engines_built/<model dir name>, "
                                 "or engines_built/demo)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32",
                   help="compute dtype the engine runs in (default float32; use bfloat16 on GPUs)")
    p.add_argument("--max-seq-len", type=int,
                   help=f"longest prompt + output of one request (default: min(max_position_embeddings, "
                        f"{DEFAULT_MAX_SEQ_LEN}))")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--kv-memory-gb", type=float, default=1.0,
                   help="KV cache budget per device in GiB; sets kv_blocks_device (default 1.0)")
    p.add_argument("--host-kv-memory-gb", type=float, default=None,
                   help="host-memory KV pool in GiB for parked requests; sets kv_blocks_host "
                        f"(default {HOST_KV_FACTOR}x --kv-memory-gb; 0: no host pool, and the aligned "
                        "policy runs as fcfs)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it is not an engine directory (deletes it)")
    p.add_argument("--demo-size", choices=("demo", "100m"),
                   help="without --model: which demo model to build (default demo)")
    p.add_argument("--seed", type=int, help="without --model: seed of the demo weights (default 0)")
    p.add_argument("--backend", choices=BUILD_BACKENDS, default="torch",
                   help="engine backend: torch (built in, default) or trtllm (TensorRT-LLM; docs/tensorrt-llm.md)")
    p.add_argument("--max-batch-size", type=int,
                   help="--backend trtllm: executor slots = the orchestrator's batch capacity (default 64)")
    p.add_argument("--cache-transceiver", choices=("NIXL", "UCX"),
                   help="--backend trtllm: KV hand-off between a prefetch and a decode GPU (peer prefetch)")
    return p


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; exits with status 2 and one `error:` line on any problem."""
    parser = _parser()
    a = parser.parse_args(argv)
    if a.model and (a.demo_size or a.seed is not None):
        parser.error("--demo-size and --seed only apply to the demo model (without --model)")
    if a.backend != "trtllm" and (a.max_batch_size is not None or a.cache_transceiver):
        parser.error("--max-batch-size and --cache-transceiver only apply to --backend trtllm")
    size, seed = a.demo_size or "demo", a.seed if a.seed is not None else 0
    default_name = Path(a.model).resolve().name if a.model else ("demo" if size == "demo" else f"demo-{size}")
    out = Path(a.out or Path("engines_built") / default_name)
    options = dict(dtype=a.dtype, max_seq_len=a.max_seq_len, block_size=a.block_size,
                   kv_memory_gb=a.kv_memory_gb, host_kv_memory_gb=a.host_kv_memory_gb, force=a.force)
    build = build_engine
    if a.backend == "trtllm":
        from engines.tensorrt_llm.build import DEFAULT_MAX_BATCH_SIZE, build_trtllm_engine

        slots = a.max_batch_size if a.max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
        build = functools.partial(build_trtllm_engine, max_batch_size=slots, cache_transceiver=a.cache_transceiver)
    try:
        if a.model:
            manifest = build(a.model, out, **options)
        else:
            check_replaceable(out, a.force)  # before spending time on the demo weights
            from build_scripts.demo_checkpoint import make_demo_checkpoint

            source = "demo" if (size, seed) == ("demo", 0) else f"demo:{size}:seed={seed}"
            with tempfile.TemporaryDirectory(prefix="alignedserve-demo-checkpoint-") as ckpt_dir:
                make_demo_checkpoint(ckpt_dir, seed=seed, size=size)
                manifest = build(ckpt_dir, out, source=source, **options)
    except (BuildError, OSError) as e:  # OSError: disk full, permissions... while writing
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"built {out}: {manifest.architecture}, {manifest.num_params / 1e6:.1f}M parameters, {manifest.dtype}, "
        f"max_seq_len {manifest.max_seq_len}, {manifest.kv_blocks_device} KV blocks x {manifest.kv_block_size} "
        f"tokens ({manifest.bytes_per_block} bytes each)"
    )


if __name__ == "__main__":
    main()

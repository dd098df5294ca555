"""`make build-engine`: turn a Hugging Face checkpoint or a GGUF file into an engine directory.

    python -m build_scripts.build_engine [--model HF_DIR|FILE.gguf] [--out ENGINE_DIR] [--dtype float32|bfloat16]
        [--max-seq-len N] [--block-size 16] [--kv-memory-gb 1.0] [--host-kv-memory-gb 2x] [--force]
        [--backend torch|trtllm [--max-batch-size 64] [--cache-transceiver NIXL|UCX]]

Without --model it builds the seeded random demo model (`build_scripts.demo_checkpoint`), made
afresh in a temporary directory each time. A --model ending in .gguf is a llama.cpp file of the
Llama family, converted by `build_scripts.gguf_checkpoint` and then built like a checkpoint. On
any problem the command prints one line naming the file and the problem and exits with status 2,
leaving no engine directory behind.

This module is the command line only. --backend torch (the default) runs
`build_scripts.torch_build.build_engine`, which says what an engine directory holds and how it is
written; --backend trtllm runs `build_scripts.trtllm_build` (docs/tensorrt-llm.md): the same
directory and manifest plus its settings; without TensorRT-LLM installed it exits with status 2
and one line saying how to get it, before writing anything.
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

from build_scripts.checkpoint import BuildError
from build_scripts.gguf_checkpoint import build_gguf_engine
from build_scripts.staging import check_replaceable
from build_scripts.torch_build import DEFAULT_MAX_SEQ_LEN, DTYPE_BYTES, HOST_KV_FACTOR, build_engine
from build_scripts.trtllm_build import DEFAULT_MAX_BATCH_SIZE, build_trtllm_engine

BUILD_BACKENDS = ("torch", "trtllm")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m build_scripts.build_engine",
        description="Check a Hugging Face checkpoint (or a GGUF file) and write an engine directory with "
                    "manifest.json.",
    )
    p.add_argument("--model", help="Hugging Face checkpoint directory, or a llama.cpp .gguf file (Llama family); "
                                   "omit it to build the demo model")
    p.add_argument("--out", help="engine directory to write (default: engines_built/<model dir name>, "
                                 "engines_built/<gguf file name without .gguf>, or engines_built/demo)")
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
    gguf = bool(a.model) and a.model.lower().endswith(".gguf")
    if a.model:
        default_name = Path(a.model).resolve().stem if gguf else Path(a.model).resolve().name
    else:
        default_name = "demo" if size == "demo" else f"demo-{size}"
    out = Path(a.out or Path("engines_built") / default_name)
    options = dict(dtype=a.dtype, max_seq_len=a.max_seq_len, block_size=a.block_size,
                   kv_memory_gb=a.kv_memory_gb, host_kv_memory_gb=a.host_kv_memory_gb, force=a.force)
    build = build_engine
    if a.backend == "trtllm":
        slots = a.max_batch_size if a.max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
        build = functools.partial(build_trtllm_engine, max_batch_size=slots, cache_transceiver=a.cache_transceiver)
    try:
        if gguf:
            manifest = build_gguf_engine(a.model, out, build=build, **options)
        elif a.model:
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

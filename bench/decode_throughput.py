"""Decode tokens/s of the torch engine beside `transformers` generate, same weights, same run.

    python -m bench.decode_throughput --models smollm2 demo 100m --batch 1 8 32 --prompt-len 64 --new-tokens 32

Models: smollm2 is the real default model (SmolLM2-135M-Instruct, the engine directory
`make build-engine` writes, built into .cache/bench/ on first use); demo, 100m and 1b are
random-weight Llamas of 0.8M, 97M and 1.0B parameters (1b: for a GPU's timings). For each model and batch size, B prompts of `prompt-len` tokens are prefilled and then decoded
greedily for `new-tokens` tokens. Decode time excludes prefill for both sides: for the engine,
the decode calls are timed directly; for transformers, generate(new_tokens) minus
generate(1 token) (its prefill plus first token). Decode tokens/s = B * (new_tokens - 1) / time.
Engine and transformers runs alternate (`repeats` pairs after one warm-up pair); the table
gives each side's median and the median (min-max) of the per-pair ratios. Results: JSON under
bench/results/ and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from build_scripts.demo_checkpoint import make_demo_checkpoint
from engines.base import PrefillRequest
from engines.torch.engine import TorchEngine

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench"
RESULTS = Path(__file__).resolve().parent / "results"


def checkpoint(size: str) -> Path:
    """A checkpoint directory that both the engine and transformers open."""
    if size == "smollm2":  # the engine directory holds config.json and the safetensors
        out = CACHE / "engine-smollm2"
        if not (out / "manifest.json").is_file():
            from build_scripts.build_engine import main as build_engine

            build_engine(["--out", str(out), "--kv-memory-gb", "0.2", "--host-kv-memory-gb", "0"])
        return out
    out = CACHE / f"checkpoint-{size}"
    if not (out / "config.json").is_file():
        make_demo_checkpoint(out, seed=0, size=size)
    return out


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, min(vocab, 256), (batch, length), generator=g).tolist()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_decode_seconds(engine: TorchEngine, batch: list[list[int]], new_tokens: int) -> tuple[float, list]:
    ids = [f"b{i}" for i in range(len(batch))]
    first = engine.prefill([PrefillRequest(i, p) for i, p in zip(ids, batch)])
    out = [[first.tokens[i]] for i in ids]
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        step = engine.decode(ids).tokens
        for o, i in zip(out, ids):
            o.append(step[i])
    seconds = time.perf_counter() - t0
    engine.free(ids)
    return seconds, out


def hf_generate_seconds(model, batch: list[list[int]], new_tokens: int) -> tuple[float, list]:
    input_ids = torch.tensor(batch, device=model.device)
    mask = torch.ones_like(input_ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(input_ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync(model.device)
        t1 = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync(model.device)
        t2 = time.perf_counter()
    return (t2 - t1) - (t1 - t0), out[:, input_ids.shape[1]:].tolist()


def paired_runs(engine_fn, hf_fn, repeats: int):
    """Alternate engine and transformers runs so that machine drift (other tenants, clock
    changes) hits both sides alike; return the medians and the median of per-pair ratios."""
    engine_fn(), hf_fn()  # warm-up
    pairs = [(engine_fn(), hf_fn()) for _ in range(repeats)]
    t_engine = statistics.median(e[0] for e, _ in pairs)
    t_hf = statistics.median(h[0] for _, h in pairs)
    ratio = statistics.median(h[0] / e[0] for e, h in pairs)
    spread = (min(h[0] / e[0] for e, h in pairs), max(h[0] / e[0] for e, h in pairs))
    return t_engine, t_hf, ratio, spread, pairs[-1][0][1], pairs[-1][1][1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2", "demo", "100m"], choices=["smollm2", "demo", "100m", "1b"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (absolute rates are only meaningful on a GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention", default="auto", choices=["auto", "varlen", "padded"],
                   help="the engine's attention path (engines/torch/attention.py)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default bench/results/decode_throughput[-DEVICE].json)")
    a = p.parse_args(argv)
    if a.out is None:
        suffix = "" if a.device == "cpu" else "-" + a.device.split(":")[0]
        a.out = RESULTS / f"decode_throughput{suffix}.json"
    dtype = getattr(torch, a.dtype)
    from transformers import AutoModelForCausalLM

    rows = []
    engine_attention = None
    work = [(m, b) for m in a.models for b in a.batch]
    bar = tqdm(work, desc="decode benchmark", unit="case")
    for model_name in a.models:
        ckpt = checkpoint(model_name)
        engine = TorchEngine(ckpt, device=a.device, dtype=a.dtype, max_seq_len=a.prompt_len + a.new_tokens,
                             kv_blocks=max(a.batch) * -(-(a.prompt_len + a.new_tokens) // 16), attention=a.attention)
        engine_attention = engine.attention
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval().to(engine.device)
        for b in a.batch:
            bar.set_postfix(model=model_name, batch=b)
            batch = prompts(b, a.prompt_len, engine.cfg.vocab_size)
            t_engine, t_hf, ratio, spread, out_engine, out_hf = paired_runs(
                lambda: engine_decode_seconds(engine, batch, a.new_tokens),
                lambda: hf_generate_seconds(hf, batch, a.new_tokens), a.repeats)
            decoded = b * (a.new_tokens - 1)
            same = sum(x == y for x, y in zip(out_engine, out_hf))
            rows.append({
                "model": model_name, "params": engine.num_params, "batch": b,
                "engine_tok_s": decoded / t_engine, "transformers_tok_s": decoded / t_hf,
                "ratio": ratio, "ratio_min": spread[0], "ratio_max": spread[1],
                "identical_greedy_outputs": f"{same}/{b}",
            })
            bar.update()
        engine.close()
    bar.close()
    result = {
        "command": "python -m bench.decode_throughput " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(a.device)}" if a.device.startswith("cuda") else ""),
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "dtype": a.dtype, "device": a.device,
        "attention": engine_attention,
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| model | params | batch | torch engine tok/s | transformers tok/s | engine / transformers "
          "(median of pairs, min-max) | same greedy output |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['engine_tok_s']:.0f} | "
              f"{r['transformers_tok_s']:.0f} | {r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
              f"{r['identical_greedy_outputs']} |")
    print(f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

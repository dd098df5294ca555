"""The floor: transformers' `generate` on the same weights and prompts, in static batches.

What a server should beat: the prompts in arrival order, cut into batches of the load's
concurrency, each batch left-padded to its longest prompt and generated greedily to exactly
`output_len` new tokens (EOS ignored, as the servers are asked to), one batch after another.
Output tok/s is all the generated tokens over the wall time of all batches. It runs in the
project's venv, on the threads torch picks on this machine.
"""
from __future__ import annotations

import time
from pathlib import Path


def floor_tok_s(engine_dir: Path, prompts: list[str], batch_size: int, output_len: int,
                dtype: str = "float32") -> dict:
    """Time `generate` over `prompts` in static batches of `batch_size`, in `dtype` (the engine's);
    the figures as a dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size}; must be >= 1")
    tokenizer = AutoTokenizer.from_pretrained(engine_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(engine_dir, dtype=getattr(torch, dtype)).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generated, batches = 0, []
    with torch.inference_mode():  # warm-up: the first call pays for one-time setup
        model.generate(**tokenizer(prompts[:1], return_tensors="pt"), max_new_tokens=2, do_sample=False,
                       pad_token_id=pad)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
            t0 = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                                 pad_token_id=pad)
            new = out.shape[1] - batch["input_ids"].shape[1]
            generated += new * out.shape[0]
            batches.append({"size": out.shape[0], "padded_prompt_tokens": int(batch["input_ids"].shape[1]),
                            "new_tokens": int(new), "seconds": time.perf_counter() - t0})
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "output_tok_s": generated / seconds, "seconds": seconds,
            "output_tokens": generated, "torch_threads": torch.get_num_threads(), "batches": batches}

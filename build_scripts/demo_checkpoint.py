"""A small random-weight Llama checkpoint in Hugging Face layout, so everything runs offline.

`make_demo_checkpoint(out_dir)` writes config.json, generation_config.json, model.safetensors,
tokenizer.json and tokenizer_config.json. The tokenizer is byte-level: ids 0..255 are the bytes
of the UTF-8 text, 256 = <s>, 257 = </s>, 258 = <pad>, so any text round-trips and token counts
are byte counts. Weights are seeded: the same seed writes byte-identical files.

Sizes: "demo" (~0.8M parameters, for tests and the default engine), "100m" (~97M, for
benchmarks) and "1b" (~1.0B, Llama-3.2-1B's layer shapes, stored in bfloat16: GPU timings, which
need no trained weights). `python -m build_scripts.demo_checkpoint --out DIR [--size 100m] [--seed 0]`.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from build_scripts.random_checkpoint import write_random_checkpoint

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as SmolLM2 and Qwen write conversations; the byte tokenizer spells its markers in bytes."""
VOCAB_SIZE = 259
INIT_STD = 0.02
"""Standard deviation of the normal init, as Hugging Face's `initializer_range` default."""


@dataclass(frozen=True, slots=True)
class DemoSize:
    """Shape of a demo model."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    dtype: str = "float32"
    """Storage dtype of the weights ("float32" or "bfloat16")."""


SIZES = {
    "demo": DemoSize(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352),
    "100m": DemoSize(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2816),
    "1b": DemoSize(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, dtype="bfloat16"),
}


def llama_config(size: DemoSize) -> dict:
    """config.json of a demo model, as `transformers` writes one for LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "head_dim": size.hidden // size.heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "initializer_range": INIT_STD,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": size.dtype,
        "use_cache": True,
    }


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of a ByteLevel tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """A `tokenizers.Tokenizer` whose ids 0..255 are raw bytes; it adds <s> like Llama's does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>", "<pad>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert [tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")] == [BOS_ID, EOS_ID, PAD_ID]
    return tok


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def make_demo_checkpoint(
    out_dir: str | Path, seed: int = 0, size: str = "demo", progress: bool | None = None
) -> Path:
    """Write a random-weight Llama checkpoint into `out_dir` (created if needed) and return it.

    progress: show a tqdm bar over tensors; None shows it only on a terminal.
    """
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False},
    )
    byte_tokenizer().save(str(out / "tokenizer.json"), pretty=True)
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "chat_template": CHAT_TEMPLATE,
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 2048,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )

    # Hugging Face's init (std 0.02, norms 1): the model behaves like a freshly initialised one.
    write_random_checkpoint(out, llama_config(spec), seed=seed, std=INIT_STD, norm_jitter=0.0,
                            dtype=spec.dtype, progress=progress)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m build_scripts.demo_checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write the checkpoint into")
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_demo_checkpoint(a.out, seed=a.seed, size=a.size))


if __name__ == "__main__":
    main()

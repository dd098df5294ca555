"""Tiny Llama GGUF files for the tests, written the way llama.cpp's convert_hf_to_gguf.py does.

`write_tiny_llama(path, ...)` draws a random Hugging Face-layout Llama (2 layers, hidden 256, 4
heads over 2 KV heads), permutes the q/k rows as llama.cpp's converter does, stores each tensor in
the type `MIXED_TYPES` names (quantized with `gguf.quants.quantize`, or as random k-quant blocks,
which gguf cannot quantize) and adds a byte-level BPE vocabulary trained on a few sentences, with
control tokens, a user-defined one and a chat template. It returns the Hugging Face weights it
started from, so a test can check what a build made of them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, CONTEXT = 256, 4, 2, 64, 512, 2, 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Control tokens (ids 0, 1, 2): bos is <|im_start|>, eos <|im_end|>, as SmolLM2 has them."""
USER_DEFINED = "<think>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "In 2024, 1234 people counted 56789 stars; it's what they'd done before!",
    "def main():\n    return 42  # the answer\n",
    "Héllo wörld, naïve café — 日本語 text 🤖 too.",
] * 20
MIXED_TYPES = {
    "token_embd": "Q8_0", "output": "Q6_K",
    "blk.0.attn_q": "Q4_0", "blk.0.attn_k": "Q4_1", "blk.0.attn_v": "Q5_0", "blk.0.attn_output": "Q5_1",
    "blk.0.ffn_gate": "Q4_K", "blk.0.ffn_up": "Q5_K", "blk.0.ffn_down": "Q6_K",
    "blk.1.attn_q": "F16", "blk.1.attn_k": "BF16", "blk.1.attn_v": "Q8_0", "blk.1.attn_output": "Q2_K",
    "blk.1.ffn_gate": "Q3_K", "blk.1.ffn_up": "F32", "blk.1.ffn_down": "Q8_0",
}
"""Every supported type at least once; norms are always F32, as llama.cpp keeps 1-D tensors."""

_K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
"""Byte offsets of the float16 super-block scales (d, and dmin where there is one) in each
k-quant block (ggml-common.h); every other byte may be anything."""


def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """Tokens, merges and token types of a small byte-level BPE trained on CORPUS."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])] + [USER_DEFINED]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
    return tokens, merges, types


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What convert_hf_to_gguf.py's LlamaModel.permute does to q/k rows (pairs interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path: Path, *, types: dict[str, str] = MIXED_TYPES, tied: bool = False,
                     arch: str = "llama", pre: str = "llama-bpe", drop_keys: tuple[str, ...] = (),
                     rope_freqs: np.ndarray | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the tiny Llama to `path`; return its Hugging Face weights (float32, before quantizing).

    types: llama.cpp tensor name (without .weight) -> GGML type name, for any tensor but the norms.
    drop_keys: metadata keys (under `llama.`) left out.
    """
    import gguf

    tokens, merges, token_types = byte_level_vocab()
    rng = np.random.default_rng(seed)
    shapes = {"token_embd": (len(tokens), HIDDEN), "output_norm": (HIDDEN,)}
    if not tied:
        shapes["output"] = (len(tokens), HIDDEN)
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_norm": (HIDDEN,), f"blk.{i}.ffn_norm": (HIDDEN,),
            f"blk.{i}.attn_q": (HEADS * HEAD_DIM, HIDDEN), f"blk.{i}.attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), f"blk.{i}.attn_output": (HIDDEN, HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate": (FFN, HIDDEN), f"blk.{i}.ffn_up": (FFN, HIDDEN), f"blk.{i}.ffn_down": (HIDDEN, FFN),
        })

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": LAYERS, "context_length": CONTEXT, "embedding_length": HIDDEN,
                       "feed_forward_length": FFN, "attention.head_count": HEADS,
                       "attention.head_count_kv": KV_HEADS}.items():
        if key not in drop_keys:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.vocab_size", len(tokens))
    w.add_uint32(f"{arch}.rope.dimension_count", HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    hf = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            values = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            hf[name] = values
            w.add_tensor(f"{name}.weight", values)
            continue
        kind = types.get(name, "F32")
        heads = HEADS if name.endswith("attn_q") else KV_HEADS if name.endswith("attn_k") else None
        if kind in _K_SCALES or kind.startswith("IQ"):  # types gguf cannot quantize: random blocks
            data = _random_blocks(kind, shape, rng)
            hf[name] = None  # no float original: the tests compare these with transformers
        else:
            values = (0.2 * rng.standard_normal(shape)).astype(np.float32)
            hf[name] = values
            stored = llama_cpp_permute(values, heads) if heads else values
            data = (stored if kind == "F32" else stored.astype(np.float16) if kind == "F16"
                    else gguf.quants.quantize(stored, gguf.GGMLQuantizationType[kind]))
        raw = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
        w.add_tensor(f"{name}.weight", data, raw_dtype=raw)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _random_blocks(kind: str, shape: tuple[int, int], rng) -> np.ndarray:
    """Random blocks of a quantized type. For a k-quant their values have a standard deviation
    near 0.2: the scales are set to 1, the blocks dequantized, and the scales then set to 0.2 /
    that deviation (every value is linear in them). Other types' blocks are only bytes."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    data = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    if kind not in _K_SCALES:
        return data.reshape(rows, -1)

    def set_scales(value: float) -> None:
        for offset in _K_SCALES[kind]:
            data[..., offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)

    set_scales(1.0)
    spread = gguf.quants.dequantize(data.reshape(rows, -1), qtype).std()
    set_scales(0.2 / spread)
    return data.reshape(rows, -1)

"""`make build-engine MODEL=file.gguf`: an engine directory from a llama.cpp GGUF file (Llama family).

`build_gguf_engine(path, out, ...)` checks all it can from the file's header first: that it is a
GGUF at all and complete, `general.architecture` "llama", the metadata keys the model needs, each
tensor's type (`TENSOR_TYPES`), name and shape. Then it writes a Hugging Face checkpoint into a
hidden directory beside `out` — config.json and generation_config.json from the `llama.*` and
`tokenizer.ggml.*` metadata, the weights dequantized into the engine's dtype, and the tokenizer
files (`build_scripts.gguf_tokenizer`) — and builds that with the same build as any checkpoint
(`torch_build.build_engine`, or the --backend's), with the GGUF file as the manifest's source. So
the engine directory passes the same checks, appears all at once or not at all, and the
temporary checkpoint is removed either way. A problem raises BuildError naming the file and what
is wrong.

What llama.cpp's convert_hf_to_gguf.py did to a Hugging Face checkpoint, undone here:
- names: `blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight`, and so on
  (`_TOP_NAMES`, `_LAYER_NAMES`);
- shapes: GGUF lists dimensions innermost first; the reader hands rows x columns as torch has them;
- the rows of q and k: llama.cpp's rotary embedding rotates adjacent pairs (0,1), (2,3), ... where
  Hugging Face's rotates the two halves of a head (i, i + head_dim/2), so the converter reorders
  each head's rows (`LlamaModel.permute`, per KV head for k). `_unpermute` puts them back;
- tied embeddings: a file without `output.weight` reuses `token_embd.weight` as the LM head;
- Llama 3.1+ rope scaling: stored as a tensor of per-frequency divisors, `rope_freqs.weight`,
  which is read back into Hugging Face's `rope_scaling` (`_llama3_rope_scaling`).
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from build_scripts.checkpoint import BuildError
from build_scripts.gguf_tokenizer import write_tokenizer
from build_scripts.staging import check_replaceable
from build_scripts.torch_build import DTYPE_BYTES, build_engine
from engines.manifest import Manifest

TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
"""GGML tensor types dequantized here (with `gguf.quants.dequantize`): the plain floats, the
legacy 32-value blocks and the k-quants, i.e. what llama.cpp's F16, Q8_0, Q4_0..Q5_1 and
Q2_K..Q6_K (_S/_M/_L) files hold. Any other type (IQ*, TQ*, MXFP4, integer tensors) is refused."""
SHARD_BYTES = 2 * 2**30
"""Weights go into safetensors shards of about this size, so at most one shard is in memory."""

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
"""llama.cpp tensor names (without `blk.N.` and `.weight`/`.bias`) -> Hugging Face's (without
`model.layers.N.`)."""
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP = re.compile(r"(\w+)\.(weight|bias)")


@dataclass(frozen=True, slots=True)
class _Tensor:
    """One GGUF tensor and what it becomes."""

    hf_name: str
    gguf: object
    """The gguf.ReaderTensor."""
    heads: int | None
    """Heads to un-permute the rows by (q: attention heads, k: KV heads), or None."""


def build_gguf_engine(
    gguf_path: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    force: bool = False,
    progress: bool | None = None,
    build: Callable[..., Manifest] = build_engine,
    **options,
) -> Manifest:
    """Convert the GGUF file `gguf_path` and build the engine directory `out`; return its manifest.

    options: the rest of `torch_build.build_engine`'s (max_seq_len, block_size, kv_memory_gb,
    host_kv_memory_gb). build: the backend's build over a Hugging Face checkpoint directory.
    progress: tqdm bar while dequantizing (and copying); None shows it only on a terminal.
    """
    path, out = Path(gguf_path), Path(out)
    if dtype not in DTYPE_BYTES:
        raise BuildError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPE_BYTES)}")
    resolved = path.resolve()
    if out.resolve() == resolved or out.resolve() in resolved.parents:
        raise BuildError(f"--out {out} would replace the GGUF file {path}; choose another --out")
    check_replaceable(out, force)  # before the slow part: fail fast
    reader, meta = read_gguf(path)
    where = str(path)
    config = hf_config(meta, reader, where)
    tensors = _plan(reader, config, where)
    max_seq_len = options.get("max_seq_len")
    if max_seq_len is not None and not 0 < max_seq_len <= config["max_position_embeddings"]:
        raise BuildError(f"--max-seq-len {max_seq_len} must be in [1, {config['max_position_embeddings']}] "
                         f"(llama.context_length in {path})")

    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside `out`, not in /tmp: the weights in float32 can be several times the GGUF's size.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf-", dir=out.parent) as tmp:
        ckpt = Path(tmp)
        (ckpt / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        (ckpt / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        write_tokenizer(meta, ckpt, where, config["max_position_embeddings"])
        _write_weights(tensors, ckpt, dtype, where, progress)
        try:
            return build(ckpt, out, dtype=dtype, force=force, source=str(resolved), progress=progress, **options)
        except BuildError as e:  # name the GGUF, not a directory that is about to disappear
            raise BuildError(str(e).replace(str(ckpt), f"{path} (converted)")) from e


def read_gguf(path: Path) -> tuple[object, dict]:
    """The file's gguf.GGUFReader (tensors memory-mapped, not read) and its metadata as plain
    Python values; BuildError if it is missing, not a GGUF file, or cut short."""
    import gguf

    if not path.is_file():
        raise BuildError(f"GGUF file {path} {'is not a file' if path.exists() else 'does not exist'}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise BuildError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:  # what the reader raises on short or bad data
        raise BuildError(f"{path} is truncated or corrupt: the GGUF reader failed ({e}); download it again") from e
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise BuildError(f"{path}: metadata key {key} cannot be read ({e}); the file is corrupt") from e
    return reader, meta


def hf_config(meta: dict, reader, where: str) -> dict:
    """The Hugging Face LlamaForCausalLM config.json of a GGUF file's `llama.*` metadata."""
    from engines.torch.models import config_from_hf

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise BuildError(f"{where}: general.architecture is {arch!r}; only Llama-family GGUF files ('llama') "
                         "can be built; for others, build from the Hugging Face checkpoint directory")

    def need(key: str, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise BuildError(f"{where}: metadata key llama.{key} is missing")
        if isinstance(value, list):
            raise BuildError(f"{where}: llama.{key} varies per layer ({value[:4]}...); the torch engine "
                             "needs one value for all layers")
        return value

    if meta.get("llama.expert_count"):
        raise BuildError(f"{where}: llama.expert_count is {meta['llama.expert_count']}: mixture-of-experts "
                         "models are not supported by the torch engine")
    heads, hidden = need("attention.head_count"), need("embedding_length")
    head_dim = need("attention.key_length", hidden // max(heads, 1))  # heads 0: refused below
    if need("rope.dimension_count", head_dim) != head_dim:
        raise BuildError(f"{where}: llama.rope.dimension_count {meta['llama.rope.dimension_count']} is not the "
                         f"head size {head_dim}; partial rotary embeddings are not supported")
    tensor_names = {t.name for t in reader.tensors}
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": need("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": need("rope.freq_base", 10000.0),  # llama.cpp's default
        "max_position_embeddings": need("context_length"),
        # Older files have no vocab_size; llama.cpp then counts the tokens.
        "vocab_size": need("vocab_size", len(meta.get("tokenizer.ggml.tokens") or []) or None),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensor_names,
        **({"bos_token_id": meta["tokenizer.ggml.bos_token_id"]} if "tokenizer.ggml.bos_token_id" in meta else {}),
        # llama.cpp stops at end-of-turn and end-of-message too: list them all.
        **({"eos_token_id": list(dict.fromkeys(eos))} if eos else {}),
    }
    scaling = _rope_scaling(meta, reader, config, where)
    if scaling:
        config["rope_scaling"] = scaling
    try:
        config_from_hf(config, where=where)  # the torch engine's own reading: refuse now what it would refuse
    except (ValueError, TypeError) as e:
        raise BuildError(str(e)) from e
    return config


def _rope_scaling(meta: dict, reader, config: dict, where: str) -> dict | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if kind != "none":
            raise BuildError(f"{where}: both rope_freqs.weight and llama.rope.scaling.type {kind!r}; expected one")
        return _llama3_rope_scaling(_dequantize(freqs, where), config, where)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta.get("llama.rope.scaling.factor", 1.0))}
    raise BuildError(f"{where}: llama.rope.scaling.type {kind!r} is not supported; supported: none, linear "
                     "(and Llama 3's rope_freqs.weight)")


def _llama3_rope_scaling(divisors: np.ndarray, config: dict, where: str) -> dict:
    """Hugging Face's llama3 `rope_scaling` giving the same frequencies as `rope_freqs.weight`, whose
    entries llama.cpp divides the rotary frequencies by. Every Llama 3.x release uses low/high
    frequency factors 1 and 4 over an original context of 8192 and differs only in `factor` (8
    for 3.1, 32 for 3.2), the largest divisor; the whole tensor is checked against that guess."""
    import torch

    from engines.torch.model_config import RopeScaling
    from engines.torch.rope import inverse_frequencies

    guess = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    head_dim, theta = config["head_dim"], config["rope_theta"]
    plain = inverse_frequencies(head_dim, theta, RopeScaling())
    scaled = inverse_frequencies(head_dim, theta, RopeScaling(**guess))
    if divisors.shape != (head_dim // 2,) or not torch.allclose(plain / scaled, torch.tensor(divisors), rtol=1e-4):
        raise BuildError(f"{where}: rope_freqs.weight is not Llama 3's rope scaling with factor {guess['factor']:g} "
                         "(low 1, high 4, original context 8192); this rope scaling is not supported")
    return guess


def _plan(reader, config: dict, where: str) -> list[_Tensor]:
    """Each tensor's Hugging Face name, checked against the shapes `config` implies."""
    import gguf

    from engines.torch.models import config_from_hf, expected_tensor_shapes

    expected = expected_tensor_shapes(config_from_hf(config, where=where))
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    plan = []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # read into config.json's rope_scaling
        if (m := _LAYER.fullmatch(t.name)) and m[2] in _LAYER_NAMES:
            hf_name, base = f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}", m[2]
        elif (m := _TOP.fullmatch(t.name)) and m[1] in _TOP_NAMES:
            hf_name, base = f"{_TOP_NAMES[m[1]]}.{m[2]}", m[1]
        else:
            raise BuildError(f"{where}: tensor {t.name} is not one of a Llama model's")
        type_name = gguf.GGMLQuantizationType(t.tensor_type).name
        if type_name not in TENSOR_TYPES:
            raise BuildError(f"{where}: tensor {t.name} has type {type_name}, which is not supported; "
                             f"supported: {', '.join(TENSOR_TYPES)}")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the innermost dimension first
        if hf_name not in expected:
            raise BuildError(f"{where}: tensor {t.name} is not accounted for by the metadata (llama.block_count "
                             f"{config['num_hidden_layers']})")
        if shape != expected[hf_name]:
            raise BuildError(f"{where}: tensor {t.name} has shape {list(shape)} but the metadata implies "
                             f"{list(expected[hf_name])}")
        plan.append(_Tensor(hf_name, t, heads.get(base)))
    missing = sorted(set(expected) - {p.hf_name for p in plan})
    if missing:
        raise BuildError(f"{where}: the file lacks tensor(s) {', '.join(missing[:5])} that the metadata implies")
    return plan


def _dequantize(t, where: str) -> np.ndarray:
    """The tensor as float32, rows x columns."""
    from gguf.quants import dequantize

    try:
        values = dequantize(t.data, t.tensor_type)
    except (ValueError, NotImplementedError) as e:
        raise BuildError(f"{where}: tensor {t.name} cannot be dequantized ({e})") from e
    return values.reshape(tuple(int(n) for n in reversed(t.shape)))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's permute: within each head, llama.cpp's row 2i + s is Hugging
    Face's row s * head_dim/2 + i (s = 0, 1 picks the half of the rotary pair)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(plan: list[_Tensor], ckpt: Path, dtype: str, where: str, progress: bool | None) -> None:
    """model.safetensors, or shards of about SHARD_BYTES and model.safetensors.index.json."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch_dtype = getattr(torch, dtype)
    item = torch.tensor([], dtype=torch_dtype).element_size()
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for p in plan:
        n = int(p.gguf.n_elements) * item
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += n
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    disable = None if progress is None else not progress
    with tqdm(total=len(plan), unit="tensor", desc="dequantizing", disable=disable) as bar:
        for name, shard in zip(names, shards):
            tensors = {}
            for p in shard:
                w = _dequantize(p.gguf, where)
                if p.heads:
                    w = _unpermute(w, p.heads)
                tensors[p.hf_name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch_dtype)
                weight_map[p.hf_name] = name
                bar.update()
            save_file(tensors, str(ckpt / name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(int(p.gguf.n_elements) * item for p in plan)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

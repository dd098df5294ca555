"""Check a Hugging Face checkpoint directory before anything is written from it.

`inspect_checkpoint(model_dir)` reads config.json, generation_config.json, tokenizer.json and
every safetensors header, and either returns a `Checkpoint` that the engine can load or raises
`BuildError` with ONE message naming the file and the problem. Tensor names and shapes come from
the torch engine's own `expected_tensor_shapes`, and weight files are found by the same rule as
`engines.torch.weights` (the index wins over a single file), so a checkpoint that passes here is
one the engine accepts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from build_scripts.safetensors_io import FLOAT_DTYPES, SafetensorsError, TensorEntry, read_tensor_entries
from engines.torch.model_config import ModelConfig, expected_tensor_shapes

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
SINGLE_WEIGHTS = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
"""Copied into the engine when present: the serving layer may want the chat template."""
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)
"""Tensors old checkpoints carry that the engine recomputes (same list as engines.torch.weights)."""


class BuildError(Exception):
    """The checkpoint or the build options are unusable; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checked checkpoint: what to copy and what the manifest says about it."""

    model_dir: Path
    config: ModelConfig
    weight_files: tuple[str, ...]
    """Safetensors file names, sorted."""
    index_file: str | None
    """model.safetensors.index.json when the weights are sharded."""
    extra_files: tuple[str, ...]
    """Other files to copy beside config.json and the weights (tokenizer, generation config)."""
    num_params: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None


def inspect_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Check `model_dir` completely; raise BuildError on the first problem."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        what = "is not a directory" if model_dir.exists() else "does not exist"
        raise BuildError(f"model directory {model_dir} {what}; pass --model <Hugging Face checkpoint dir>")
    cfg = _read_config(model_dir)
    gen = _read_json_object(model_dir / GENERATION_CONFIG_FILE, required=False)
    _check_tokenizer(model_dir / TOKENIZER_FILE, cfg)
    weight_files, index_file, tensors = _read_weights(model_dir)
    num_params = _check_tensors(model_dir, cfg, tensors)

    gen_path, cfg_path = model_dir / GENERATION_CONFIG_FILE, model_dir / CONFIG_FILE
    # generation_config.json is what transformers' generate() uses, so its ids come first.
    eos = _ids(gen.get("eos_token_id"), gen_path) + _ids(list(cfg.eos_token_ids), cfg_path)
    bos = _ids(gen.get("bos_token_id"), gen_path) or _ids(cfg.bos_token_id, cfg_path)
    extras = [f for f in (GENERATION_CONFIG_FILE, TOKENIZER_FILE, *TOKENIZER_EXTRAS) if (model_dir / f).is_file()]
    return Checkpoint(
        model_dir=model_dir,
        config=cfg,
        weight_files=tuple(sorted(weight_files)),
        index_file=index_file,
        extra_files=tuple(sorted(extras)),
        num_params=num_params,
        eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=bos[0] if bos else None,
    )


def _read_json_object(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise BuildError(f"{path} is missing: {path.parent} is not a Hugging Face checkpoint directory")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise BuildError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / CONFIG_FILE
    data = _read_json_object(path, required=True)
    try:
        return ModelConfig.from_hf(data, where=str(path))
    except (ValueError, TypeError) as e:  # TypeError: a field of the wrong JSON type
        msg = str(e)
        raise BuildError(msg if str(path) in msg else f"{path}: {msg}") from e


def _ids(value, where: Path) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise BuildError(f"{where}: token ids must be integers, got {value!r}")
    return tuple(values)


def _check_tokenizer(path: Path, cfg: ModelConfig) -> None:
    if not path.is_file():
        raise BuildError(
            f"{path} is missing: the engine needs a Hugging Face fast tokenizer file; make one with "
            "transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        )
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise BuildError(f"{path} is not a valid tokenizer file ({e})") from e
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size:
        raise BuildError(
            f"{path} has {n} tokens but config.json vocab_size is {cfg.vocab_size}: "
            "the tokenizer does not belong to these weights"
        )


def _read_weights(model_dir: Path) -> tuple[list[str], str | None, dict[str, tuple[str, TensorEntry]]]:
    """Weight file names, the index file (or None), and tensor -> (file, entry)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_json_object(index, required=True).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise BuildError(f"{index} has no 'weight_map' object of tensor name -> file name")
        files = sorted(set(weight_map.values()))
        for f in files:
            if Path(f).name != f or not f.endswith(".safetensors"):
                raise BuildError(f"{index} names shard {f!r}; shards must be .safetensors files beside the index")
            if not (model_dir / f).is_file():
                raise BuildError(f"{model_dir / f} is missing: it is a shard named in {index}")
        index_name: str | None = INDEX_FILE
    elif (model_dir / SINGLE_WEIGHTS).is_file():
        weight_map, files, index_name = None, [SINGLE_WEIGHTS], None
    else:
        found = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.safetensors"))
        hint = f" (found {', '.join(found[:3])}: convert with save_pretrained(safe_serialization=True))" if found else ""
        raise BuildError(
            f"{model_dir} holds no weights: expected {SINGLE_WEIGHTS} or {INDEX_FILE}{hint}"
        )

    tensors: dict[str, tuple[str, TensorEntry]] = {}
    for f in files:
        try:
            entries = read_tensor_entries(model_dir / f)
        except SafetensorsError as e:
            raise BuildError(f"{model_dir / f} is not a usable safetensors file: {e}") from e
        for name, entry in entries.items():
            if weight_map is None or weight_map.get(name) == f:
                tensors[name] = (f, entry)
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in tensors:
                raise BuildError(f"{model_dir / f}: tensor {name} is missing although {index} places it there")
    return files, index_name, tensors


def _check_tensors(model_dir: Path, cfg: ModelConfig, tensors: dict[str, tuple[str, TensorEntry]]) -> int:
    """Every expected tensor present, float, of the right shape; returns the parameter count."""
    expected = expected_tensor_shapes(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        weights = model_dir / (INDEX_FILE if (model_dir / INDEX_FILE).is_file() else SINGLE_WEIGHTS)
        raise BuildError(
            f"{weights}: the weights lack tensor(s) {', '.join(missing[:3])}{more} that "
            f"{CONFIG_FILE} implies (num_hidden_layers, tie_word_embeddings, biases)"
        )
    extra = sorted(
        n for n in tensors
        if n not in expected
        and not n.endswith(IGNORED_TENSOR_SUFFIXES)
        and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    )
    if extra:
        raise BuildError(
            f"{model_dir / tensors[extra[0]][0]}: tensor(s) {', '.join(extra[:3])} are not accounted for by "
            f"{CONFIG_FILE}; check num_hidden_layers, attention_bias, mlp_bias and tie_word_embeddings"
        )
    num_params = 0
    for name, shape in expected.items():
        f, entry = tensors[name]
        if entry.shape != shape:
            raise BuildError(
                f"{model_dir / f}: tensor {name} has shape {list(entry.shape)} but {CONFIG_FILE} implies {list(shape)}"
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise BuildError(
                f"{model_dir / f}: tensor {name} has dtype {entry.dtype}; only {', '.join(FLOAT_DTYPES)} "
                "weights are supported (no quantized checkpoints)"
            )
        num_params += entry.numel
    return num_params

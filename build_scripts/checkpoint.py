"""Check a Hugging Face checkpoint directory before anything is written from it.

`inspect_checkpoint(model_dir)` reads config.json, generation_config.json, tokenizer.json and
every safetensors header, and either returns a `Checkpoint` that the engine can load or raises
`BuildError` with ONE message naming the file and the problem. The weights are checked by the
torch engine's own `check_checkpoint`, the check it runs before loading, so a checkpoint that
passes here is one the engine accepts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engines.torch.model_config import ModelConfig
from engines.torch.models import config_from_hf
from engines.torch.weights import WeightsError, check_checkpoint

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
"""Copied into the engine when present: the serving layer may want the chat template."""


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
    try:
        weights = check_checkpoint(model_dir, cfg)
    except WeightsError as e:
        raise BuildError(str(e)) from e

    gen_path, cfg_path = model_dir / GENERATION_CONFIG_FILE, model_dir / CONFIG_FILE
    # generation_config.json is what transformers' generate() uses, so its ids come first.
    eos = _ids(gen.get("eos_token_id"), gen_path) + _ids(list(cfg.eos_token_ids), cfg_path)
    bos = _ids(gen.get("bos_token_id"), gen_path) or _ids(cfg.bos_token_id, cfg_path)
    extras = [f for f in (GENERATION_CONFIG_FILE, TOKENIZER_FILE, *TOKENIZER_EXTRAS) if (model_dir / f).is_file()]
    return Checkpoint(
        model_dir=model_dir,
        config=cfg,
        weight_files=weights.weight_files,
        index_file=weights.index_file,
        extra_files=tuple(sorted(extras)),
        num_params=weights.num_params,
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
        return config_from_hf(data, where=str(path))
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

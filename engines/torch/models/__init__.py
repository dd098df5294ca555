"""The decoder architectures the torch engine runs, and config.json read through them.

One file per architecture (`llama.py`, `mistral.py`, `qwen2.py`), each an `Architecture`
(`base.py`) over the shared layers (`layers.py`). Adding one is a new file beside them, with its
own layers if it needs them, and one entry in `_ARCHITECTURES` below (plus its import).
"""
from __future__ import annotations

from pathlib import Path

from engines.torch.model_config import ModelConfig, read_config_json
from engines.torch.models.base import Architecture
from engines.torch.models.llama import Llama
from engines.torch.models.mistral import Mistral
from engines.torch.models.qwen2 import Qwen2

_ARCHITECTURES: tuple[Architecture, ...] = (Llama(), Mistral(), Qwen2())

BY_NAME: dict[str, Architecture] = {a.name: a for a in _ARCHITECTURES}
"""Hugging Face architecture name (config.json `architectures[0]`) -> architecture."""
BY_MODEL_TYPE: dict[str, Architecture] = {a.model_type: a for a in _ARCHITECTURES}
"""config.json `model_type` -> architecture, for a config that lists no `architectures`."""
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(BY_NAME)


def architecture(name: str) -> Architecture:
    """The architecture called `name`; an unlisted name runs as Llama (check_architecture=False)."""
    return BY_NAME.get(name) or BY_NAME[Llama.name]


def config_from_hf(d: dict, *, where: str = "config.json", check_architecture: bool = True) -> ModelConfig:
    """The ModelConfig of a parsed HF config.json (transformers 4.x or 5.x layout), read by its
    architecture. check_architecture=False accepts any architecture and reads it as Llama."""
    names = d.get("architectures") or []
    by_type = BY_MODEL_TYPE.get(d.get("model_type", ""))
    name = names[0] if names else (by_type.name if by_type else "")
    if check_architecture and name not in BY_NAME:
        raise ValueError(
            f"{where}: architecture {name or '(none given)'!r} is not supported by the torch engine; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture(name).read_config(d, where, name)


def config_from_dir(model_dir: str | Path, *, check_architecture: bool = True) -> ModelConfig:
    """The ModelConfig of `model_dir/config.json`."""
    data, where = read_config_json(model_dir)
    return config_from_hf(data, where=where, check_architecture=check_architecture)


def expected_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `cfg` must hold, by its Hugging Face name, with its shape."""
    return architecture(cfg.architecture).tensor_shapes(cfg)

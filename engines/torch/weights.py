"""Find, check and load a checkpoint's safetensors weights (one file or index-sharded).

`check_checkpoint` is the one check of a checkpoint's weights: the engine runs it before loading
and `make build-engine` before writing an engine, so both accept exactly the same checkpoints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engines.torch.model_config import ModelConfig
from engines.torch.models import expected_tensor_shapes
from engines.torch.safetensors_io import FLOAT_DTYPES, SafetensorsError, TensorEntry, read_tensor_entries

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some checkpoints carry that the engine recomputes or does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """The checkpoint's weights are unusable; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class CheckedWeights:
    """A checkpoint's weights that passed `check_checkpoint`."""

    files: dict[str, Path]
    """Tensor name -> the safetensors file holding it, for every tensor the model needs."""
    weight_files: tuple[str, ...]
    """Safetensors file names in the checkpoint directory, sorted."""
    index_file: str | None
    """model.safetensors.index.json when the weights are sharded, else None."""
    num_params: int
    """Elements in the needed tensors."""


def check_checkpoint(model_dir: str | Path, cfg: ModelConfig) -> CheckedWeights:
    """Check every tensor `cfg` needs is present, float and of the right shape, reading headers only.

    The index wins over a single model.safetensors. Raises WeightsError on the first problem:
    no weights, a bad index or shard, a corrupt or truncated file, a tensor missing, of the
    wrong shape or dtype, or an extra tensor (which usually means config.json does not describe
    these weights).
    """
    model_dir = Path(model_dir)
    weight_map = _read_index(model_dir)
    if weight_map is not None:
        weight_files = sorted(set(weight_map.values()))
    elif (model_dir / SINGLE_FILE).is_file():
        weight_files = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.safetensors"))
        seen = f"found {', '.join(found[:3])}: " if found else ""
        raise WeightsError(
            f"{model_dir} holds no weights: expected {SINGLE_FILE} or {INDEX_FILE} "
            f"({seen}convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )

    tensors: dict[str, tuple[str, TensorEntry]] = {}
    for f in weight_files:
        try:
            entries = read_tensor_entries(model_dir / f)
        except SafetensorsError as e:
            raise WeightsError(f"{model_dir / f} is not a usable safetensors file: {e}") from e
        for name, entry in entries.items():
            if weight_map is None or weight_map.get(name) == f:
                tensors[name] = (f, entry)
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in tensors:
                raise WeightsError(f"{model_dir / f}: tensor {name} is missing although {INDEX_FILE} places it there")

    index_file = INDEX_FILE if weight_map is not None else None
    num_params = _check_tensors(model_dir, index_file or SINGLE_FILE, cfg, tensors)
    files = {name: model_dir / tensors[name][0] for name in expected_tensor_shapes(cfg)}
    return CheckedWeights(files, tuple(weight_files), index_file, num_params)


def load_weights(
    model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Check the checkpoint, then load every needed tensor converted to `dtype` on `device`."""
    by_file: dict[Path, list[str]] = {}
    for name, path in check_checkpoint(model_dir, cfg).files.items():
        by_file.setdefault(path, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        # One tensor at a time, converted on the way, so peak host memory stays near one tensor.
        with safe_open(path, framework="pt", device="cpu") as sf:
            for name in names:
                out[name] = sf.get_tensor(name).to(device=device, dtype=dtype)
    return out


def _read_index(model_dir: Path) -> dict[str, str] | None:
    """The index's tensor -> shard map, its shards checked to exist; None when there is no index."""
    index = model_dir / INDEX_FILE
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{index} is not valid JSON ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise WeightsError(f"{index} has no 'weight_map' object of tensor name -> file name")
    for f in sorted(set(weight_map.values())):
        if Path(f).name != f or not f.endswith(".safetensors"):
            raise WeightsError(f"{index} names shard {f!r}; shards must be .safetensors files beside the index")
        if not (model_dir / f).is_file():
            raise WeightsError(f"{model_dir / f} is missing: it is a shard named in {index}")
    return weight_map


def _check_tensors(
    model_dir: Path, weights: str, cfg: ModelConfig, tensors: dict[str, tuple[str, TensorEntry]]
) -> int:
    """Every expected tensor present, float, of the right shape, and no extra; returns the parameter count."""
    expected = expected_tensor_shapes(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(
            f"{model_dir / weights}: the weights lack tensor(s) {', '.join(missing[:5])}{more} that "
            "config.json implies (num_hidden_layers, tie_word_embeddings, biases)"
        )
    extra = sorted(
        n for n in tensors
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    )
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise WeightsError(
            f"{model_dir / tensors[extra[0]][0]}: tensor(s) {', '.join(extra[:5])}{more} are not accounted for by "
            "config.json; check num_hidden_layers, attention_bias, mlp_bias and tie_word_embeddings"
        )
    num_params = 0
    for name, shape in expected.items():
        f, entry = tensors[name]
        if entry.shape != shape:
            raise WeightsError(
                f"{model_dir / f}: tensor {name} has shape {list(entry.shape)} but config.json implies {list(shape)}"
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise WeightsError(
                f"{model_dir / f}: tensor {name} has dtype {entry.dtype}; only {', '.join(FLOAT_DTYPES)} "
                "weights are supported (no quantized checkpoints)"
            )
        num_params += entry.numel
    return num_params

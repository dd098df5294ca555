"""Find, check and load a checkpoint's safetensors weights (one file or index-sharded)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engines.torch.model_config import ModelConfig, expected_tensor_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some checkpoints carry that the engine recomputes or does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """The checkpoint's weight files are missing, or a tensor is absent or has the wrong shape."""


def tensor_files(model_dir: str | Path) -> dict[str, Path]:
    """Map each tensor name in the checkpoint to the safetensors file that holds it."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {e}") from e
        files = {name: model_dir / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise WeightsError(f"{f} is named in {index} but is missing")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as sf:
            return {name: single for name in sf.keys()}
    raise WeightsError(
        f"{model_dir} holds no safetensors weights: expected {SINGLE_FILE} or {INDEX_FILE} "
        "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))"
    )


def check_checkpoint(model_dir: str | Path, cfg: ModelConfig) -> dict[str, Path]:
    """Check every tensor `cfg` needs is present with the right shape, reading headers only.

    Returns the tensor -> file map of the needed tensors. Raises WeightsError naming the file,
    tensor and both shapes on the first problem; unexpected extra tensors are an error too,
    since they usually mean config.json does not describe these weights.
    """
    files = tensor_files(model_dir)
    expected = expected_tensor_shapes(cfg)
    missing = [n for n in expected if n not in files]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(f"{model_dir}: checkpoint lacks tensors {missing[:5]}{more} that config.json implies")
    extra = [
        n for n in files
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if extra:
        raise WeightsError(
            f"{model_dir}: checkpoint has tensors config.json does not account for, e.g. {sorted(extra)[:5]}; "
            "check num_hidden_layers, attention_bias, mlp_bias and tie_word_embeddings"
        )
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as sf:
            for name in names:
                found = tuple(sf.get_slice(name).get_shape())
                if found != expected[name]:
                    raise WeightsError(
                        f"{path}: tensor {name} has shape {list(found)}, expected {list(expected[name])} from config.json"
                    )
    return {n: files[n] for n in expected}


def load_weights(
    model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Check the checkpoint, then load every needed tensor converted to `dtype` on `device`."""
    files = check_checkpoint(model_dir, cfg)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        # One tensor at a time, converted on the way, so peak host memory stays near one tensor.
        with safe_open(path, framework="pt", device="cpu") as sf:
            for name in names:
                out[name] = sf.get_tensor(name).to(device=device, dtype=dtype)
    return out

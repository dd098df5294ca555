"""Write a checkpoint directory with seeded random weights for any supported config.

For tests and demos that need a real-shaped model without downloading one (or importing
transformers). Norm weights are drawn near 1 and everything else with a spread large enough
that logits are far from uniform, so greedy decoding is not dominated by ties.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engines.torch.model_config import ModelConfig, expected_tensor_shapes


def write_random_checkpoint(model_dir: str | Path, config: dict, seed: int = 0, std: float = 0.2) -> ModelConfig:
    """Write config.json and model.safetensors (float32) into `model_dir`; return the parsed config."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_hf(config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_tensor_shapes(cfg).items():
        noise = torch.randn(shape, generator=g)
        tensors[name] = 1 + 0.1 * noise if name.endswith("norm.weight") else std * noise
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return cfg

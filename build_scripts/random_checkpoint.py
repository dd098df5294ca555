"""Write a checkpoint directory with seeded random weights for any supported config.

The demo model and the tests use it to get real-shaped models without downloading one. The
same seed writes the same bytes (safetensors orders tensors deterministically; JSON keys are
sorted).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engines.torch.model_config import ModelConfig
from engines.torch.models import config_from_hf, expected_tensor_shapes


def write_random_checkpoint(model_dir: str | Path, config: dict, seed: int = 0, std: float = 0.2,
                            norm_jitter: float = 0.1, dtype: str = "float32",
                            progress: bool | None = False) -> ModelConfig:
    """Write config.json and model.safetensors into `model_dir`; return the parsed config.

    std: spread of the normal init of every matrix. 0.02 is Hugging Face's initializer_range;
      tests use a larger one so logits are far from uniform and greedy decoding has no near-ties.
    norm_jitter: norm weights are 1 + norm_jitter * noise (non-zero catches a skipped norm weight).
    progress: tqdm bar over tensors; None shows it only on a terminal.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = config_from_hf(config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    shapes = expected_tensor_shapes(cfg)
    for name, shape in tqdm(shapes.items(), desc="random weights", unit="tensor",
                            disable=None if progress is None else not progress):
        noise = torch.randn(shape, generator=g)
        t = 1 + norm_jitter * noise if name.endswith("norm.weight") else std * noise
        tensors[name] = t.to(getattr(torch, dtype))
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return cfg

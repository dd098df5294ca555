"""`Architecture`: what one Hugging Face decoder architecture adds to the shared layers.

An architecture names itself as config.json does, reads the few config.json fields that differ
between architectures (which projections carry a bias, whether a sliding window applies), says
which tensors its checkpoints hold, and builds its model. The defaults are the Llama family's,
since the shared layers (`layers.py`) are Llama's; a subclass overrides only what differs.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from engines.torch.model_config import ModelConfig, common_fields
from engines.torch.models.layers import CausalLM, decoder_tensor_shapes


class Architecture:
    """One decoder architecture the torch engine runs (see the module docstring)."""

    name: ClassVar[str]
    """config.json's `architectures[0]`, e.g. "LlamaForCausalLM"."""
    model_type: ClassVar[str]
    """config.json's `model_type`, e.g. "llama": names the architecture when `architectures` is absent."""
    model_class: ClassVar[type[CausalLM]] = CausalLM
    """The model it builds: the shared CausalLM, or a subclass with layers of its own."""

    def read_config(self, d: dict, where: str, architecture: str) -> ModelConfig:
        """The ModelConfig of a parsed config.json: the fields every architecture reads alike, then
        this one's biases and sliding window. `architecture` is the name recorded: the config's
        own, which is not `self.name` when an unlisted architecture runs as Llama."""
        return ModelConfig(architecture=architecture, **common_fields(d, where), **self.biases(d),
                           sliding_window=self.sliding_window(d))

    def biases(self, d: dict) -> dict[str, bool]:
        """Which projections carry a bias, as ModelConfig's qkv_bias, o_bias and mlp_bias:
        `attention_bias` for q/k/v/o and `mlp_bias` for gate/up/down, both false by default."""
        attention = bool(d.get("attention_bias", False))
        return {"qkv_bias": attention, "o_bias": attention, "mlp_bias": bool(d.get("mlp_bias", False))}

    def sliding_window(self, d: dict) -> int | None:
        """`sliding_window`, unless `use_sliding_window` (Qwen2's switch, default true) turns it off.
        Recorded, not applied (see ModelConfig.sliding_window)."""
        return d.get("sliding_window") if d.get("use_sliding_window", True) else None

    def tensor_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of `cfg` holds, by its Hugging Face name, with its shape: the
        shared CausalLM's. An architecture with layers of its own adds or renames tensors here."""
        return decoder_tensor_shapes(cfg)

    def build(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> CausalLM:
        """The model over already-loaded tensors (see `weights.load_weights`), without copying them."""
        return self.model_class.from_weights(cfg, weights)

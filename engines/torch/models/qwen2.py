"""Qwen2 (and Qwen2.5): Llama's layers with fixed attention biases.

Follows transformers' models/qwen2/modeling_qwen2.py: q/k/v projections always carry a bias and
o_proj never does, whatever `attention_bias` says; the MLP bias is read as Llama's. The sliding
window only counts when `use_sliding_window` is true (the default reading already honours it).
"""
from __future__ import annotations

from engines.torch.models.base import Architecture


class Qwen2(Architecture):
    """Qwen2ForCausalLM."""

    name = "Qwen2ForCausalLM"
    model_type = "qwen2"

    def biases(self, d: dict) -> dict[str, bool]:
        return {**super().biases(d), "qkv_bias": True, "o_bias": False}

"""Llama (1, 2, 3, 3.1+): the architecture the shared layers implement.

Follows transformers' models/llama/modeling_llama.py. Everything `Architecture` does by default is
Llama's: `attention_bias` switches the q/k/v/o biases together, `mlp_bias` the MLP's, and rope
scaling (linear, llama3) is read with the common fields.
"""
from __future__ import annotations

from engines.torch.models.base import Architecture


class Llama(Architecture):
    """LlamaForCausalLM; also what an unlisted architecture runs as when the check is off."""

    name = "LlamaForCausalLM"
    model_type = "llama"

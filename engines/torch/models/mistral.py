"""Mistral: Llama's layers, with a sliding attention window in the config.

Follows transformers' models/mistral/modeling_mistral.py, whose decoder is Llama's. The one
difference, attention limited to the last `sliding_window` tokens (Mistral 7B v0.1), is recorded
but not applied: the engine warns when max_seq_len exceeds the window. Biases are read as Llama's.
"""
from __future__ import annotations

from engines.torch.models.base import Architecture


class Mistral(Architecture):
    """MistralForCausalLM."""

    name = "MistralForCausalLM"
    model_type = "mistral"

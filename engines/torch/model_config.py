"""The decoder's shape, and the part of a Hugging Face `config.json` every architecture reads alike.

`ModelConfig` is one plain dataclass for every architecture. The fields only some architectures
interpret (biases, sliding window) are read by the architecture itself (`engines/torch/models/`),
which is also where a config.json becomes a ModelConfig: `models.config_from_dir`.
Pure Python: importing this module does not import torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """How rotary frequencies are stretched for long contexts (HF `rope_scaling`/`rope_parameters`)."""

    rope_type: str = "default"
    """"default" (none), "linear" (positions / factor) or "llama3" (Llama 3.1 frequency bands)."""
    factor: float = 1.0
    """Context stretch factor ("linear", "llama3")."""
    low_freq_factor: float = 1.0
    """"llama3": wavelengths above original_max_position_embeddings / this are divided by factor."""
    high_freq_factor: float = 4.0
    """"llama3": wavelengths below original_max_position_embeddings / this are kept as they are."""
    original_max_position_embeddings: int = 8192
    """"llama3": context length the model was pretrained with."""

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"config.json: rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ValueError(f"config.json: rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                "config.json: llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and constants of a Llama-family decoder; read it with `engines.torch.models.config_from_dir`."""

    architecture: str
    """HF architecture name, e.g. "LlamaForCausalLM"."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    """`num_hidden_layers` in config.json."""
    num_heads: int
    """Query heads (`num_attention_heads`)."""
    num_kv_heads: int
    """Key/value heads (`num_key_value_heads`); fewer than num_heads means grouped-query attention."""
    head_dim: int
    """Per-head width; defaults to hidden_size / num_heads when config.json has none."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    """lm_head shares the embedding matrix (no lm_head.weight in the checkpoint)."""
    qkv_bias: bool
    """q/k/v projections carry a bias (read by the architecture: Qwen2 always; Llama when `attention_bias`)."""
    o_bias: bool
    """o_proj carries a bias (read by the architecture: Llama `attention_bias`; never Qwen2)."""
    mlp_bias: bool = False
    """gate/up/down projections carry a bias (read by the architecture: `mlp_bias`)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    """config.json's `eos_token_id`, which may be one id or a list."""
    sliding_window: int | None = None
    """Recorded but NOT applied: attention is always full. Outputs match a sliding-window model
    (Mistral v0.1, Qwen2 with use_sliding_window) only while the KV is shorter than the window."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.json: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads


def read_config_json(model_dir: str | Path) -> tuple[dict, str]:
    """`model_dir/config.json` parsed, and its path for error messages."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: {model_dir} is not a Hugging Face checkpoint directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    return data, str(path)


def common_fields(d: dict, where: str) -> dict:
    """The ModelConfig fields every architecture reads alike from a parsed config.json
    (transformers 4.x or 5.x layout), as keyword arguments: all but `architecture`, the biases
    and `sliding_window`. Raises ValueError naming `where` and the field."""

    def need(key: str):
        if d.get(key) is None:
            raise ValueError(f"{where}: required field {key!r} is missing")
        return d[key]

    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported; the torch engine implements SwiGLU (silu)")
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    theta, scaling = _rope(d, where)
    eos = d.get("eos_token_id")
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return dict(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        intermediate_size=int(need("intermediate_size")),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(need("max_position_embeddings")),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _rope(d: dict, where: str) -> tuple[float, RopeScaling]:
    """rope_theta and scaling from either layout: transformers 5 writes one `rope_parameters`
    dict holding rope_theta; transformers 4 writes `rope_theta` plus an optional `rope_scaling`."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{where}: per-layer rope_parameters are not supported by the torch engine")
    merged = {**legacy, **params}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported by the torch engine")
    try:
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(merged.get("factor", 1.0)),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                merged.get("original_max_position_embeddings") or d.get("max_position_embeddings") or 8192
            ),
        )
    except ValueError as e:
        raise ValueError(str(e).replace("config.json", where, 1)) from None
    return theta, scaling

"""The decoder layers every architecture shares: RMSNorm, grouped-query attention over the paged
KV cache, the SwiGLU MLP, the pre-norm decoder layer and the causal LM around them.

They follow transformers' Llama (models/llama/modeling_llama.py); Mistral and Qwen2 use them as
they are. Module and parameter names are Hugging Face's, so a checkpoint's tensors load by name:
the parameters of `CausalLM` are the tensors a checkpoint holds (`decoder_tensor_shapes`). An
architecture that needs other layers subclasses these, names its classes in `attention_class`,
`mlp_class` and `layer_class`, and lists its tensors in `Architecture.tensor_shapes`.

Projections that read the same input run as one matmul (q/k/v, gate/up: `fused_projections`):
at load their weights are concatenated once, and the checkpoint-named parameters become views
of the concatenation, so the names and the memory stay those of the checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch.attention import VarlenPlan
from engines.torch.cpu_kernels import fused_ops
from engines.torch.forward_batch import ForwardBatch
from engines.torch.kv_cache import PagedKVCache
from engines.torch.model_config import ModelConfig
from engines.torch.packed_linear import PACK_MAX_ROWS, Linear, max_rows, project, project_float
from engines.torch.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back, exactly as transformers does."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (ops := fused_ops(x)) is not None:  # the same rounding in one pass (kernels/fused_norm.cpp)
            return ops.rms_norm(x, self.weight, self.eps)
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one kernel; the weight multiplies after the
        # cast back, in x's dtype, as in transformers.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)

    def add_forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + h, self(x + h)): a residual add and this norm, in one pass on CPU (x is updated
        in place there: the caller's x is a fresh activation)."""
        if (ops := fused_ops(x)) is not None and x.is_contiguous():
            return x, ops.add_rms_norm_(x, h, self.weight, self.eps)
        x = x + h
        return x, self(x)


class Attention(nn.Module):
    """Grouped-query attention whose keys and values live in the paged cache."""

    fused_projections = {"qkv": ("q_proj", "k_proj", "v_proj")}
    """One matmul for q, k and v: `qkv_weight` (and `qkv_bias`), set by `CausalLM.from_weights`."""
    qkv_packed: torch.Tensor | None = None
    """`qkv_weight` prepacked for oneDNN, where `packed_linear.pack_model` packs."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(h, q_out, bias=cfg.qkv_bias)
        self.k_proj = Linear(h, kv_out, bias=cfg.qkv_bias)
        self.v_proj = Linear(h, kv_out, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_out, h, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache,
                batch: ForwardBatch) -> torch.Tensor:
        R = x.shape[0]
        heads, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = project(x, self.qkv_weight, self.qkv_bias, self.qkv_packed).view(R, heads + 2 * kvh, hd)
        # Write this step's K/V into the sequences' slots first: the attention plan reads a
        # sequence's cached KV back through its block table (attention.py).
        kv_blocks = cache.kv[self.layer]  # [2 (K, V), blocks, block_size, kv_heads, head_dim]
        if (ops := fused_ops(x)) is not None and batch.real is None:
            ops.rope_cache_(qkv, cos, sin, heads, kv_blocks, batch.slots)  # both in one pass, in place
            q, k, v = qkv[:, :heads], qkv[:, heads:heads + kvh], qkv[:, heads + kvh:]
        else:
            qk = apply_rotary(qkv[:, :heads + kvh], cos, sin)  # q and k heads rotated in one pass
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kvh:]
            k_new, v_new = (k, v) if batch.real is None else (k[batch.real], v[batch.real])
            kv_blocks[0].view(-1, kvh, hd).index_copy_(0, batch.slots, k_new)
            kv_blocks[1].view(-1, kvh, hd).index_copy_(0, batch.slots, v_new)
        return self.o_proj(batch.attention.attend(q, k, v, kv_blocks))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    fused_projections = {"gate_up": ("gate_proj", "up_proj")}
    """One matmul for gate and up: `gate_up_weight` (and `gate_up_bias`), set by `CausalLM.from_weights`."""
    gate_up_packed: torch.Tensor | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = project(x, self.gate_up_weight, self.gate_up_bias, self.gate_up_packed)
        if (ops := fused_ops(gate_up)) is not None:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention block then pre-norm MLP block, each with a residual."""

    attention_class: type[Attention] = Attention
    mlp_class: type[MLP] = MLP

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = self.attention_class(cfg, layer)
        self.mlp = self.mlp_class(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, batch):
        """The layer alone, x in and x out. `CausalLM.forward` chains `forward_normed` instead."""
        x, h = self.post_attention_layernorm.add_forward(x, self.self_attn(self.input_layernorm(x), cos, sin, cache, batch))
        return x + self.mlp(h)

    def forward_normed(self, x, h, cos, sin, cache, batch, next_norm: RMSNorm):
        """`forward` for x whose input norm h is already taken; returns (x out, next_norm(x out)):
        the residual add that ends this layer and the norm that starts the next in one pass
        (`RMSNorm.add_forward`), where `forward` and the next layer take two."""
        x, h = self.post_attention_layernorm.add_forward(x, self.self_attn(h, cos, sin, cache, batch))
        return next_norm.add_forward(x, self.mlp(h))


class Decoder(nn.Module):
    """Embeddings, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, layer_class: type[DecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer_class(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole model; build it with `CausalLM.from_weights`."""

    layer_class: type[DecoderLayer] = DecoderLayer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg, self.layer_class)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: RotaryEmbedding | None = None

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> "CausalLM":
        """Wrap already-loaded tensors (see `weights.load_weights`), copying only what is fused.

        Takes `weights` over: the tensors of fused projections are replaced in it by views of
        their concatenation (module docstring), each original released as soon as it is copied,
        so loading needs no second copy of the model."""
        with torch.device("meta"):  # no throwaway random init of a model-sized set of tensors
            model = cls(cfg)
        fused = {}
        for name, module in model.named_modules():
            for group, parts in getattr(module, "fused_projections", {}).items():
                for kind in ("weight", "bias"):
                    keys = [f"{name}.{part}.{kind}" for part in parts]
                    fused[name, f"{group}_{kind}"] = _concatenate(weights, keys) if keys[0] in weights else None
        if cfg.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        model.load_state_dict(weights, strict=True, assign=True)
        for (name, attr), tensor in fused.items():
            setattr(model.get_submodule(name), attr, tensor)
        model.requires_grad_(False).eval()
        device = weights["model.embed_tokens.weight"].device
        model.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device)
        return model

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, batch: ForwardBatch, cache: PagedKVCache, all_logits: bool = False) -> torch.Tensor:
        """Run the batch, writing its K/V into `cache`; float32 logits of each run's last token
        [B, vocab], or of every row [rows, vocab] when `all_logits` (`batch.per_run` regroups them)."""
        x = self.model.embed_tokens(batch.tokens)
        cos, sin = self.rope.cos_sin(batch.positions, x.dtype)
        layers = self.model.layers
        h = layers[0].input_layernorm(x)
        if (native := self._native_decode(batch, x)) is not None:  # the same calls, in C++
            ops, weights, group = native
            h = ops.decode_layers(x, h, weights, cos, sin, cache.kv, batch.slots, group.block_tables, group.kv_lens,
                                  self.cfg.num_heads, self.cfg.rms_norm_eps)
        else:
            for i, layer in enumerate(layers):
                next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
                x, h = layer.forward_normed(x, h, cos, sin, cache, batch, next_norm)
        if not all_logits:
            h = h[batch.last]  # the final norm is per row: taken over every row, kept for the last
        return project_float(h, self.lm_head.weight, self.lm_head.bias, self.lm_head.packed)

    native_decode = True
    """Run a pure decode step's layers through the CPU kernels' `decode_layers` where it applies
    (`_native_decode`); the tests turn it off to compare the two."""
    _native_weights: list[torch.Tensor] | None = None
    _native_rows = 0
    """The most rows every prepacked weight takes (`packed_linear.max_rows`)."""

    def _native_decode(self, batch: ForwardBatch, x: torch.Tensor):
        """(kernels, per-layer tensors, decode group) when this forward is a pure decode step on the
        "paged" path of a model whose layers are exactly this module's with prepacked weights:
        `decode_layers` (kernels/decode_layers.cpp) then makes the calls `forward_normed` would.
        Else None."""
        plan = batch.attention
        if (not self.native_decode or batch.real is not None or (ops := fused_ops(x)) is None
                or not isinstance(plan, VarlenPlan) or plan.kernel is None or plan.runs or len(plan.groups) != 1
                or plan.groups[0].end - plan.groups[0].start != x.shape[0]):
            return None
        if self._native_weights is None:
            self._native_weights, self._native_rows = self._collect_native_weights()
        if not self._native_weights or x.shape[0] > self._native_rows:  # more rows: plain weights (`project`)
            return None
        return ops, self._native_weights, plan.groups[0]

    def _collect_native_weights(self) -> tuple[list[torch.Tensor], int]:
        """`decode_layers`' tensors, 10 per layer, and the most rows all its packed weights take;
        ([], 0) when a layer is not exactly DecoderLayer, Attention, MLP and RMSNorm or a weight
        is not prepacked."""
        empty = torch.empty(0)
        layers = self.model.layers
        out, rows = [], PACK_MAX_ROWS
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            packed = (attn.qkv_packed, attn.o_proj.packed, mlp.gate_up_packed, mlp.down_proj.packed)
            if (type(layer) is not DecoderLayer or type(attn) is not Attention or type(mlp) is not MLP
                    or any(type(n) is not RMSNorm for n in (layer.input_layernorm, layer.post_attention_layernorm, nxt))
                    or any(p is None for p in packed)):
                return [], 0
            rows = min([rows, *(max_rows(p) for p in packed)])
            out += [attn.qkv_packed, _or(attn.qkv_bias, empty), attn.o_proj.packed, _or(attn.o_proj.bias, empty),
                    layer.post_attention_layernorm.weight, mlp.gate_up_packed, _or(mlp.gate_up_bias, empty),
                    mlp.down_proj.packed, _or(mlp.down_proj.bias, empty), nxt.weight]
        return out, rows


def _or(t: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return default if t is None else t


def _concatenate(weights: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """One tensor of these, concatenated along the output dimension; each entry of `weights` is
    replaced by its view of it."""
    sizes = [weights[k].shape[0] for k in keys]
    whole = torch.cat([weights.pop(k) for k in keys])
    for k, part in zip(keys, whole.split(sizes)):
        weights[k] = part
    return whole


def decoder_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The parameters of `CausalLM(cfg)`, by Hugging Face name, with their shapes, in declaration
    order, less lm_head when it is tied to the embeddings: the tensors a checkpoint holds."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for name, out_dim, in_dim, bias in (
            ("self_attn.q_proj", q_out, h, cfg.qkv_bias),
            ("self_attn.k_proj", kv_out, h, cfg.qkv_bias),
            ("self_attn.v_proj", kv_out, h, cfg.qkv_bias),
            ("self_attn.o_proj", h, q_out, cfg.o_bias),
            ("mlp.gate_proj", inter, h, cfg.mlp_bias),
            ("mlp.up_proj", inter, h, cfg.mlp_bias),
            ("mlp.down_proj", h, inter, cfg.mlp_bias),
        ):
            shapes[p + name + ".weight"] = (out_dim, in_dim)
            if bias:
                shapes[p + name + ".bias"] = (out_dim,)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes

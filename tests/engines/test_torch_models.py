"""The torch engine's architectures (engines/torch/models/): how each reads config.json, and that
the tensors it expects in a checkpoint are exactly the parameters of the model it builds."""
from __future__ import annotations

import pytest
import torch

from engines.torch.models import BY_MODEL_TYPE, BY_NAME, architecture, config_from_hf, expected_tensor_shapes

SHAPE = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=32, max_position_embeddings=64)


def config(name: str, **extra):
    return config_from_hf({"architectures": [name], **SHAPE, **extra})


@pytest.mark.parametrize("name", sorted(BY_NAME))
@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "mlp_bias": True}, {"tie_word_embeddings": True}])
def test_expected_tensors_are_the_parameters_of_the_built_model(name, extra):
    cfg = config(name, **extra)
    with torch.device("meta"):
        model = architecture(name).model_class(cfg)
    params = {n: tuple(t.shape) for n, t in model.state_dict().items()
              if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    assert list(expected_tensor_shapes(cfg).items()) == list(params.items())


@pytest.mark.parametrize("attention_bias", [False, True])
def test_biases_follow_each_architecture(attention_bias):
    for name in ("LlamaForCausalLM", "MistralForCausalLM"):  # one flag for q/k/v/o
        cfg = config(name, attention_bias=attention_bias, mlp_bias=True)
        assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (attention_bias, attention_bias, True)
    cfg = config("Qwen2ForCausalLM", attention_bias=attention_bias)  # q/k/v always, o never
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (True, False, False)


def test_sliding_window_is_kept_only_while_use_sliding_window_allows():
    assert config("MistralForCausalLM", sliding_window=32).sliding_window == 32
    assert config("Qwen2ForCausalLM", sliding_window=32, use_sliding_window=False).sliding_window is None


def test_model_type_names_the_architecture_when_architectures_is_absent():
    for model_type, arch in BY_MODEL_TYPE.items():
        assert config_from_hf({"model_type": model_type, **SHAPE}).architecture == arch.name


def test_an_unlisted_architecture_runs_as_llama_only_when_the_check_is_off():
    with pytest.raises(ValueError, match=r"'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"):
        config("GPT2LMHeadModel")
    cfg = config_from_hf({"architectures": ["GPT2LMHeadModel"], **SHAPE, "attention_bias": True},
                         check_architecture=False)
    assert cfg.architecture == "GPT2LMHeadModel" and (cfg.qkv_bias, cfg.o_bias) == (True, True)
    assert architecture(cfg.architecture) is BY_NAME["LlamaForCausalLM"]


@pytest.mark.parametrize("name, extra", [("LlamaForCausalLM", {}), ("Qwen2ForCausalLM", {"attention_bias": True}),
                                         ("LlamaForCausalLM", {"mlp_bias": True})])
def test_fused_projections_hold_the_checkpoint_tensors_without_a_copy(name, extra):
    cfg = config(name, **extra)
    weights = {n: torch.randn(shape) for n, shape in expected_tensor_shapes(cfg).items()}
    originals = dict(weights)
    model = architecture(name).build(cfg, weights)
    for i, layer in enumerate(model.model.layers):
        for module, group, parts in ((layer.self_attn, "qkv", ("q_proj", "k_proj", "v_proj")),
                                     (layer.mlp, "gate_up", ("gate_proj", "up_proj"))):
            prefix = f"model.layers.{i}.{'self_attn' if group == 'qkv' else 'mlp'}."
            for kind in ("weight", "bias"):
                fused = getattr(module, f"{group}_{kind}")
                tensors = [getattr(getattr(module, p), kind) for p in parts]
                if tensors[0] is None:
                    assert fused is None
                    continue
                # Same values as the checkpoint's tensors, and the named parameters share its memory.
                assert torch.equal(fused, torch.cat([originals[prefix + p + "." + kind] for p in parts]))
                assert all(t.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for t in tensors)
    assert list(model.state_dict()) == list(expected_tensor_shapes(cfg)) + (["lm_head.weight"] if cfg.tie_word_embeddings else [])

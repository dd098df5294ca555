"""The torch engine computes what Hugging Face transformers computes, on the same weights.

Each case builds a tiny transformers model with seeded random weights, saves it as a real
safetensors checkpoint, and loads it with TorchEngine. A ragged batch of prompts is prefilled
in one call and decoded greedily in one call per step; every logit is compared with a plain
transformers forward over the same tokens, one sequence at a time. Every attention path runs
the same checks (`PATHS`).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

from engines.base import PrefillRequest
from engines.loader import load_engine
from engines.manifest import Manifest, WeightFile
from engines.torch import attention as attention_module
from engines.torch.engine import TorchEngine
from engines.torch.models import config_from_hf, expected_tensor_shapes
from engines.torch.weights import WeightsError
from tests.engines.torch_probe import decode_with_logits, prefill_with_logits

PROMPT_LENS = (5, 17, 33, 9, 17)  # two of one length: a decode group needs no mask for them
# Every numerical check runs on the CPU, and on CUDA where a GPU is present.
DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
DECODE_STEPS = 32
TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2)

CASES = {
    # GQA (2 query heads per KV head) and Llama 3.1 rope scaling; original_max_position_embeddings
    # is small so the 16-dim heads have high, blended and stretched frequency bands all in play.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # One KV head for four query heads, and head_dim * heads != hidden_size (as in Mistral NeMo).
    # The sliding window is longer than any sequence here, so full attention is exact.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=4096, rope_theta=1e6)),
    # q/k/v biases (no o bias) and lm_head tied to the embeddings.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


PATHS = ("varlen", "varlen-split", "padded")
"""Attention paths under test: varlen with its default decode groups (here all sequences in one
group, masked to each one's length), varlen with one group per KV length (no group overhead),
and padded."""


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    """The attention path to pass as TorchEngine(attention=...)."""
    if request.param == "varlen-split":
        monkeypatch.setattr(attention_module, "GROUP_OVERHEAD_TOKENS", 0)
        return "varlen"
    return request.param


def make_checkpoint(path, case: str, seed: int = 0, **save_kwargs):
    """Save a transformers model with random weights under `path`; return it (float32, eval)."""
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**TINY, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        # transformers initialises biases to 0 and norms to 1; random values make them matter.
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(path, **save_kwargs)
    return model


def prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_engine(engine: TorchEngine, prompt_ids: list[list[int]], steps: int):
    """Prefill all prompts in one call, then decode them together; return per sequence its
    prefill logits [P, V], its decode-step logits [steps, V] and all its tokens."""
    ids = [f"req{i}" for i in range(len(prompt_ids))]
    first, logits = prefill_with_logits(
        engine, [PrefillRequest(i, p) for i, p in zip(ids, prompt_ids)], all_positions=True)
    logits = logits.float().cpu()
    prefill_logits = [logits[b, : len(p)] for b, p in enumerate(prompt_ids)]
    tokens = [list(p) + [first.tokens[i]] for i, p in zip(ids, prompt_ids)]
    step_logits: list[list[torch.Tensor]] = [[] for _ in ids]
    for _ in range(steps):
        result, logits = decode_with_logits(engine, ids)
        logits = logits.float().cpu()
        for b, i in enumerate(ids):
            step_logits[b].append(logits[b])
            tokens[b].append(result.tokens[i])
    engine.free(ids)
    assert engine.kv_blocks_used(engine.tier) == 0
    return prefill_logits, [torch.stack(s) for s in step_logits], tokens


def reference_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    """transformers' float32 logits at every position of one unpadded sequence."""
    with torch.no_grad():
        return hf_model(torch.tensor([tokens], device=hf_model.device)).logits[0].float().cpu()


def compare(hf_model, engine: TorchEngine, prompt_ids):
    """Max |engine - transformers| over prefill and decode logits, the share of steps where the
    engine's token is transformers' argmax, and the largest |logit| (the scale of the numbers)."""
    hf_model.to(engine.device)  # the reference runs on the engine's device, with its kernels
    prefill_logits, step_logits, tokens = run_engine(engine, prompt_ids, DECODE_STEPS)
    worst_prefill = worst_decode = scale = 0.0
    agree = []
    for p, pre, dec, toks in zip(prompt_ids, prefill_logits, step_logits, tokens):
        # Causality: position t's logits depend on tokens[:t+1] only, so one forward over the
        # final sequence is the reference for the prefill and for every decode step.
        ref = reference_logits(hf_model, toks[:-1])
        worst_prefill = max(worst_prefill, (ref[: len(p)] - pre).abs().max().item())
        worst_decode = max(worst_decode, (ref[len(p):] - dec).abs().max().item())
        agree.append(ref[len(p) - 1:].argmax(-1) == torch.tensor(toks[len(p):]))
        scale = max(scale, ref.abs().max().item())
    return worst_prefill, worst_decode, torch.cat(agree).float().mean().item(), scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_matches_transformers(case, device, path, tmp_path):
    if device.startswith("cuda"):
        # TF32 matmuls would round to 10 mantissa bits; the reference is true float32.
        torch.backends.cuda.matmul.allow_tf32 = False
    hf_model = make_checkpoint(tmp_path, case)
    engine = TorchEngine(tmp_path, device=device, dtype="float32", attention=path)
    worst_prefill, worst_decode, agreement, _ = compare(hf_model, engine, prompts(hf_model.config.vocab_size))
    assert worst_prefill <= 1e-4, f"{case}: prefill logits differ by {worst_prefill}"
    assert worst_decode <= 1e-4, f"{case}: decode logits differ by {worst_decode}"
    assert agreement == 1.0, f"{case}: greedy tokens differ from transformers' argmax"


def test_sharded_checkpoint_loads_the_same_model(tmp_path):
    hf_model = make_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    engine = TorchEngine(tmp_path, device="cpu")
    worst_prefill, worst_decode, agreement, _ = compare(hf_model, engine, prompts(hf_model.config.vocab_size))
    assert max(worst_prefill, worst_decode) <= 1e-4 and agreement == 1.0
    num_params = sum(p.numel() for p in hf_model.parameters())
    assert engine.describe().model.num_params == num_params


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_matches_transformers_bfloat16(device, path, tmp_path):
    make_checkpoint(tmp_path, "llama")
    hf_bf16 = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    engine = TorchEngine(tmp_path, device=device, dtype="bfloat16", attention=path)
    worst_prefill, worst_decode, agreement, scale = compare(hf_bf16, engine, prompts(256))
    # Both sides round every op to bf16 (8 significant bits) but may order sums differently, so
    # they may disagree by a few units in the last place (ulp) of the largest logits. Allow 4
    # ulps at the largest |logit| (measured: at most 1.5). For scale: bf16 vs float32 logits of
    # the same model differ by ~9 such ulps, so this bound does catch real numerical drift.
    ulp = 2.0 ** (math.floor(math.log2(scale)) - 7)
    assert worst_prefill <= 4 * ulp, f"prefill logits differ by {worst_prefill} (ulp {ulp})"
    assert worst_decode <= 4 * ulp, f"decode logits differ by {worst_decode} (ulp {ulp})"
    # A near-tie can flip an argmax between two bf16 implementations; demand 90% agreement.
    assert agreement >= 0.9, f"greedy tokens agree with transformers on only {agreement:.0%} of steps"


# -- checkpoint errors name the file, the tensor and the field ---------------------------------


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        TorchEngine(tmp_path, device="cpu")


@pytest.mark.parametrize("key, value, message", [
    # config.json that no longer describes the weights: a shape mismatch, then missing tensors.
    ("intermediate_size", 96, r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight "
                              r"has shape \[\d+, \d+\] but config\.json implies \[\d+, \d+\]"),
    ("num_hidden_layers", 3, r"model\.safetensors: the weights lack tensor\(s\) model\.layers\.2\."),
])
def test_checkpoint_not_matching_config_names_file_and_tensor(tmp_path, key, value, message):
    make_checkpoint(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=message):
        TorchEngine(tmp_path, device="cpu")


def test_truncated_weights_are_explained(tmp_path):
    # The engine runs the same check as make build-engine, words for a corrupt file included.
    make_checkpoint(tmp_path, "llama")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"model\.safetensors is not a usable safetensors file: truncated"):
        TorchEngine(tmp_path, device="cpu")


def test_config_reads_transformers_4_layout_and_eos_list():
    # transformers 4.x wrote rope_theta and rope_scaling (with "type") at the top level.
    cfg = config_from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32,
        "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [7, 9],
    })
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 2.0
    assert cfg.eos_token_ids == (7, 9) and cfg.num_kv_heads == 2 and cfg.head_dim == 4
    assert set(expected_tensor_shapes(cfg)) >= {"lm_head.weight", "model.layers.0.self_attn.k_proj.weight"}


def test_engine_directory_opens_through_the_loader(tmp_path):
    hf_model = make_checkpoint(tmp_path, "qwen2")
    (tmp_path / "tokenizer.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    manifest = Manifest(
        backend="torch", architecture="Qwen2ForCausalLM", dtype="float32", max_seq_len=64, kv_block_size=8,
        kv_blocks_device=20, kv_blocks_host=0, bytes_per_block=2 * 2 * 8 * 2 * 16 * 4, tokenizer="tokenizer.json",
        weights=(WeightFile("model.safetensors", weights.stat().st_size, "-"),), weights_sha256="-",
        num_params=sum(p.numel() for p in hf_model.parameters()), eos_token_ids=(2, 3), bos_token_id=1,
    )
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    engine = load_engine(tmp_path, device="cpu")
    info = engine.describe()
    assert (info.block_size, info.devices[0].kv_blocks, info.model.max_seq_len) == (8, 20, 64)
    assert info.bytes_per_block == manifest.bytes_per_block and info.model.num_params == manifest.num_params
    assert info.model.eos_token_ids == (2, 3) and info.model.dtype == "float32"
    assert load_engine(tmp_path, device="cpu", dtype="bfloat16", kv_blocks=5).describe().devices[0].kv_blocks == 5

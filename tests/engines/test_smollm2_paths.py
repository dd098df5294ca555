"""The real default model (SmolLM2-135M-Instruct) on every attention path: greedy tokens equal
transformers' for a batch of chat prompts of mixed lengths, prefilled whole or in chunks beside
decoding requests; in bfloat16, every step where the engine's token is not transformers' argmax
is a near tie of transformers' own logits."""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from engines.base import PrefillChunk, PrefillRequest
from engines.torch.engine import TorchEngine

STEPS = 8
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
    "Summarise this text in one sentence: " + " ".join(
        ["The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden barn."] * 20),
]


@pytest.fixture(scope="module")
def prompts(smollm2_engine_dir) -> list[list[int]]:
    """Chat-templated prompts of 35 to ~420 tokens."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_engine_dir / "tokenizer.json"))
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        (smollm2_engine_dir / "chat_template.jinja").read_text())
    return [tok.encode(template.render(messages=[{"role": "user", "content": q}], add_generation_prompt=True)).ids
            for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(smollm2_engine_dir, prompts) -> list[list[int]]:
    """transformers' greedy tokens of each prompt alone, float32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_engine_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([p])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=STEPS, min_new_tokens=STEPS,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(y[0, len(p):].tolist())
    return out


def engine(engine_dir, path: str, dtype: str = "float32") -> TorchEngine:
    return TorchEngine(engine_dir, device="cpu", dtype=dtype, attention=path, max_seq_len=1024, kv_blocks=256)


def greedy(e: TorchEngine, prompts: list[list[int]]) -> list[list[int]]:
    """One prefill of every prompt, then one decode call per step."""
    ids = [f"r{i}" for i in range(len(prompts))]
    first = e.prefill([PrefillRequest(i, p) for i, p in zip(ids, prompts)]).tokens
    out = [[first[i]] for i in ids]
    for _ in range(STEPS - 1):
        step = e.decode(ids).tokens
        for o, i in zip(out, ids):
            o.append(step[i])
    return out


@pytest.mark.parametrize("path", ["paged", "varlen", "padded"])
def test_float32_greedy_tokens_equal_transformers(smollm2_engine_dir, prompts, reference, path):
    assert greedy(engine(smollm2_engine_dir, path), prompts) == reference


@pytest.mark.parametrize("path", ["paged", "varlen"])
def test_chunked_prefill_beside_decodes_gives_the_same_tokens(smollm2_engine_dir, prompts, reference, path):
    e = engine(smollm2_engine_dir, path)  # the padded path's mixed steps: test_chunked_prefill.py
    short, long = [f"r{i}" for i in range(3)], prompts[3]
    first = e.prefill([PrefillRequest(i, p) for i, p in zip(short, prompts[:3])]).tokens
    out = {i: [first[i]] for i in short}
    request = PrefillRequest("long", long)
    for start, end in ((0, 150), (150, 151), (151, len(long))):  # the long prompt in three chunks
        step = e.mixed_step(short, [PrefillChunk(request, start, end)]).tokens
        for i in short:
            out[i].append(step[i])
    out["long"] = [step["long"]]
    while len(out["long"]) < STEPS:
        step = e.decode([i for i in out if len(out[i]) < STEPS]).tokens
        for i, t in step.items():
            out[i].append(t)
    assert [out[i][:STEPS] for i in short + ["long"]] == reference


def test_bfloat16_differs_from_transformers_only_at_near_ties(smollm2_engine_dir, prompts):
    # Two bfloat16 implementations round differently (summation order), so a near tie can flip an
    # argmax and the sequences part there. Teacher-forced: transformers (bfloat16) scores the
    # engine's own sequence; wherever its argmax is not the engine's token, the engine's token must
    # be within 4 bf16 ulps (at the largest logit) of transformers' best.
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_engine_dir, dtype=torch.bfloat16).eval()
    for path in ("paged", "varlen", "padded"):
        ours = greedy(engine(smollm2_engine_dir, path, "bfloat16"), prompts)
        flips = 0
        for p, toks in zip(prompts, ours):
            with torch.inference_mode():
                logits = model(torch.tensor([p + toks[:-1]])).logits[0, len(p) - 1:].float()
            for row, t in zip(logits, toks):
                best = row.max().item()
                ulp = 2.0 ** (math.floor(math.log2(abs(best))) - 7)
                if row.argmax().item() != t:
                    flips += 1
                    assert best - row[t].item() <= 4 * ulp, f"{path}: token {t} is {best - row[t].item()} below the best"
        assert flips <= len(prompts) * STEPS // 10, f"{path}: {flips} steps off transformers' argmax"


def test_native_decode_steps_are_the_python_layers_bit_for_bit(smollm2_engine_dir, prompts, monkeypatch):
    # bfloat16 on the paged path with prepacked weights: a pure decode step's layers run in C++
    # (kernels/decode_layers.cpp) where the kernels build; they must make exactly the Python layers'
    # calls: the same logits bit for bit, and the same KV written.
    from engines.torch.models.layers import CausalLM
    from tests.engines.torch_probe import decode_with_logits, kv_contents

    runs = {}
    for native in (True, False):
        monkeypatch.setattr(CausalLM, "native_decode", native)
        e = engine(smollm2_engine_dir, "paged", "bfloat16")
        ids = [f"r{i}" for i in range(len(prompts))]
        e.prefill([PrefillRequest(i, p) for i, p in zip(ids, prompts)])
        steps = [decode_with_logits(e, ids)[1] for _ in range(3)]
        if native:
            assert e.model._native_weights, "the native path did not apply to SmolLM2 in bfloat16"
        runs[native] = steps, [kv_contents(e, i) for i in ids]
    for a, b in zip(runs[True][0], runs[False][0]):
        assert torch.equal(a, b)
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.equal(a, b)

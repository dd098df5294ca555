"""Sampling: greedy, temperature, top-k, top-p, and per-request seeds that batching cannot disturb."""
from __future__ import annotations

import math

import pytest
import torch

from engines.base import PrefillRequest, SamplingParams
from engines.torch.engine import TorchEngine
from engines.torch.sampler import filtered_probs, make_generator, sample

STEPS = 16
PROMPT = [5, 17, 33, 9, 60]


@pytest.fixture(scope="module")
def engine(model_dir):
    return TorchEngine(model_dir, device="cpu", block_size=4)


def generate(engine, requests: dict[str, tuple[list[int], SamplingParams]], steps: int = STEPS) -> dict[str, list[int]]:
    """Prefill all requests together, decode them together, free them; tokens per request."""
    first = engine.prefill([PrefillRequest(rid, p, s) for rid, (p, s) in requests.items()])
    out = {rid: [t] for rid, t in first.tokens.items()}
    for _ in range(steps - 1):
        for rid, t in engine.decode(list(requests)).tokens.items():
            out[rid].append(t)
    engine.free(list(requests))
    return out


def test_same_seed_same_tokens_whatever_the_neighbours(engine):
    me = (PROMPT, SamplingParams(temperature=1.0, top_p=0.95, seed=1234))
    alone = generate(engine, {"me": me})["me"]
    assert generate(engine, {"me": me})["me"] == alone
    crowd = generate(engine, {
        "n1": ([1, 2, 3], SamplingParams(temperature=0.7, top_k=5, seed=1)),
        "me": me,
        "n2": (list(range(3, 40)), SamplingParams(temperature=1.3)),  # unseeded
        "n3": ([8] * 9, SamplingParams()),  # greedy
    })
    assert crowd["me"] == alone


def test_different_seeds_give_different_sequences(engine):
    runs = [generate(engine, {"r": (PROMPT, SamplingParams(temperature=1.0, seed=s))})["r"] for s in range(4)]
    assert len({tuple(r) for r in runs}) == 4


def test_no_seed_means_fresh_randomness(engine):
    runs = [generate(engine, {"r": (PROMPT, SamplingParams(temperature=1.0))})["r"] for _ in range(3)]
    assert len({tuple(r) for r in runs}) == 3


def test_top_k_1_is_greedy(engine):
    greedy = generate(engine, {"g": (PROMPT, SamplingParams())})["g"]
    for seed in (0, 1):
        top1 = generate(engine, {"k": (PROMPT, SamplingParams(temperature=1.5, top_k=1, seed=seed))})["k"]
        assert top1 == greedy


P = (0.05, 0.5, 0.15, 0.3)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    logits = torch.tensor([P]).log()
    for top_p, nucleus in ((0.4, {1}), (0.75, {1, 3}), (0.85, {1, 3, 2}), (1.0, {0, 1, 2, 3})):
        probs, ids = filtered_probs(logits, [SamplingParams(temperature=1.0, top_p=top_p)])
        got = {int(i): float(p) for i, p in zip(ids[0], probs[0]) if p > 0}
        mass = sum(P[i] for i in nucleus)
        assert got == pytest.approx({i: P[i] / mass for i in nucleus}), f"top_p={top_p}"


def test_top_k_then_top_p_and_temperature():
    logits = torch.tensor([P]).log()
    probs, ids = filtered_probs(logits, [SamplingParams(temperature=1.0, top_k=2)])
    assert ids[0, :2].tolist() == [1, 3] and probs[0, :2].tolist() == pytest.approx([0.625, 0.375])
    assert probs[0, 2:].tolist() == [0.0, 0.0]
    # top-p measures mass within the top k: the top token alone (0.625) already reaches 0.6.
    probs, _ = filtered_probs(logits, [SamplingParams(temperature=1.0, top_k=2, top_p=0.6)])
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    # Temperature 2 flattens: p ∝ sqrt(p).
    probs, ids = filtered_probs(logits, [SamplingParams(temperature=2.0)])
    root = torch.tensor(P).sqrt()
    torch.testing.assert_close(probs[0], (root / root.sum())[ids[0]])


def test_draws_follow_the_distribution():
    logits = torch.tensor([0.2, 0.5, 0.3]).log().expand(4000, 3)
    params = [SamplingParams(temperature=1.0)] * 4000
    g = make_generator(SamplingParams(temperature=1.0, seed=0), torch.device("cpu"))
    counts = torch.bincount(torch.tensor(sample(logits, params, [g] * 4000)), minlength=3).float() / 4000
    # 4000 draws: the standard error of each share is under 0.008; allow 4 of them.
    assert counts.tolist() == pytest.approx([0.2, 0.5, 0.3], abs=0.032)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed"),
])
def test_invalid_sampling_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)

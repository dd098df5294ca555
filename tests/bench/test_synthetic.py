"""bench.workloads.synthetic_mix: the paper's short/long mixes, with the distributions it documents."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.workloads import PAPER_SYNTHETIC, make_workload, synthetic_mix

N = 40_000


@pytest.mark.parametrize("name", PAPER_SYNTHETIC)
def test_the_short_share_is_the_named_one(name):
    p = int(name.split("-")[1]) / 100
    w = make_workload(name, N, seed=1)
    short = np.array([r.label == "short" for r in w.requests])
    assert abs(short.mean() - p) < 4 * math.sqrt(p * (1 - p) / N)  # binomial, 4 sigma
    ctx = w.prompt_lens
    assert (ctx[short] < 1024).all() and (ctx[short] >= 64).all()   # short: under 1k
    assert (ctx[~short] >= 1024).all() and (ctx[~short] < 8192).all()  # long: 1k-8k
    assert w.name == name and w.description["short_share"] == p


def test_within_each_class_lengths_are_uniform_as_documented():
    w = synthetic_mix(N, seed=2, short_share=0.8)
    short = np.array([r.label == "short" for r in w.requests])
    ctx, out = w.prompt_lens.astype(float), w.output_lens.astype(float)
    # Uniform integers [a, b): mean (a + b - 1)/2, sd ~ (b - a)/sqrt(12); tolerance 4 standard errors.
    for x, (a, b) in ((ctx[short], (64, 1024)), (ctx[~short], (1024, 8192)), (out, (16, 512))):
        sd = (b - a) / math.sqrt(12)
        assert abs(x.mean() - (a + b - 1) / 2) < 4 * sd / math.sqrt(len(x))
        assert x.std() == pytest.approx(sd, rel=0.03)
        assert x.min() == a and x.max() == b - 1
    # Outputs do not depend on the class.
    assert abs(out[short].mean() - out[~short].mean()) < 4 * 143 * math.sqrt(1 / short.sum() + 1 / (~short).sum())


def test_the_seed_reproduces_the_mix():
    a, b, c = synthetic_mix(500, 3), synthetic_mix(500, 3), synthetic_mix(500, 4)
    assert a == b
    assert a.prompt_lens.tolist() != c.prompt_lens.tolist()


@pytest.mark.parametrize("kw, argument", [
    (dict(short_share=1.5), "short_share"), (dict(short_context=(500, 100)), "short_context"),
    (dict(long_context="long"), "long_context"), (dict(output=(0, 10)), "output"), (dict(n=0), "n"),
])
def test_bad_arguments_name_the_argument(kw, argument):
    with pytest.raises(ValueError, match=argument):
        synthetic_mix(**{"n": 10, **kw})

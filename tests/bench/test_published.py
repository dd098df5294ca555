"""bench.workloads.published: ShareGPT-like and LongBench-like lengths against the published figures."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from bench.workloads import LONGBENCH_TASKS, LogNormalLength, longbench_workload, make_workload, sharegpt_workload


@pytest.fixture(scope="module")
def sharegpt():
    return sharegpt_workload(200_000, seed=0)


@pytest.fixture(scope="module")
def longbench():
    return longbench_workload(100_000, seed=0)


def test_sharegpt_means_are_the_vllm_papers(sharegpt):
    # vLLM (Kwon et al., SOSP 2023) §6.1, Fig. 11a legend: mean input 161.31, mean output 337.99 tokens;
    # against Alpaca's 19.31 / 58.45 these are the text's "8.4x longer inputs, 5.8x longer outputs".
    # 200k log-normal(sigma 1) draws: standard error ~0.3% of the mean; tolerance 3%.
    s = sharegpt.stats()
    assert s["context"]["mean"] == pytest.approx(161.31, rel=0.03)
    assert s["output"]["mean"] == pytest.approx(337.99, rel=0.03)


def test_sharegpt_means_give_the_papers_ratios_to_alpaca():
    from bench.workloads.published import SHAREGPT_MEAN_INPUT, SHAREGPT_MEAN_OUTPUT

    assert round(SHAREGPT_MEAN_INPUT / 19.31, 1) == 8.4 and round(SHAREGPT_MEAN_OUTPUT / 58.45, 1) == 5.8


def test_workloads_cite_their_sources_and_label_assumptions(sharegpt, longbench):
    assert "arxiv.org/abs/2309.06180" in sharegpt.description["source"]
    assert "(assumed)" in sharegpt.description["context"] and "(assumed)" in sharegpt.description["output"]
    assert "Table 1" in longbench.description["source"] and "dataset2maxlen" in longbench.description["source"]


def test_sharegpt_medians_follow_the_stated_sigma(sharegpt):
    # The assumed sigma = 1 puts the median at mean * exp(-1/2).
    s = sharegpt.stats()
    assert s["context"]["p50"] == pytest.approx(161.31 * math.exp(-0.5), rel=0.03)
    assert s["output"]["p50"] == pytest.approx(337.99 * math.exp(-0.5), rel=0.03)
    assert s["context"]["p90"] > 3 * s["context"]["p50"]  # heavy right tail, as chat prompts have


def test_a_log_normal_from_mean_and_median_has_that_mean_and_median():
    d = LogNormalLength.from_mean_median(300.0, 120.0)
    assert d.mean == pytest.approx(300.0) and d.median == pytest.approx(120.0)
    x = d.sample(np.random.default_rng(0), 400_000)
    assert x.mean() == pytest.approx(300.0, rel=0.03) and np.median(x) == pytest.approx(120.0, rel=0.02)
    with pytest.raises(ValueError, match="median"):
        LogNormalLength.from_mean_median(100.0, 150.0)


def test_longbench_average_is_the_papers_6711_words(longbench):
    # Bai et al. (ACL 2024) abstract: English tasks average 6,711 words; the per-task table weighted by
    # sample count gives 6,711.3. Contexts are 1.3 tokens per word (stated assumption).
    assert longbench.stats()["context"]["mean"] / 1.3 == pytest.approx(6711, rel=0.02)


def test_longbench_tasks_have_their_published_lengths_shares_and_budgets(longbench):
    labels = np.array([r.label for r in longbench.requests])
    total = sum(t.samples for t in LONGBENCH_TASKS)
    counts = Counter(labels.tolist())
    ctx, out = longbench.prompt_lens, longbench.output_lens
    for t in LONGBENCH_TASKS:
        mine = labels == t.name
        p = t.samples / total
        assert abs(counts[t.name] / len(labels) - p) < 4 * math.sqrt(p * (1 - p) / len(labels))
        # ~4.8k draws of log-normal(sigma 0.5) per task: standard error ~0.8%; tolerance 4%.
        assert ctx[mine].mean() == pytest.approx(1.3 * t.avg_words, rel=0.04), t.name
        assert (out[mine] == t.max_new_tokens).all(), t.name
    assert out.mean() == pytest.approx(135.68, rel=0.02)  # sample-weighted mean budget


def test_longbench_is_longer_than_sharegpt_by_the_published_margin(longbench, sharegpt):
    ratio = longbench.stats()["context"]["mean"] / sharegpt.stats()["context"]["mean"]
    assert 50 < ratio < 60  # 8,725 / 161.31 = 54


def test_max_context_clips_as_longbenchs_truncation_does():
    w = longbench_workload(5000, seed=1, max_context=8192)
    assert w.prompt_lens.max() == 8192 and (w.prompt_lens >= 1).all()


def test_seeds_reproduce_and_differ():
    assert make_workload("sharegpt", 300, seed=2) == make_workload("sharegpt", 300, seed=2)
    assert make_workload("longbench", 300, seed=2) == make_workload("longbench", 300, seed=2)
    assert make_workload("sharegpt", 300, seed=2).prompt_lens.tolist() != \
        make_workload("sharegpt", 300, seed=3).prompt_lens.tolist()


@pytest.mark.parametrize("make, kw, argument", [
    (sharegpt_workload, dict(n=-1), "n"), (sharegpt_workload, dict(n=5, max_context=0), "max_context"),
    (longbench_workload, dict(n=5, tokens_per_word=0), "tokens_per_word"),
    (longbench_workload, dict(n=5, sigma=-1.0), "sigma"), (longbench_workload, dict(n=2.5), "n"),
])
def test_bad_arguments_name_the_argument(make, kw, argument):
    with pytest.raises(ValueError, match=argument):
        make(**kw)

"""bench.workloads: the Workload noun (stats, lazy prompt ids, describe) and make_workload by name."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.workloads import BOS_ID, TOKEN_RANGE, WORKLOAD_NAMES, Workload, make_workload


@pytest.mark.parametrize("name", ["azure-conv", "azure-code", "synthetic-80-short", "sharegpt", "longbench"])
def test_every_name_makes_a_workload_with_stats_and_a_json_description(name):
    w = make_workload(name, 200, seed=1)
    assert isinstance(w, Workload) and len(w) == 200 and w.name == name
    s = w.stats()
    for part in ("context", "output"):
        assert set(s[part]) >= {"mean", "p50", "p90", "p99"}
        assert s[part]["p50"] <= s[part]["p90"] <= s[part]["p99"]
        assert s[part]["mean"] == pytest.approx(float(np.mean(w.prompt_lens if part == "context" else w.output_lens)))
    d = json.loads(json.dumps(w.describe()))
    assert d["requests"] == 200 and d["seed"] == 1 and "arrivals" in d and "prompt_len" in d


def test_stats_percentiles_are_the_lengths_percentiles():
    w = make_workload("azure-code", 1000)
    ctx = w.prompt_lens
    assert w.stats()["context"]["p90"] == pytest.approx(np.percentile(ctx, 90))
    assert w.stats()["context"]["p99"] == pytest.approx(np.percentile(ctx, 99))


def test_prompt_ids_are_made_on_demand_and_reproducible():
    w = make_workload("synthetic-70-short", 20, seed=4)
    r = w.requests[3]
    ids = r.prompt_ids
    assert len(ids) == r.prompt_len and ids[0] == BOS_ID
    assert all(TOKEN_RANGE[0] <= t < TOKEN_RANGE[1] for t in ids[1:])
    assert ids == make_workload("synthetic-70-short", 20, seed=4).requests[3].prompt_ids
    assert ids[1:50] != w.requests[4].prompt_ids[1:50]  # each request its own ids
    assert "prompt_ids" not in {f for f in type(r).__dataclass_fields__}  # not stored: lengths only


def test_the_paper_mixes_parse_from_their_names():
    assert make_workload("synthetic-95-short", 10).description["short_share"] == 0.95


@pytest.mark.parametrize("name, n, argument", [
    ("azure-chat", 10, "name"), ("synthetic-120-short", 10, "name"), ("sharegpt", None, "n"),
    ("longbench", None, "n"),
])
def test_unknown_names_and_missing_counts_are_clear_errors(name, n, argument):
    with pytest.raises(ValueError, match=argument):
        make_workload(name, n)


def test_the_error_for_an_unknown_name_lists_the_names():
    with pytest.raises(ValueError) as e:
        make_workload("azure", 10)
    assert all(n in str(e.value) for n in WORKLOAD_NAMES)

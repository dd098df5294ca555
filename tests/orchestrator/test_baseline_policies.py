"""The baseline policies on the real torch engine: disaggregated FCFS (DistServe-like, prefill on
a second KV pool "cpu:1" then a move to the decode device) and chunked prefill (SplitFuse /
Sarathi-like, prompts in chunks inside the decode steps) give the same greedy tokens as fcfs,
and do what they claim (where prefill runs, the token budget per step); bad settings get errors
that name the field."""
from __future__ import annotations

import pytest

from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason
from orchestrator.service import Orchestrator
from orchestrator.stream import TokenStream

PROMPTS = [[1] + list(range(40, 40 + n)) for n in (5, 70, 12, 130, 33, 90)]


@pytest.fixture(scope="module")
def engine(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", helper_devices=("cpu:1",), kv_blocks=64)
    yield eng
    eng.close()


def serve(engine, **cfg):
    """Every prompt at once, 10 greedy tokens each; returns (orchestrator, token lists)."""
    orch = Orchestrator(engine, ServeConfig(max_batch_size=4, **cfg))
    orch.loop.metrics.timings.clear()
    streams = [TokenStream() for _ in PROMPTS]
    for p, s in zip(PROMPTS, streams):
        orch.submit(p, max_tokens=10, end_id=0, on_event=s)
    for _ in range(10_000):
        if not orch.loop.step():
            break
    tokens = [s.result(timeout=1) for s in streams]
    assert all(s.finish_reason is FinishReason.LENGTH for s in streams)
    for tier in ("cpu", "cpu:1"):
        assert engine.kv_blocks_used(tier) == 0 and orch.ledger.used(tier) == 0
    return orch, tokens


@pytest.fixture(scope="module")
def fcfs_tokens(engine):
    return serve(engine, policy="fcfs")[1]


def test_disaggregated_fcfs_prefills_on_the_helper_and_matches_fcfs(engine, fcfs_tokens):
    orch, tokens = serve(engine, policy="disagg-fcfs", helper_devices="cpu:1")
    assert tokens == fcfs_tokens
    moved = [(t.src, t.dst) for t in orch.loop.metrics.transfers]
    assert moved and set(moved) == {("cpu:1", "cpu")}  # every prompt's KV came from the helper
    assert sum(t.requests for t in orch.loop.metrics.transfers) == len(PROMPTS)


def test_chunked_prefill_keeps_every_step_within_the_token_budget_and_matches_fcfs(engine, fcfs_tokens):
    orch, tokens = serve(engine, policy="chunked-prefill", chunk_tokens=48)
    assert tokens == fcfs_tokens
    calls = list(orch.loop.metrics.timings)
    mixed = [c for c in calls if c.op == "mixed"]
    assert mixed and all(c.num_tokens <= 48 for c in mixed)
    assert not [c for c in calls if c.op == "prefill"]  # no whole-prompt prefill at all
    # The 130-token prompt took at least ceil(131 / 48) = 3 steps.
    assert sum(c.num_tokens for c in mixed) >= sum(len(p) for p in PROMPTS)


def test_aligned_can_prefill_on_the_helper(engine, fcfs_tokens):
    orch, tokens = serve(engine, policy="aligned", helper_devices="cpu:1", prefill_device="cpu:1", kmin=2)
    assert tokens == fcfs_tokens
    assert {t.src for t in orch.loop.metrics.transfers} >= {"cpu:1"}


@pytest.mark.parametrize("cfg, match", [
    (dict(policy="fcfs", helper_devices="cpu:1", prefill_device="cpu:1"), "prefill_device: policy 'fcfs'"),
    (dict(policy="aligned", prefill_device="cuda:3"), "prefill_device: 'cuda:3' is not a helper"),
    (dict(policy="chunked-prefill", chunk_tokens=0), "chunk_tokens: must be >= 1"),
])
def test_bad_settings_name_the_field(engine, cfg, match):
    with pytest.raises(ValueError, match=match):
        Orchestrator(engine, ServeConfig(**cfg))


def test_disaggregated_fcfs_needs_a_second_device(demo_engine_dir):
    one = load_engine(demo_engine_dir, device="cpu", kv_blocks=16)
    try:
        with pytest.raises(ValueError, match="has only the decode device"):
            Orchestrator(one, ServeConfig(policy="disagg-fcfs"))
    finally:
        one.close()

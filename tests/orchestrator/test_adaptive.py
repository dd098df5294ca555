"""The default policy (adaptive) on the real torch engine with a step cost that makes grouping pay:
it holds long prompts back, outputs stay those of fcfs, and a started request decodes in every
iteration until it finishes (never parked, so no gap between two tokens beyond one iteration)."""
from __future__ import annotations

import shutil
from collections import deque

import pytest

from engines.base import StepCost
from engines.loader import load_engine
from engines.manifest import read_manifest
from engines.torch.attention import ATTENTION_PATHS
from engines.torch.step_cost import write_step_costs
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason
from orchestrator.service import Orchestrator
from orchestrator.stream import TokenStream

# Batch x longest KV dominates: a 200-token prompt beside short ones costs more than its own step.
PADDED = dict(fixed=1e-3, per_seq=1e-4, padded_kv=5e-5, kv=0.0)
PROMPTS = [[1] + [40 + (i * 7 + k) % 50 for k in range(n)] for i, n in
           enumerate([8, 200, 12, 9, 190, 14, 10, 205, 11, 13])]


@pytest.fixture(scope="module")
def engine(demo_engine_dir, tmp_path_factory):
    """The demo engine on its padded path, with a fitted-looking step cost in its directory."""
    engine_dir = tmp_path_factory.mktemp("padded") / "demo"
    shutil.copytree(demo_engine_dir, engine_dir)
    write_step_costs(engine_dir, "cpu", read_manifest(engine_dir).dtype,
                     [StepCost(path, **PADDED) for path in ATTENTION_PATHS])
    made = load_engine(engine_dir, device="cpu", kv_blocks=200, host_kv_blocks=0)
    yield made
    made.close()


def serve(engine, policy: str):
    orch = Orchestrator(engine, ServeConfig(policy=policy, max_batch_size=8, max_prefill_tokens=512))
    orch.loop.metrics.history = deque()
    streams = [TokenStream() for _ in PROMPTS]
    requests = [orch.submit(p, max_tokens=20, end_id=0, on_event=s) for p, s in zip(PROMPTS, streams)]
    for _ in range(10_000):
        if not orch.loop.step():
            break
    assert all(s.result(timeout=1) is not None for s in streams)
    assert engine.kv_blocks_used("cpu") == 0 and orch.ledger.used("cpu") == 0
    return orch, requests, [s.result(timeout=1) for s in streams]


def test_long_prompts_wait_outputs_do_not_change_and_no_started_request_skips_an_iteration(engine):
    assert engine.describe().step_costs[0].padded_kv == PADDED["padded_kv"]
    orch, requests, tokens = serve(engine, "adaptive")
    _, _, fcfs_tokens = serve(engine, "fcfs")
    assert tokens == fcfs_tokens  # greedy: the order of admission changes no output
    history = list(orch.loop.metrics.history)
    kinds = {r.decision.kind for r in history if r.decision}
    assert "grouped" in kinds and "filled" in kinds
    grouped = [r.decision for r in history if r.decision and r.decision.kind == "grouped"]
    assert all("longer prompts wait" in d.reason for d in grouped)
    assert any(d.predicted_s is not None for d in grouped)  # a batch decoding while the long ones wait
    # The long prompts started after the short ones that came after them in the queue.
    first = {len(r.prompt_ids): r.first_token_time for r in requests}
    assert min(first[n] for n in (201, 191, 206)) > max(first[n] for n in (9, 13, 10, 14, 15, 11, 12))
    # Never parked: between two tokens of a request no decode iteration ends but the one that gave
    # the first (a token is stamped before its iteration's end), so it was in every one of them.
    decodes = [it.end for it in history if it.batch_size]
    for r in requests:
        assert r.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        for a, b in zip(r.token_times, r.token_times[1:]):
            assert sum(1 for end in decodes if a < end < b) <= 1, r.id
    # Each decode step was predicted, and recorded beside its measured time.
    assert all(it.predicted_seconds is not None and it.decode_seconds > 0 for it in history if it.batch_size)

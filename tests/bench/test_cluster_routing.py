"""The simulated cluster behind each router mode: three replicas in one virtual time, 60 requests of
the Azure conversation trace at 10 requests/s (three replicas serve ~13/s of it), so
several requests are in flight on each replica when the next one is routed."""
from __future__ import annotations

import pytest

from bench import cluster_routing as cr
from bench.simulate import run_variant
from serving.cluster.routing import MODES

REPLICAS, N, RATE = 3, 60, 10.0


@pytest.fixture(scope="module")
def setup():
    a = dict(replicas=REPLICAS, slo_ttft=2.0, slo_tpot=0.1, seed=0)
    args, base, _ = cr.prepare(cr.settings(a, "greedy"), cr.MODEL, "azure-conv", N, probe=False)
    return args, cr.with_load(base, RATE, seed=0)


@pytest.fixture(scope="module")
def runs(setup):
    args, workload = setup
    return {mode: cr.measure(args, workload, mode, REPLICAS) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_every_request_is_sent_once_and_finishes_once(runs, mode):
    m = runs[mode]
    assert m["sent_indices"] == list(range(N))
    assert sum(m["per_replica"]) == N
    assert m["completed"] == N and m["finish_reasons"] == {"length": N}
    assert m["finished_once"] == N and m["finished_more"] == 0


def test_round_robin_deals_evenly(runs):
    counts = runs["round-robin"]["per_replica"]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("mode", ["length", "kv"])
def test_cost_routers_use_every_replica(runs, mode):
    assert min(runs[mode]["per_replica"]) > 0


def test_length_routing_gathers_close_lengths(runs):
    # The length router prices the padding a newcomer causes among each replica's requests in
    # flight; round-robin and kv (load alone) ignore lengths, so the padding they leave is larger.
    padding = {mode: runs[mode]["padding"] for mode in MODES}
    assert padding["length"] < padding["round-robin"]
    assert padding["length"] < padding["kv"]


def test_joint_round_robin_is_the_simulators_round_robin(setup, runs):
    # Replicas share nothing, so stepping them together must not change what each one does:
    # round-robin in joint virtual time gives bench/simulate.py's independent replicas' figures.
    args, workload = setup
    alone = run_variant(args, cr.VARIANT, workload)
    joint = runs["round-robin"]
    for key in ("output_tok_s", "makespan_s", "iterations"):
        assert joint[key] == alone[key], key
    assert joint["ttft_s"] == alone["ttft_s"] and joint["tpot_s"] == alone["tpot_s"]


def test_report_has_a_ratio_per_mode(setup, runs):
    records = [{"workload": "azure-conv", "dispatch": "greedy", "load": 0.8, "rate": RATE, "mode": mode,
                "metrics": runs[mode]} for mode in MODES]
    cr.with_ratios(records)
    rr = next(r for r in records if r["mode"] == "round-robin")
    assert rr["vs_rr"]["output_tok_s"] == 1.0
    summary, full = cr.tables(records)
    assert "length/rr tok/s" in summary and "kv/rr TPOT p99" in summary
    assert len(full.splitlines()) == 2 + len(MODES)

"""The simulation harness end to end on a small matrix: every variant serves every request on
the sim engine, the deployments split the same GPUs, and the report is written."""
from __future__ import annotations

import json

import pytest

from bench import simulate
from bench.workloads import make_workload


@pytest.fixture(scope="module")
def runs():
    args = dict(hardware="H100-SXM", gpus=4, host_share=0.9, dispatch="greedy", slo_ttft=2.0, slo_tpot=0.1, seed=0)
    job = dict(args=args, model="OPT-6.7B", workload="sharegpt", requests=120, loads=(0.9,),
               variants=tuple(simulate.VARIANTS))
    return simulate.experiment(job)


def test_every_variant_serves_every_request(runs):
    assert {r["variant"] for r in runs} == set(simulate.VARIANTS)
    for r in runs:
        assert (r["dispatch"], r["kernel"]) == ("greedy", "fa2-varlen")
        m = r["metrics"]
        assert m["requests"] == m["completed"] == 120, r["variant"]
        assert m["finish_reasons"] == {"length": 120}
        assert m["virtual_s"] > 0 and m["wall_s"] > 0
        assert m["schedule_s"]["max"] is not None


def test_deployments_share_the_same_gpus(runs):
    by = {r["variant"]: r["metrics"] for r in runs}
    for label, v in simulate.VARIANTS.items():
        assert by[label]["replicas"] * v.gpus_per_replica == 4
    # Prefill on its own GPU: the decode GPUs of the disaggregated deployments never prefill,
    # so their decode rate per decode GPU beats colocated fcfs's, whose steps wait for prompts.
    assert by["disagg-fcfs (DistServe-like)"]["gpu_busy_share"]["cuda:1"] > 0
    assert by["fcfs (vLLM-like)"]["gpu_busy_share"].keys() == {"cuda:0"}


def test_rate_is_the_load_times_the_measured_fcfs_capacity(runs):
    caps = {r["capacity_req_s"] for r in runs}
    assert len(caps) == 1 and caps.pop() > 0
    r = runs[0]
    assert r["rate"] == pytest.approx(0.9 * r["capacity_req_s"], rel=1e-3)


def test_trace_load_keeps_its_pattern_rescaled():
    wl = make_workload("azure-code", 50, 0)
    fast = simulate.with_load(wl, 10.0, 0)
    gaps, fast_gaps = wl.arrivals[1:] - wl.arrivals[:-1], fast.arrivals[1:] - fast.arrivals[:-1]
    assert (len(fast) - 1) / (fast.arrivals[-1] - fast.arrivals[0]) == pytest.approx(10.0)
    assert fast_gaps == pytest.approx(gaps * (fast_gaps.sum() / gaps.sum()))


def test_main_writes_a_report_per_dispatch(tmp_path):
    out = tmp_path / "sim"
    rc = simulate.main(["--matrix", "quick", "--requests", "60", "--gpus", "2", "--jobs", "1", "--out", str(out),
                        "--variants", "aligned", "chunked-prefill (FastGen/Sarathi-like)", "--dispatch", "waves", "greedy"])
    assert rc == 0
    for dispatch in ("waves", "greedy"):
        report = (out / dispatch / "report.md").read_text()
        for label in ("aligned", "fcfs (vLLM-like)", "chunked-prefill (FastGen/Sarathi-like)"):
            assert f"| {label} |" in report
        assert f"dispatch `{dispatch}`" in report
        results = json.loads((out / dispatch / "results.json").read_text())
        assert len(results) == 3 and all(r["metrics"]["completed"] == 60 for r in results)
        assert {r["dispatch"] for r in results} == {dispatch}
        assert list((out / dispatch).glob("*.png"))


def test_split_kv_is_dispatch_split(tmp_path):
    with pytest.raises(SystemExit):
        simulate.main(["--dispatch", "flashinfer", "--out", str(tmp_path)])
    assert simulate.dispatch_of({"split_kv": True}) == "split"
    assert simulate.dispatch_of({}) == simulate.DEFAULT_DISPATCH == "greedy"

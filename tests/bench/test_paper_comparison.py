"""The paper-comparison table computes each claim's ratio from matching runs only."""
from __future__ import annotations

from bench.paper_comparison import (ALIGNED, DEFAULT, DEFAULT_DISAGG, DISAGG, FCFS, NO_ALIGNMENT, NO_PREFETCH,
                                    paper_table)


def run(variant, workload, load, decode, output, tpot99):
    return {"model": "M", "workload": workload, "load": load, "variant": variant,
            "metrics": {"decode_tok_s": decode, "output_tok_s": output, "tpot_s": {"p99": tpot99}}}


def row(table: str, claim: str) -> list[str]:
    line = next(li for li in table.splitlines() if li.startswith(f"| {claim} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_ratios_best_case_and_median():
    results = [
        run(ALIGNED, "azure-conv", 0.5, 300, 100, 0.05), run(FCFS, "azure-conv", 0.5, 100, 100, 0.02),
        run(ALIGNED, "azure-conv", 1.0, 200, 90, 0.04), run(FCFS, "azure-conv", 1.0, 200, 100, 0.03),
        run(ALIGNED, "sharegpt", 1.0, 150, 80, 0.1), run(FCFS, "sharegpt", 1.0, 100, 100, 0.1),
        run(DISAGG, "azure-conv", 1.0, 190, 95, 0.4),  # no DistServe run at load 0.5
        run(NO_PREFETCH, "azure-conv", 1.0, 180, 90, 0.04), run(NO_ALIGNMENT, "azure-conv", 1.0, 90, 90, 0.04),
    ]
    table = paper_table(results)
    decode = row(table, "decode throughput vs vLLM")
    assert decode[2].startswith("3.00x (M, azure-conv, load 0.5)")
    assert decode[3] == "1.50x" and decode[4] == "3"  # median of 3.0, 1.0, 1.5
    tpot = row(table, "P99 TPOT vs DistServe, Azure traces")
    assert tpot[2].startswith("10.00x") and tpot[4] == "1"  # 0.4 / 0.04, at the one load both ran
    assert row(table, "ablation: no peer prefetch")[2].startswith("-10.0%")
    assert row(table, "ablation: then no alignment")[2].startswith("-50.0%")
    assert row(table, "throughput vs vLLM, synthetic")[4] == "0"  # no synthetic runs: no points


def test_the_default_policy_in_its_counterpart_deployment():
    results = [
        run(FCFS, "azure-conv", 1.0, 100, 100, 0.03), run(DISAGG, "azure-conv", 1.0, 190, 95, 0.06),
        run(DEFAULT, "azure-conv", 1.0, 110, 104, 0.02), run(DEFAULT_DISAGG, "azure-conv", 1.0, 210, 90, 0.05),
    ]
    table = paper_table(results)
    decode = row(table, "decode throughput vs vLLM")  # per decode GPU: the disaggregated deployment
    assert decode[6].startswith("2.10x") and decode[8] == "1" and decode[4] == "0"
    output = row(table, "output throughput vs vLLM, same 8 GPUs")  # same GPUs: one replica per GPU
    assert output[6].startswith("1.04x")
    assert row(table, "P99 TPOT vs DistServe, Azure traces")[6].startswith("3.00x")  # 0.06 / 0.02
    assert row(table, "ablation: no peer prefetch")[8] == "-"  # a mechanism of aligned only

"""bench.chunk_frontier on a small point: every variant serves, fcfs is the 1.000x reference, and a
tighter TPOT target gives a lower TPOT p99 than a looser one."""
from __future__ import annotations

from bench import chunk_frontier


def test_the_frontier_runs_and_a_tighter_target_gives_lower_tpot(capsys):
    assert chunk_frontier.main(["--model", "OPT-13B", "--workload", "azure-code", "--load", "1.0", "--requests", "120",
                                "--chunks", "512", "--targets", "0.03", "0.1"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x |" in line]
    by = {r[0].strip("| "): r for r in rows}
    assert by["fcfs (vLLM-like)"][1] == "1.000x" and len(rows) == 5
    assert float(by["adaptive, TPOT target 30 ms"][2]) < float(by["adaptive, TPOT target 100 ms"][2])

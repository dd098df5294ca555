"""bench.report: a markdown report, its plots and results.json from a few hand-made runs."""
from __future__ import annotations

import json
import re

import pytest

from bench.report import write_report
from bench.run_metrics import Slo, summarize
from orchestrator.core import FinishReason, Request, RequestState
from orchestrator.metrics import IterationRecord

PNG = b"\x89PNG\r\n\x1a\n"


def metrics(step_s: float, kv_spread: int) -> dict:
    """summarize() of 20 requests of 5 tokens each (TPOT = step_s) and 40 decode steps of 4
    requests taking step_s each, with kv_max - kv_mean = kv_spread: decode tok/s = 4 / step_s."""
    reqs = []
    for i in range(20):
        r = Request(str(i), (1,) * 8, max_tokens=5)
        r.token_times = [i + 0.5 + k * step_s for k in range(5)]
        r.output_ids, r.first_token_time, r.finish_time = [7] * 5, r.token_times[0], r.token_times[-1]
        r.state, r.finish_reason = RequestState.FINISHED, FinishReason.LENGTH
        reqs.append(r)
    steps = [IterationRecord(end=float(i), seconds=step_s, batch_size=4, kv_max=100 + kv_spread,
                             kv_mean=100.0, alignment=100 / (100 + kv_spread), prefill_tokens=0, bubble_seconds=0.0,
                             switch=False, device_blocks_used=0, host_blocks_used=0, transfer_bytes=0,
                             schedule_seconds=0.001)
             for i in range(40)]
    return summarize(reqs, [float(i) for i in range(20)], steps, slo=Slo(1.0, 0.06))


def run(policy: str, variant: str, rate, step_s: float, kv_spread: int, **extra) -> dict:
    r = {"experiment": "main", "model": "OPT-13B", "hardware": "H100-SXM", "workload": "azure-conv",
         "policy": policy, "variant": variant, "rate": rate, "requests": 20, "seed": 0,
         "metrics": metrics(step_s, kv_spread)}
    r.update(extra)
    return r


@pytest.fixture
def results() -> list[dict]:
    return [
        run("fcfs", "fcfs", 2.0, 0.1, 400),
        run("aligned", "aligned", 2.0, 0.05, 20),
        run("aligned", "aligned (no peer prefetch)", 2.0, 0.08, 20),
        run("fcfs", "fcfs", 4.0, 0.2, 400),
        run("aligned", "aligned", 4.0, 0.08, 20),
    ]


def table_rows(md: str, first_cells: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith(f"| {first_cells} |")]


def test_report_has_a_row_per_run_and_ratios_to_the_baseline(tmp_path, results):
    path = write_report(results, tmp_path, "Policies on the sim", notes="Seed 0, virtual time.")
    md = path.read_text()
    assert path == tmp_path / "report.md"
    assert md.startswith("# Policies on the sim\n") and "Seed 0, virtual time." in md
    assert "## OPT-13B on H100-SXM, azure-conv" in md
    assert "20 requests, seed 0; goodput SLO: TTFT <= 1000 ms, TPOT <= 60 ms." in md
    # Each variant: one row in the metrics table and one in the ratio table.
    rows = table_rows(md, "aligned (no peer prefetch) | 2 req/s")
    assert len(rows) == 2 and "| 50.0 |" in rows[0]  # decode tok/s = 4 / 0.08
    assert "| 1.25 |" in rows[1]  # 50 / 40 tok/s of fcfs at 2 req/s
    assert "decode tok/s x fcfs" in md
    aligned_4 = table_rows(md, "aligned | 4 req/s")[1].split(" | ")
    assert aligned_4[2] == "2.50"  # decode tok/s 50 vs fcfs 20 at 4 req/s, not vs fcfs at 2 req/s
    assert aligned_4[6] == "0.40"  # TPOT p50: 0.08 / 0.2
    assert table_rows(md, "fcfs | 4 req/s")[1].split(" | ")[2] == "1.00"


def test_plots_exist_are_pngs_and_are_linked(tmp_path, results):
    md = write_report(results, tmp_path, "t").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(linked) == 1 + 2 * 2  # throughput vs load; per rate a TPOT CDF and a KV spread
    assert {p.name for p in tmp_path.glob("*.png")} == set(linked)
    for name in linked:
        assert (tmp_path / name).read_bytes()[:8] == PNG and (tmp_path / name).stat().st_size > 5000


def test_results_json_keeps_every_run(tmp_path, results):
    write_report(results, tmp_path, "t")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in saved] == [r["variant"] for r in results]
    assert saved[1]["metrics"]["decode_tok_s"] == pytest.approx(80.0)


def test_a_run_without_a_rate_is_all_at_once(tmp_path, results):
    no_rate = run("aligned", "aligned", None, 0.05, 20)
    del no_rate["rate"]
    md = write_report(results + [no_rate, run("fcfs", "fcfs", None, 0.1, 400)], tmp_path, "t").read_text()
    ratio_row = table_rows(md, "aligned | all at once")[1].split(" | ")
    assert ratio_row[2] == "2.00"
    assert "### all at once" in md and (tmp_path / "opt-13b-h100-sxm-azure-conv-all-at-once-tpot-cdf.png").is_file()


def test_runs_without_a_baseline_or_metrics_show_dashes(tmp_path):
    lonely = run("aligned", "aligned", 1.0, 0.05, 20)
    lonely["metrics"] = summarize([], [], [], slo=None)
    md = write_report([lonely], tmp_path, "t", baseline="fcfs").read_text()
    metrics_row, ratio_row = table_rows(md, "aligned | 1 req/s")
    assert "| - | - |" in metrics_row and "- / - / -" in metrics_row
    assert set(ratio_row.split(" | ")[2:]) == {"-", "- |"}
    assert all((tmp_path / n).read_bytes()[:8] == PNG for n in re.findall(r"\(([^)]+\.png)\)", md))

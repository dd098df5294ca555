"""The default policy's checks (issue 16) are computed from matching runs, and say NO when one fails."""
from __future__ import annotations

import json

from bench.default_policy import DEFAULT, DEFAULT_DISAGG, DISAGG, FCFS, main, table


def run(variant, workload, load, decode, output, tpot99):
    return {"model": "M", "workload": workload, "load": load, "variant": variant,
            "metrics": {"decode_tok_s": decode, "output_tok_s": output, "tpot_s": {"p99": tpot99}}}


def line(lines, start):
    return next(li for li in lines if li.startswith(f"| {start}"))


def test_checks_hold_and_fail_on_the_numbers():
    results = []
    for load, out in ((0.5, 101), (1.0, 99)):
        results += [run(FCFS, "azure-conv", load, 100, 100, 0.03), run(DISAGG, "azure-conv", load, 200, 90, 0.05),
                    run(DEFAULT, "azure-conv", load, 100, out, 0.02), run(DEFAULT_DISAGG, "azure-conv", load, 240, 91, 0.05)]
    lines = table(results)
    output = line(lines, "output tok/s, default / fcfs")
    assert "50% of points >= 1.0x" in output and "lowest 0.990x" in output and output.endswith("| NO |")
    assert line(lines, "TPOT p99").endswith("| yes |")  # 0.02 <= 0.05 at both Azure points
    assert "median 1.200x" in line(lines, "decode tok/s per decode GPU") and line(
        lines, "decode tok/s per decode GPU").endswith("| yes |")


def test_main_reads_each_dispatch_folder(tmp_path, capsys):
    for dispatch in ("waves", "split"):
        (tmp_path / dispatch).mkdir()
        rs = [dict(run(FCFS, "sharegpt", 1.0, 100, 100, 0.03), dispatch=dispatch),
              dict(run(DEFAULT, "sharegpt", 1.0, 100, 100, 0.03), dispatch=dispatch)]
        (tmp_path / dispatch / "results.json").write_text(json.dumps(rs))
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "### Dispatch `split`" in out and "### Dispatch `waves`" in out and "100% of points >= 1.0x" in out
    assert main([str(tmp_path / "none")]) == 1

"""Does the sim engine predict the real one? The CPU policy benchmark replayed in virtual time.

    python -m bench.sim_validation [--measured bench/results/policy_comparison.json]
        [--profile bench/profiles/cpu-100m.json] [--out bench/results/sim_validation.json]

`make bench` (bench/policy_comparison.py) measured each policy on the real torch engine with
wall-clock time; its JSON keeps the command, the pools and every run's figures. This replays
the same requests (the same trace sample, window fit and arrival schedule, rebuilt from the
recorded command's defaults) with the same settings and pool sizes on the sim engine, whose cost
model carries the constants `make calibrate` fitted on this machine (`--profile`), and puts the
predicted makespan, prefill and decode seconds, decode tok/s and the policies' ratios beside
the measured ones. The constants were fitted on separate timing calls, not on these runs, so
this is an out-of-sample check of the cost model and of the virtual-time engine together.

Known differences: the real runs sent end_id 0, and the random model sometimes emits it, ending
a request early (`finish_reasons` in the measured JSON); the sim runs every request to its
max_tokens. The torch engine pads a prefill batch to its longest prompt; the cost model counts
real tokens (its fit absorbed the padding of the timed batches, not of these).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench.run_metrics import summarize
from bench.simulate import drive_virtual
from bench.workloads import CODE_TRACE, arrival_offsets, draw_workload, load_trace
from engines.sim.calibration import Fit
from engines.sim.engine import SimEngine
from orchestrator.config import UNBOUNDED, ServeConfig

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = ("makespan_s", "prefill_s", "decode_s", "decode_tok_s", "output_tok_s")
CONFIG_FIELDS = ("policy", "max_batch_size", "kmin", "max_wait_s", "max_prefill_tokens", "max_queue",
                 "helper_devices", "chunk_tokens")


def replay(measured: dict, fit: Fit) -> list[dict]:
    """Each measured (mode, policy) run again on the sim engine; rows of predicted vs measured."""
    w = measured["workload"]
    workload = draw_workload(load_trace(w.get("trace", CODE_TRACE)), w["requests"], w["seed"],
                             measured["max_seq_len"], w.get("output_reserve"), Path(w.get("trace", CODE_TRACE)))
    lengths = [(r.prompt_len, r.output_len) for r in workload.requests]
    rows = []
    for row in measured["rows"]:
        rate = math.inf if row["mode"] == "all-at-once" else w["rate"]
        arrivals = arrival_offsets(len(lengths), rate, w["seed"])
        cost = fit.cost_model()
        helpers = 1 if row["config"].get("helper_devices") else 0
        engine = SimEngine(cost, helper_devices=helpers, kv_blocks=measured["kv_blocks"]["device"],
                           host_kv_bytes=measured["kv_blocks"]["host"] * cost.model.kv_bytes_per_token
                           * measured["kv_block_size"], block_size=measured["kv_block_size"],
                           max_seq_len=measured["max_seq_len"], split_kv=False)
        cfg = {k: v for k, v in row["config"].items() if k in CONFIG_FIELDS}
        if helpers:
            cfg["helper_devices"] = "cuda:1"
        cfg.setdefault("max_queue_tokens", UNBOUNDED)  # the whole workload may wait, as on the measured run
        run = drive_virtual(engine, ServeConfig(**cfg), lengths, list(arrivals), row["policy"])
        sim = summarize(run["requests"], run["scheduled"], run["iterations"], run["transfers"], slo=None,
                        calls=run["calls"])
        sim["prefill_s"] = sum(c.seconds for c in run["calls"] if c.op == "prefill")
        rows.append({"mode": row["mode"], "policy": row["policy"],
                     "measured": {k: row.get(k) for k in KEYS}, "predicted": {k: sim.get(k) for k in KEYS},
                     "measured_finish_reasons": row.get("finish_reasons")})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | policy | " + " | ".join(f"{k} predicted / measured" for k in KEYS) + " |",
             "|---|---|" + "---|" * len(KEYS)]
    for r in rows:
        cells = []
        for k in KEYS:
            p, m = r["predicted"][k], r["measured"][k]
            cells.append(f"{p:.1f} / {m:.1f} ({p / m:.2f})" if p and m else "-")
        lines.append(f"| {r['mode']} | {r['policy']} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios to fcfs in the same mode, predicted / measured:", "",
              "| mode | policy | decode tok/s x fcfs | makespan x fcfs |", "|---|---|---|---|"]
    base = {r["mode"]: r for r in rows if r["policy"] == "fcfs"}
    for r in rows:
        b = base.get(r["mode"])
        if b is None or r is b:
            continue
        cells = []
        for k in ("decode_tok_s", "makespan_s"):
            p = r["predicted"][k] / b["predicted"][k]
            m = r["measured"][k] / b["measured"][k]
            cells.append(f"{p:.2f} / {m:.2f}")
        lines.append(f"| {r['mode']} | {r['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measured", type=Path, default=RESULTS / "policy_comparison.json")
    p.add_argument("--profile", type=Path, default=Path(__file__).resolve().parent / "profiles" / "cpu-100m.json")
    p.add_argument("--out", type=Path, default=RESULTS / "sim_validation.json")
    a = p.parse_args(argv)
    measured = json.loads(a.measured.read_text())
    fit = Fit.load(a.profile)
    rows = replay(measured, fit)
    a.out.write_text(json.dumps({"measured_file": str(a.measured), "measured_command": measured["command"],
                                 "measured_date": measured["date"], "profile": str(a.profile), "rows": rows},
                                indent=1) + "\n")
    print(markdown(rows))
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The JSON record a CPU micro-benchmark writes: its command, date, machine and load averages."""
from __future__ import annotations

import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

import torch


def write_record(out: Path, module: str, argv: list[str] | None, load_before: float, **fields) -> dict:
    """Write {command, date, machine, load_avg_before_after, **fields} to `out`, say so on stdout,
    and return it. argv: the arguments the benchmark parsed (None: sys.argv's); load_before: the
    1-minute load average when the benchmark started (the one after is read now)."""
    args = sys.argv[1:] if argv is None else argv
    load = [load_before, os.getloadavg()[0]]
    record = {"command": f"python -m {module} " + " ".join(args), "date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                         f"torch {torch.__version__}",
              "load_avg_before_after": [round(x, 2) for x in load], **fields}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten to {out}; load average {load[0]:.2f} -> {load[1]:.2f}")
    return record

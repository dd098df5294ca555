"""The torch engine's fitted decode-step costs: a profile file in the engine directory.

`bench/step_cost_profile.py` times decode steps on each attention path and writes their fits to
`<engine dir>/step_cost.json`; the engine reads the fits that match its decode device and dtype
and reports them in `EngineInfo.step_costs` (engines/base.py `StepCost`), the path it runs
first. Only numbers cross to the orchestrator; nothing here imports torch.

    {"format": 1, "fits": [{"attention": "varlen", "device": "cpu", "dtype": "bfloat16",
      "fixed": ..., "per_seq": ..., "padded_kv": ..., "kv": ..., "order_matters": false,
      "r2": ..., "points": ..., "fitted_on": "..."}, ...]}
"""
from __future__ import annotations

import json
from pathlib import Path

from engines.base import StepCost

PROFILE_NAME = "step_cost.json"
FORMAT = 1


def read_step_costs(engine_dir: str | Path, device: str, dtype: str, running: str) -> tuple[StepCost, ...]:
    """The fits in `engine_dir`'s profile for this device kind ("cpu", "cuda") and dtype, the
    `running` path first; () when there is no profile or no fit matches. A profile that cannot
    be read is reported, not fatal: the costs are advice to the scheduler."""
    path = Path(engine_dir) / PROFILE_NAME
    if not path.is_file():
        return ()
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        fits = [f for f in data["fits"] if f["device"] == device and f["dtype"] == dtype]
        costs = [StepCost(**{k: v for k, v in f.items() if k not in ("device", "dtype")}) for f in fits]
    except (OSError, ValueError, KeyError, TypeError) as e:
        import warnings

        warnings.warn(f"{path}: unreadable step-cost profile ({e}); rerun `python -m bench.step_cost_profile`",
                      stacklevel=2)
        return ()
    return tuple(sorted(costs, key=lambda c: c.attention != running))


def write_step_costs(engine_dir: str | Path, device: str, dtype: str, costs: list[StepCost]) -> Path:
    """Add (or replace) these fits for (device, dtype, path) in `engine_dir`'s profile."""
    path = Path(engine_dir) / PROFILE_NAME
    fits = json.loads(path.read_text())["fits"] if path.is_file() else []
    new = {(device, dtype, c.attention) for c in costs}
    fits = [f for f in fits if (f["device"], f["dtype"], f["attention"]) not in new]
    for c in costs:
        fits.append({"attention": c.attention, "device": device, "dtype": dtype, "fixed": c.fixed,
                     "per_seq": c.per_seq, "padded_kv": c.padded_kv, "kv": c.kv, "order_matters": c.order_matters,
                     "r2": c.r2, "points": c.points, "fitted_on": c.fitted_on})
    path.write_text(json.dumps({"format": FORMAT, "fits": fits}, indent=2) + "\n")
    return path

"""Workloads by name, so that an experiment matrix can say "azure-conv" or "synthetic-80-short".

    make_workload("azure-conv")                         # all 19,366 requests at their own times
    make_workload("azure-code", 500, seed=1, select="sample", arrivals="trace", rate=4.0)
    make_workload("synthetic-90-short", 2000, seed=0, arrivals="poisson", rate=8.0)
    make_workload("sharegpt", 1000, arrivals="gamma", rate=2.0, burstiness=0.5)
    make_workload("longbench", 500, max_context=32_000)

Names: azure-conv, azure-code (n = None replays the whole trace), synthetic-<P>-short for a
short share of P% (the paper's mixes are P = 70 to 95), sharegpt, longbench. Keyword arguments go to
the generator (azure_workload, synthetic_mix, sharegpt_workload, longbench_workload).
"""
from __future__ import annotations

import re

from bench.workloads.azure import azure_workload
from bench.workloads.published import longbench_workload, sharegpt_workload
from bench.workloads.synthetic import synthetic_mix
from bench.workloads.workload import Workload

WORKLOAD_NAMES = ("azure-conv", "azure-code", "synthetic-<P>-short", "sharegpt", "longbench")
PAPER_SYNTHETIC = tuple(f"synthetic-{p}-short" for p in (70, 75, 80, 85, 90, 95))
_SYNTHETIC = re.compile(r"synthetic-(\d{1,3})-short")


def make_workload(name: str, n: int | None = None, seed: int = 0, **kw) -> Workload:
    """The workload called `name` (module docstring), `n` requests drawn with `seed`."""
    if name in ("azure-conv", "azure-code"):
        return azure_workload(name.removeprefix("azure-"), n, seed, **kw)
    if n is None:
        raise ValueError(f"n: workload {name!r} is generated, so say how many requests (n)")
    if name == "sharegpt":
        return sharegpt_workload(n, seed, **kw)
    if name == "longbench":
        return longbench_workload(n, seed, **kw)
    if m := _SYNTHETIC.fullmatch(name):
        share = int(m.group(1))
        if not 0 <= share <= 100:
            raise ValueError(f"name {name!r}: the short share is a percentage, 0 to 100")
        return synthetic_mix(n, seed, share / 100, **kw)
    raise ValueError(f"name = {name!r}: no such workload; choose one of {', '.join(WORKLOAD_NAMES)}")

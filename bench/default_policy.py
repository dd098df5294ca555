"""Does the default policy hold what issue 16 asks of it, in a simulated matrix? One table per dispatch model.

    python -m bench.default_policy bench/results/sim-paper   # the folder `bench.simulate --dispatch ...` wrote

Reads `<folder>/<dispatch>/results.json` (or `<folder>/results.json` for a single dispatch) and,
for each dispatch model, checks from the runs of the same (model, workload, load) point:
- output tok/s of the default deployment ("adaptive (default)", one replica per GPU) against fcfs
  at the same GPUs: the share of points at >= 1.0x, and the lowest ratio (asked: >= 90% of points,
  never below 0.97x);
- its TPOT p99 against disagg-fcfs's (DistServe-like) at every Azure point (asked: <=), and the
  same for the default policy deployed disaggregated;
- decode tok/s per decode GPU of the default policy deployed disaggregated ("adaptive,
  disaggregated", the same split of GPUs as DistServe) against disagg-fcfs's, median and lowest
  (asked under in-order dispatch: >= 1.15x);
- the default policy with its TPOT target set to the goodput SLO ("adaptive, TPOT target = SLO"):
  output tok/s and goodput against fcfs, and the points where its TPOT p99 is within the SLO
  (2% over at most: the policy prices a chunk beside one sequence), beside fcfs's.
Prints markdown; each line says whether it holds. Ratios only: the simulator's absolute times are
bounds (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.run_metrics import pick

DEFAULT = "adaptive (default)"
DEFAULT_DISAGG = "adaptive, disaggregated"
DEFAULT_SLO = "adaptive, TPOT target = SLO"
FCFS = "fcfs (vLLM-like)"
DISAGG = "disagg-fcfs (DistServe-like)"
AZURE = ("azure-conv", "azure-code")


def ratios(results: list[dict], variant: str, other: str, path: tuple[str, ...], workloads=None,
           lower_is_better: bool = False) -> list[tuple[float, str]]:
    """(variant / other, or other / variant where lower is better, 'where') at every point with both."""
    runs = {(r["model"], r["workload"], r.get("load"), r["variant"]): r for r in results}
    out = []
    for (model, workload, load, v), r in sorted(runs.items(), key=lambda kv: str(kv[0])):
        if v != variant or (workloads and workload not in workloads):
            continue
        o = runs.get((model, workload, load, other))
        a, b = pick(r["metrics"], path), pick(o["metrics"], path) if o else None
        if a and b:
            out.append((b / a if lower_is_better else a / b, f"{model}, {workload}, load {load}"))
    return out


def table(results: list[dict]) -> list[str]:
    lines = ["| check | asked | ours | holds |", "|---|---|---|---|"]
    out = ratios(results, DEFAULT, FCFS, ("output_tok_s",))
    if out:
        share = sum(x >= 1.0 for x, _ in out) / len(out)
        low = min(out)
        lines.append(f"| output tok/s, default / fcfs, same GPUs ({len(out)} points) | >= 1.0x at >= 90% of points, "
                     f"never < 0.97x | {share:.0%} of points >= 1.0x; median {statistics.median(x for x, _ in out):.3f}x; "
                     f"lowest {low[0]:.3f}x ({low[1]}) | {'yes' if share >= 0.9 and low[0] >= 0.97 else 'NO'} |")
    for variant, name in ((DEFAULT, "default"), (DEFAULT_DISAGG, "default disaggregated")):
        out = ratios(results, variant, DISAGG, ("tpot_s", "p99"), AZURE, lower_is_better=True)
        if out:
            low = min(out)
            lines.append(f"| TPOT p99, disagg-fcfs / {name}, Azure points ({len(out)}) | >= 1.0x ({name}'s p99 <= "
                         f"DistServe-like's) everywhere | median {statistics.median(x for x, _ in out):.2f}x; lowest "
                         f"{low[0]:.2f}x ({low[1]}) | {'yes' if low[0] >= 1.0 else 'NO'} |")
    out = ratios(results, DEFAULT_DISAGG, DISAGG, ("decode_tok_s",))
    if out:
        low = min(out)
        med = statistics.median(x for x, _ in out)
        lines.append(f"| decode tok/s per decode GPU, default disaggregated / disagg-fcfs ({len(out)} points) | "
                     f">= 1.15x under in-order dispatch | median {med:.3f}x; lowest {low[0]:.3f}x ({low[1]}); "
                     f"best {max(out)[0]:.3f}x ({max(out)[1]}) | {'yes' if low[0] >= 1.15 else 'no'} |")
    lines += slo_rows(results)
    out = ratios(results, DEFAULT_DISAGG, FCFS, ("output_tok_s",))
    if out:
        lines.append(f"| output tok/s, default disaggregated / fcfs, same GPUs ({len(out)} points) | (for the record) "
                     f"| median {statistics.median(x for x, _ in out):.3f}x; range {min(out)[0]:.3f}-{max(out)[0]:.3f}x | - |")
    return lines


def slo_rows(results: list[dict]) -> list[str]:
    """The rows of the default policy with a TPOT target (the goodput SLO), where it was run."""
    lines = []
    for path, what in ((("output_tok_s",), "output tok/s"), (("goodput_req_s",), "goodput")):
        out = ratios(results, DEFAULT_SLO, FCFS, path)
        if out:
            share = sum(x >= 1.0 for x, _ in out) / len(out)
            lines.append(f"| {what}, default with TPOT target = SLO / fcfs ({len(out)} points) | (the goodput mode) | "
                         f"{share:.0%} of points >= 1.0x; median {statistics.median(x for x, _ in out):.3f}x; "
                         f"lowest {min(out)[0]:.4f}x ({min(out)[1]}) | - |")
    for variant in (DEFAULT_SLO, FCFS):
        runs = [r for r in results if r["variant"] == variant and pick(r["metrics"], ("tpot_s", "p99"))]
        if runs and any(r["variant"] == DEFAULT_SLO for r in results):
            within = [r for r in runs if r["metrics"]["tpot_s"]["p99"] <= 1.02 * r["metrics"]["slo"]["tpot_s"]]
            worst = max(runs, key=lambda r: r["metrics"]["tpot_s"]["p99"] / r["metrics"]["slo"]["tpot_s"])
            lines.append(f"| TPOT p99 within the SLO, {variant} | {'yes, every point' if variant == DEFAULT_SLO else '-'} "
                         f"| {len(within)} of {len(runs)} points; worst {worst['metrics']['tpot_s']['p99'] * 1e3:.1f} ms "
                         f"at SLO {worst['metrics']['slo']['tpot_s'] * 1e3:.0f} ms ({worst['model']}, {worst['workload']}, "
                         f"load {worst.get('load')}) | {('yes' if len(within) == len(runs) else 'NO') if variant == DEFAULT_SLO else '-'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    a = p.parse_args(argv)
    found = sorted(a.folder.glob("*/results.json")) or sorted(a.folder.glob("results.json"))
    if not found:
        print(f"no results.json under {a.folder}", file=sys.stderr)
        return 1
    for path in found:
        results = json.loads(path.read_text())
        dispatch = results[0].get("dispatch", path.parent.name) if results else path.parent.name
        print(f"\n### Dispatch `{dispatch}` ({path})\n")
        print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A markdown report with plots from benchmark runs: `write_report(results, out_dir, title)`.

Each result is one run: {"experiment", "model", "hardware", "workload", "policy", "variant"
(the label its lines and rows carry, e.g. "aligned (no peer prefetch)"; the policy if absent),
"rate" (requests/s, or None for all-at-once), "requests", "seed", "metrics" (a
`bench.run_metrics.summarize` dict)}. The report has one section per (model, hardware,
workload): a table of every run, a table of ratios to the baseline policy's run at the same rate
(same experiment where there is one), and PNG plots beside report.md: throughput vs load (one
line per variant), and per rate the TPOT CDF and the spread of KV lengths inside decode batches
(alignment and kv_max - kv_mean per decode iteration, as CDFs). results.json keeps every run.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.run_metrics import pick, ratios

GROUP = ("model", "hardware", "workload")
RATIO_COLUMNS = [("decode_tok_s", "decode tok/s"), ("output_tok_s", "output tok/s"), ("goodput_req_s", "goodput"),
                 ("ttft_p99", "TTFT p99"), ("tpot_p50", "TPOT p50"), ("tpot_p99", "TPOT p99"),
                 ("itl_p99", "ITL p99")]
"""Ratio columns (run / baseline): throughputs are better above 1, latencies below 1."""


def write_report(results: Sequence[dict], out_dir: Path, title: str, notes: str = "", *,
                 baseline: str = "fcfs") -> Path:
    """Write out_dir/report.md, its PNG plots and out_dir/results.json; returns report.md's path.
    `baseline` names the policy every run is compared with."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # numpy scalars become numbers; anything else JSON cannot hold (a Path) its text
    # One line per run: a matrix of hundreds of runs with their plot series stays a few MB.
    as_json = "[\n" + ",\n".join(
        json.dumps(r, separators=(",", ":"), default=lambda o: o.item() if hasattr(o, "item") else str(o))
        for r in results) + "\n]"
    (out_dir / "results.json").write_text(as_json + "\n")
    lines = [f"# {title}", ""] + ([notes.strip(), ""] if notes.strip() else [])
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[tuple(r.get(k) for k in GROUP)].append(r)
    for key, runs in groups.items():
        lines += _section(key, sorted(runs, key=_order), out_dir, baseline)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _section(key: tuple, runs: list[dict], out_dir: Path, baseline: str) -> list[str]:
    model, hardware, workload = key
    labels = _Labels(runs)
    sizes = sorted({f"{r.get('requests')} requests, seed {r.get('seed')}" for r in runs})
    slos = sorted({f"goodput SLO: TTFT <= {1e3 * s['ttft_s']:g} ms, TPOT <= {1e3 * s['tpot_s']:g} ms"
                   for r in runs if (s := r["metrics"].get("slo"))})
    lines = [f"## {model} on {hardware}, {workload}", "", f"{'; '.join(sizes + slos)}.", "",
             "| variant | rate | decode tok/s | output tok/s | TTFT ms p50 / p90 / p99 | TPOT ms p50 / p90 / p99 "
             "| ITL ms p50 / p90 / p99 | goodput req/s (SLO met) | alignment | switches / iter | bubble share "
             "| link util | MBU | sched p99 ms | sched < 5 ms |",
             "|---" * 15 + "|"]
    for r in runs:
        m = r["metrics"]
        lines.append(
            f"| {labels[id(r)]} | {_rate(r.get('rate'))} | {_num(m.get('decode_tok_s'), '.1f')} "
            f"| {_num(m.get('output_tok_s'), '.1f')} | {_pcts(m.get('ttft_s'))} | {_pcts(m.get('tpot_s'))} "
            f"| {_pcts(m.get('itl_s'))} "
            f"| {_num(m.get('goodput_req_s'), '.2f')} ({_num(m.get('slo_met_share'), '.0%')}) "
            f"| {_num(m.get('alignment'), '.3f')} | {_num(m.get('switch_rate'), '.3f')} "
            f"| {_num(m.get('bubble_share'), '.1%')} | {_num(m.get('link_utilisation'), '.1%')} "
            f"| {_num(m.get('mbu'), '.1%')} | {_num(pick(m, ('schedule_s', 'p99')), '.2f', 1e3)} "
            f"| {_num(m.get('schedule_under_5ms'), '.1%')} |")
    lines += ["", f"Ratios to {baseline} at the same rate (throughput: higher is better; latency: lower is better):",
              "", "| variant | rate | " + " | ".join(f"{name} x {baseline}" for _, name in RATIO_COLUMNS) + " |",
              "|---" * (2 + len(RATIO_COLUMNS)) + "|"]
    for r in runs:
        base = _baseline(r, runs, baseline)
        vs = ratios(r["metrics"], base["metrics"]) if base else {}
        lines.append(f"| {labels[id(r)]} | {_rate(r.get('rate'))} | "
                     + " | ".join(_num(vs.get(k), '.2f') for k, _ in RATIO_COLUMNS) + " |")
    lines.append("")
    stem = _slug("-".join(str(k) for k in key))
    lines += [f"![throughput vs load]({_plot_throughput(runs, labels, out_dir / f'{stem}-throughput.png')})", ""]
    by_rate: dict = defaultdict(list)
    for r in runs:
        by_rate[r.get("rate")].append(r)
    for rate, same in by_rate.items():
        tag = f"{stem}-{_slug(_rate(rate))}"
        lines += [f"### {_rate(rate)}", "",
                  f"![TPOT CDF]({_plot_tpot_cdf(same, labels, out_dir / f'{tag}-tpot-cdf.png')}) "
                  f"![batch KV spread]({_plot_kv_spread(same, labels, out_dir / f'{tag}-kv-spread.png')})", ""]
    return lines


# ---- plots ------------------------------------------------------------------------------------

def _plot_throughput(runs: list[dict], labels: _Labels, path: Path) -> str:
    """Decode and output tok/s against the arrival rate; all-at-once runs sit right of the
    highest rate."""
    rates = sorted({r["rate"] for r in runs if r.get("rate") is not None})
    at_once = max(rates) * 1.25 if rates else 1.0
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("decode_tok_s", "output_tok_s"), ("decode tok/s", "output tok/s")):
        for label, own in _by_label(runs, labels).items():
            points = sorted((r["rate"] if r.get("rate") is not None else at_once, r["metrics"].get(key)) for r in own
                            if r["metrics"].get(key) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=label, color=labels.colour[label])
        ticks = rates + ([at_once] if any(r.get("rate") is None for r in runs) else [])
        ax.set_xticks(ticks, [f"{t:g}" for t in rates] + (["all at once"] if len(ticks) > len(rates) else []))
        ax.set(xlabel="arrival rate, requests/s", ylabel=name, title=f"{name} vs load")
        ax.grid(alpha=0.3)
    for ax in axes:
        _legend(ax)
    return _save(fig, path)


def _plot_tpot_cdf(runs: list[dict], labels: _Labels, path: Path) -> str:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for r in runs:
        _cdf(ax, [1e3 * v for v in pick(r["metrics"], ("series", "tpot_s")) or []], labels, r)
    ax.set(xlabel="TPOT, ms", ylabel="share of requests", title=f"TPOT CDF, {_rate(runs[0].get('rate'))}")
    _legend(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_kv_spread(runs: list[dict], labels: _Labels, path: Path) -> str:
    """Per decode iteration: alignment (sum L / (B max L)) and kv_max - kv_mean, as CDFs."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for r in runs:
        it = pick(r["metrics"], ("series", "iterations")) or {}
        _cdf(left, it.get("alignment", []), labels, r)
        _cdf(right, [a - b for a, b in zip(it.get("kv_max", []), it.get("kv_mean", []))], labels, r)
    left.set(xlabel="alignment (1 = all members the same KV length)", ylabel="share of decode iterations",
             title="batch alignment")
    right.set(xlabel="kv_max - kv_mean, tokens", ylabel="share of decode iterations", title="batch KV spread")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(fig, path)


def _cdf(ax, values, labels: _Labels, run: dict) -> None:
    v = np.sort(np.asarray(values, dtype=float))
    if v.size:
        label = labels[id(run)]
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=label, color=labels.colour[label])


def _legend(ax) -> None:
    """A legend, or 'no data' on an empty plot."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _save(fig: Figure, path: Path) -> str:
    """Render with Agg (no display) to `path`; returns its name for the markdown link."""
    fig.tight_layout()
    fig.set_dpi(72)  # screen resolution: a matrix writes ~100 plots into the repository
    FigureCanvasAgg(fig).print_png(str(path))
    return path.name


# ---- helpers ----------------------------------------------------------------------------------

def _order(r: dict) -> tuple:
    rate = r.get("rate")
    return (rate is None, rate or 0.0, str(r.get("variant") or r.get("policy")), str(r.get("experiment")))


class _Labels(dict):
    """Each run's label (by id of the run) and a colour per label that stays the same in every
    plot of a section: its variant (or policy), with its experiment in front where two
    experiments ran the same variant at the same rate."""

    def __init__(self, runs: list[dict]):
        plain = {id(r): str(r.get("variant") or r.get("policy")) for r in runs}
        seen = [(plain[id(r)], r.get("rate")) for r in runs]
        clash = len(set(seen)) < len(seen)
        super().__init__({id(r): f"{r.get('experiment')}: {plain[id(r)]}" if clash else plain[id(r)] for r in runs})
        self.colour = {label: f"C{i % 10}" for i, label in enumerate(sorted(set(self.values())))}


def _by_label(runs: list[dict], labels: _Labels) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        out[labels[id(r)]].append(r)
    return out


def _baseline(run: dict, runs: list[dict], policy: str) -> dict | None:
    """The baseline policy's run at the same rate, from the same experiment where there is one."""
    same = [r for r in runs if r.get("policy") == policy and r.get("rate") == run.get("rate")]
    own = [r for r in same if r.get("experiment") == run.get("experiment")]
    return (own or same or [None])[0]


def _rate(rate) -> str:
    return "all at once" if rate is None else f"{rate:g} req/s"


def _num(x, fmt: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(scale * x, fmt)


def _pcts(p: dict | None) -> str:
    """'p50 / p90 / p99' in ms."""
    return " / ".join(_num((p or {}).get(k), ".1f", 1e3) for k in ("p50", "p90", "p99"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()

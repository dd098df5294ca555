"""The soak's summary: one dict (written as JSON), the same as a markdown table, and the list
of broken invariants (empty: the run passed)."""
from __future__ import annotations

import json
from pathlib import Path

from bench.soak.checks import PROBLEMS, VERDICTS, percentiles
from bench.soak.server import blocks_held, in_flight
from bench.soak.workload import PROTOCOLS


def summary(soak, state: dict, meta: dict) -> dict:
    t, o = soak.tally, soak.opts
    by_protocol = {p: {"sent": t.sent[p], **{k: t.verdicts[k][p] for k in VERDICTS},
                       **{k: t.problems[k][p] for k in PROBLEMS}} for p in PROTOCOLS}
    out = {
        **meta,
        "duration_s": o.duration_s, "load_s": round(soak.load_s, 1), "concurrency": o.concurrency,
        "distinct_requests": len(soak.references), "references_s": round(soak.references_s, 1),
        "requests": t.total, "by_protocol": by_protocol,
        **{k: t.count(k) for k in VERDICTS},
        "bad_requests_sent": t.bad_sent,
        "tokens": t.tokens, "tokens_per_s": round(t.tokens / soak.load_s, 1),
        "completed_per_s": round(t.count("completed") / soak.load_s, 2),
        "latency_s": percentiles(t.latency), "ttft_s": percentiles(t.ttft),
        "faults": {"asked": o.faults, "api": soak.faults.available, "armed": soak.faults.armed,
                   "fired": soak.faults.fired, "armed_not_fired": soak.faults.left_armed,
                   "refused": soak.faults.refused, "policy_switches": soak.faults.policy_switches},
        "failed_by_fault": t.count("fault"),
        **{k: t.count(k) for k in PROBLEMS},
        "server_finished": _delta(soak.totals_before.get("finished", {}), state["totals"].get("finished", {})),
        "in_flight_at_end": in_flight(state), "counts_at_end": state["counts"],
        "blocks_held_at_end": blocks_held(state),
        "examples": dict(t.examples),
    }
    out["failures"] = failures(out)
    out["passed"] = not out["failures"]
    return out


def failures(s: dict) -> list[str]:
    """The invariants a soak must hold."""
    out = [f"{s[k]} {k}" for k in PROBLEMS if s[k]]
    if s["in_flight_at_end"]:
        out.append(f"{s['in_flight_at_end']} requests still in flight after the load: {s['counts_at_end']}")
    out += [f"{n} KV blocks still held in tier {tier}" for tier, n in s["blocks_held_at_end"].items() if n]
    if s["cancelled"] >= 10 and not s["server_finished"].get("cancelled"):
        out.append(f"{s['cancelled']} streams cancelled by their client, none cancelled on the server")
    if not s["completed"]:
        out.append("no stream completed")
    return out


def markdown(s: dict) -> str:
    def ms(d: dict) -> str:
        return "n/a" if d["p50"] is None else f"{d['p50'] * 1000:.0f} / {d['p99'] * 1000:.0f} ms"

    f = s["faults"]
    if not f["asked"]:
        faults = "off"
    elif not f["api"]:
        faults = "asked, but the server has no fault API enabled"
    else:
        faults = (f"armed {_kinds(f['armed'])}; fired {_kinds(f['fired'])}"
                  + (f"; armed, not fired: {_kinds(f['armed_not_fired'])}" if f["armed_not_fired"] else ""))
    rows = [
        ("result", "PASSED" if s["passed"] else "FAILED: " + "; ".join(s["failures"])),
        ("command", f"`{s['command']}`"), ("date", s["date"]), ("machine", s["machine"]), ("engine", s["engine"]),
        ("duration", f"{s['load_s']:.0f} s of load (asked {s['duration_s']:.0f} s); references {s['references_s']:.0f} s"),
        ("concurrency", f"{s['concurrency']} streams ({', '.join(PROTOCOLS)} in turn)"),
        ("requests", f"{s['requests']} (" + ", ".join(f"{p} {v['sent']}" for p, v in s["by_protocol"].items())
         + f") over {s['distinct_requests']} distinct requests"),
        ("completed", f"{s['completed']}, each equal to its reference"),
        ("cancelled by the client", f"{s['cancelled']}, each a prefix of its reference"),
        ("bad requests", f"{s['bad_requests_sent']} sent, {s['refused']} refused naming the field"),
        ("refused for overload", str(s["overloaded"])),
        ("the server's finish reasons", ", ".join(f"{k} {v}" for k, v in sorted(s["server_finished"].items()))),
        ("faults", faults),
        ("failed by faults", f"{s['failed_by_fault']} (final error, \"injected\"; tokens before it a prefix)"),
        ("lost / duplicated / late", f"{s['lost']} / {s['duplicated']} / {s['late']}"),
        ("mismatched", str(s["mismatched"])),
        ("wrong refusals / other failures", f"{s['wrong_refusal']} / {s['failed']}"),
        ("in flight at the end", str(s["in_flight_at_end"])),
        ("KV blocks held at the end", ", ".join(f"{k} {v}" for k, v in s["blocks_held_at_end"].items())),
        ("tokens", f"{s['tokens']} ({s['tokens_per_s']:.0f} tok/s; {s['completed_per_s']:.2f} completed streams/s)"),
        ("latency p50 / p99 (completed)", ms(s["latency_s"])),
        ("TTFT p50 / p99 (completed)", ms(s["ttft_s"])),
    ]
    lines = ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "| protocol | sent | completed | cancelled | refused | failed by faults | lost | duplicated | late | mismatched |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p, v in s["by_protocol"].items():
        lines.append(f"| {p} | {v['sent']} | {v['completed']} | {v['cancelled']} | {v['refused']} | {v['fault']} | "
                     f"{v['lost']} | {v['duplicated']} | {v['late']} | {v['mismatched']} |")
    if f["policy_switches"]:
        lines += ["", "Policy switches: " + "; ".join(f["policy_switches"])]
    for problem, examples in s["examples"].items():
        lines += ["", f"{problem}:", *[f"- {e}" for e in examples]]
    return "\n".join(lines) + "\n"


def _delta(before: dict, after: dict) -> dict:
    """Counts of `after` less those of `before` (the server's totals over the load)."""
    return {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}


def _kinds(d: dict) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(d.items()) if n) or "none"


def write(s: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "summary.json", out / "summary.md"
    js.write_text(json.dumps(s, indent=2) + "\n")
    md.write_text(f"# Soak, {s['date']}\n\n" + markdown(s))
    return js, md

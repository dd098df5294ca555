"""Judging each stream against its single-request reference, and the tally of a run.

A stream's verdict is one of:
  completed   read to its final response; its tokens equal the reference's, token for token
              (Triton: output ids; OpenAI: the text and usage.completion_tokens)
  cancelled   cancelled by the client; what it got is a prefix of the reference
  refused     a bad request answered with an error naming the field (HTTP 4xx, or gRPC's error)
  fault       ended by a final error from an injected fault ("injected" in it); what it got
              before is a prefix of the reference
  overloaded  refused by a full queue (HTTP 429/503, UNAVAILABLE); allowed, reported
and the problems, each counted where it happens (a stream may show several):
  lost        no final response by the per-request deadline
  duplicated  more than one final response, or a response's tokens repeated
  late        responses after the final one
  mismatched  tokens that differ from the reference (or from its prefix)
  wrong_refusal  a bad request not refused with its field named, or refused with a 5xx
  failed      any other final error (not injected, not a refusal)
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from bench.soak.clients import Record

PROBLEMS = ("lost", "duplicated", "late", "mismatched", "wrong_refusal", "failed")
VERDICTS = ("completed", "cancelled", "refused", "fault", "overloaded")


@dataclass(frozen=True)
class Reference:
    """A spec's answer when sent alone: token ids (Triton) or text (OpenAI)."""

    tokens: tuple
    finish_reason: str | None
    usage_tokens: int | None = None

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class Verdict:
    kind: str | None
    problems: tuple[str, ...]
    detail: str = ""


def judge(rec: Record, ref: Reference | None) -> Verdict:
    problems = []
    if rec.finals > 1:
        problems.append("duplicated")
    if rec.late:
        problems.append("late")
    if rec.end == "lost":
        return Verdict(None, (*problems, "lost"), f"no final response ({len(rec.tokens)} tokens so far)")
    if rec.job.bad is not None:
        return _judge_bad(rec, problems)
    err = rec.error or ""
    if rec.end == "refused" or err:
        if "injected" in err:
            kind = "fault"
        elif rec.status in (429, 503) or "queue is full" in err or "UNAVAILABLE" in err:
            kind = "overloaded"
        else:
            return Verdict(None, (*problems, "failed"), f"HTTP {rec.status}: {err}" if rec.status else err)
        return _prefix(rec, ref, kind, problems)
    if rec.end == "cancelled":
        return _prefix(rec, ref, "cancelled", problems)
    return _whole(rec, ref, problems)


def _judge_bad(rec: Record, problems: list) -> Verdict:
    field = rec.job.bad.field
    ok = (rec.error is not None and field in rec.error and not rec.tokens
          and (rec.status is None or 400 <= rec.status < 500))
    if ok:
        return Verdict("refused", tuple(problems))
    return Verdict(None, (*problems, "wrong_refusal"),
                   f"{rec.job.bad.name}: status {rec.status}, {len(rec.tokens)} tokens, error {rec.error!r}")


def _prefix(rec: Record, ref: Reference, kind: str, problems: list) -> Verdict:
    got = _joined(rec)
    want = ref.text if rec.job.protocol == "openai" else list(ref.tokens)
    if got != want[:len(got)]:
        return Verdict(kind, (*problems, "mismatched"), _diff(got, want))
    return Verdict(kind, tuple(problems))


def _whole(rec: Record, ref: Reference, problems: list) -> Verdict:
    got = _joined(rec)
    want = ref.text if rec.job.protocol == "openai" else list(ref.tokens)
    if got != want or rec.finish_reason != ref.finish_reason:
        if rec.job.protocol != "openai" and _without_repeats(rec.pieces) == want:
            return Verdict("completed", (*problems, "duplicated"), "a response repeated")
        return Verdict("completed", (*problems, "mismatched"),
                       f"finish {rec.finish_reason} vs {ref.finish_reason}; " + _diff(got, want))
    if rec.job.protocol == "openai" and rec.usage_tokens != ref.usage_tokens:
        return Verdict("completed", (*problems, "mismatched"),
                       f"usage.completion_tokens {rec.usage_tokens} vs the reference's {ref.usage_tokens}")
    return Verdict("completed", tuple(problems))


def _joined(rec: Record):
    return "".join(rec.tokens) if rec.job.protocol == "openai" else list(rec.tokens)


def _without_repeats(pieces: list[list]) -> list:
    out, last = [], None
    for p in pieces:
        if p and p == last:
            continue
        out.extend(p)
        last = p
    return out


def _diff(got, want) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first difference at {i} of {len(got)} (reference {len(want)}): got {got[i:i + 8]!r}, want {want[i:i + 8]!r}"


class Tally:
    """Counts by protocol, the problems with examples, tokens and the latencies of completed streams."""

    def __init__(self):
        self.sent = Counter()
        self.verdicts: dict[str, Counter] = defaultdict(Counter)
        self.problems: dict[str, Counter] = defaultdict(Counter)
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.tokens = 0
        self.completed_tokens = 0
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.bad_sent = 0

    def add(self, rec: Record, verdict: Verdict) -> None:
        p = rec.job.protocol
        self.sent[p] += 1
        self.bad_sent += rec.job.bad is not None
        if verdict.kind:
            self.verdicts[verdict.kind][p] += 1
        for problem in verdict.problems:
            self.problems[problem][p] += 1
            if len(self.examples[problem]) < 10:
                self.examples[problem].append(f"{p} {rec.job.spec.label}: {verdict.detail}")
        self.tokens += rec.n_tokens
        if verdict.kind == "completed" and not verdict.problems:
            self.completed_tokens += rec.n_tokens
            if rec.end_at is not None:
                self.latency.append(rec.end_at - rec.start)
            if rec.first_at is not None:
                self.ttft.append(rec.first_at - rec.start)

    def count(self, name: str) -> int:
        table = self.problems if name in PROBLEMS else self.verdicts
        return sum(table[name].values())

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}

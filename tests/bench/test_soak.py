"""The soak (`make soak`), short: 45 s of 16 streams over Triton gRPC, HTTP and the OpenAI API on
the demo engine, faults injected where the server has the fault API; every stream equals its
single-request reference (or a prefix of it), nothing is lost, duplicated or late, and the
server holds no request and no KV block at the end. Before it, the checker itself on made-up
streams: it catches what it claims to catch."""
from __future__ import annotations

import json

import pytest

from bench.soak.checks import Reference, judge
from bench.soak.clients import Record
from bench.soak.report import markdown, summary
from bench.soak.runner import Options, Soak
from bench.soak.server import launch
from bench.soak.workload import BadRequest, Job, Spec

pytestmark = pytest.mark.integration

SPEC = Spec(0, "triton", "Story 0: the river", 4)
REF = Reference((5, 6, 7, 8), "length")


def stream(*pieces, final=True, protocol="grpc", cancel=None, error=None, late=0, finals=1, bad=None) -> Record:
    rec = Record(Job(protocol, SPEC, bad=bad, cancel_after=cancel), start=0.0)
    for i, p in enumerate(pieces):
        rec.got(list(p), now=0.1 * (i + 1))
    if cancel is not None:  # the client cancelled it: no final response
        rec.end = "cancelled"
    else:
        for _ in range(finals if final else 0):
            rec.final(1.0, reason=None if error else "length", error=error)
    rec.late += late
    return rec


def test_the_checker_passes_a_stream_equal_to_its_reference_whatever_its_pieces():
    assert judge(stream([5, 6], [7], [8]), REF).problems == ()
    assert judge(stream([5, 6, 7, 8]), REF).kind == "completed"


@pytest.mark.parametrize("rec, problem", [
    (stream([5, 6], [7], [9]), "mismatched"),
    (stream([5, 6], [7]), "mismatched"),            # short of the reference, yet "length"
    (stream([5, 6], [5, 6], [7, 8]), "duplicated"),  # a response sent twice
    (stream([5, 6, 7, 8], finals=2), "duplicated"),  # two final responses
    (stream([5, 6, 7, 8], late=1), "late"),
    (stream([5, 6], final=False), "lost"),
    (stream([5, 9], cancel=2), "mismatched"),        # a cancelled stream must be a prefix
    (stream([5], error="decode failed: out of memory"), "failed"),
    (stream(error="max_tokens is wrong", bad=BadRequest("x", "top_p", {})), "wrong_refusal"),  # field not named
    (stream([5, 6, 7, 8], bad=BadRequest("x", "top_p", {})), "wrong_refusal"),  # accepted
])
def test_the_checker_catches(rec, problem):
    assert problem in judge(rec, REF).problems


def test_the_checker_accepts_cancels_faults_and_refusals_for_what_they_are():
    assert judge(stream([5, 6], cancel=2), REF).kind == "cancelled"
    assert judge(stream([5], error="decode failed: injected decode step failure"), REF).kind == "fault"
    assert judge(stream(error="top_p: 1.5 is outside (0, 1]", bad=BadRequest("x", "top_p", {})), REF).kind == "refused"


def test_a_short_soak_over_the_three_protocols_leaves_nothing_behind(demo_engine_dir, tmp_path):
    server, ends = launch(demo_engine_dir, tmp_path / "server.log", "soak-token", faults=True)
    try:
        soak = Soak(ends, Options(duration_s=45, concurrency=16, specs=12, max_output=96, deadline_s=120,
                                  faults=True, fault_interval_s=5, settle_s=60))
        state = soak.run()
    finally:
        killed = server.stop()
    s = summary(soak, state, {"command": "test", "date": "", "machine": "", "engine": str(demo_engine_dir)})
    print(markdown(s))
    assert not killed, f"{killed} outlived SIGTERM"
    assert s["passed"], json.dumps({k: s[k] for k in ("failures", "examples")}, indent=1)
    for protocol, counts in s["by_protocol"].items():  # each protocol completed, cancelled and refused some
        assert counts["completed"] and counts["cancelled"] and counts["refused"], (protocol, counts)
    assert s["in_flight_at_end"] == 0 and not any(s["blocks_held_at_end"].values())
    if s["faults"]["api"]:  # the server has the fault API: faults were armed, and some fired
        assert sum(s["faults"]["fired"].values()) > 0, s["faults"]

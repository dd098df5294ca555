"""GPU-Prefetch-For-GPU through the run loop, on the real torch engine with a helper device
("cpu:1": a second real KV pool on the same CPU, so the path runs on machines without GPUs).
Loads go host -> helper -> decode device as the transfer planner routes them; tokens do not
change, and every hop's blocks are accounted for."""
from __future__ import annotations

import pytest

from engines.base import HOST, SamplingParams
from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason
from orchestrator.service import Orchestrator
from orchestrator.stream import TokenStream

from .test_aligned import PROMPTS, run

TIERS = ("cpu", "cpu:1", HOST)


@pytest.fixture(scope="module")
def engine(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", helper_devices=("cpu:1",), kv_blocks=96, host_kv_blocks=256)
    yield eng
    eng.close()


def serve(engine, sampling=None, **cfg):
    orch = Orchestrator(engine, ServeConfig(**cfg))
    streams = [TokenStream() for _ in PROMPTS]
    for i, (p, s) in enumerate(zip(PROMPTS, streams)):
        orch.submit(p, max_tokens=14, end_id=0, sampling=sampling(i) if sampling else None, on_event=s)
    run(orch)
    assert all(engine.kv_blocks_used(t) == 0 for t in TIERS)
    assert orch.ledger.holders == 0 and all(orch.ledger.used(t) == 0 for t in TIERS)
    return [s.result(timeout=1) for s in streams], orch


def hops(orch) -> set[tuple[str, str]]:
    return {(t.src, t.dst) for t in orch.loop.metrics.transfers}


@pytest.mark.parametrize("sampling", [None, lambda i: SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i)],
                         ids=["greedy", "seeded"])
def test_tokens_identical_when_every_load_goes_through_the_helper(engine, sampling):
    want, _ = serve(engine, sampling, policy="fcfs", max_batch_size=16)
    got, orch = serve(engine, sampling, policy="aligned", max_batch_size=3, kmin=2,
                      helper_devices="cpu:1", prefetch_route="helper")
    assert got == want and all(len(o) == 14 for o in got)
    assert hops(orch) == {("cpu", HOST), (HOST, "cpu:1"), ("cpu:1", "cpu")}
    # Each load crossed both hops whole: as many bytes reached the helper as left it.
    transfers = orch.loop.metrics.transfers
    into = sum(t.bytes for t in transfers if t.dst == "cpu:1")
    assert into > 0 and into == sum(t.bytes for t in transfers if t.src == "cpu:1")


def test_direct_route_never_touches_the_helper(engine):
    _, orch = serve(engine, policy="aligned", max_batch_size=3, kmin=2, helper_devices="cpu:1",
                    prefetch_route="direct")
    assert hops(orch) == {("cpu", HOST), (HOST, "cpu")}


def test_auto_route_goes_through_the_helper_when_spills_queue_on_the_decode_link(engine):
    # The demo model's KV is small (a spill is ~100 kB), so at PCIe 5 speed the links' fixed
    # latency would decide every route; a 1 GB/s host link makes it bandwidth-bound, as a real
    # model's multi-MB batches are.
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=3, kmin=2, helper_devices="cpu:1",
                                            pcie_gb_s=1.0))
    planner, calls = orch.loop.executor.planner, []
    real_route = planner.route

    def spy(nbytes, queued=None):
        route = real_route(nbytes, queued)
        calls.append((nbytes, dict(queued or {}), route))
        return route

    planner.route = spy
    for p in PROMPTS:
        orch.submit(p, max_tokens=14, end_id=0)
    run(orch)
    pcie, peer = planner.host_link, planner.peer_link
    for nbytes, queued, route in calls:
        direct = pcie.seconds(queued.get("cpu", 0.0) + nbytes)
        helper = pcie.seconds(queued.get("cpu:1", 0.0) + nbytes) + peer.seconds(nbytes)
        assert route.via == ("cpu:1" if helper < direct else None)
    # Loads started beside a switch's spills (queued on the decode device's link) went through
    # the helper; loads with the link idle went direct.
    assert any(r.via == "cpu:1" and q.get("cpu", 0) > 0 for _, q, r in calls)
    assert any(r.via is None and not q.get("cpu") for _, q, r in calls)
    assert hops(orch) >= {(HOST, "cpu:1"), ("cpu:1", "cpu"), (HOST, "cpu")}


@pytest.mark.parametrize("hop", [HOST, "cpu:1"], ids=["first-hop", "second-hop"])
def test_a_failed_hop_ends_only_its_requests_and_frees_every_tier(engine, fault_switch, hop):
    faulty = fault_switch(engine)
    orch = Orchestrator(faulty, ServeConfig(policy="aligned", max_batch_size=3, kmin=2, helper_devices="cpu:1",
                                            prefetch_route="helper"))
    reqs = [orch.submit(p, max_tokens=14, end_id=0) for p in PROMPTS]
    faulty.arm("copy", src=hop)  # the first copy out of that tier fails mid-transfer
    run(orch)
    assert faulty.armed is None, "the fault never fired"
    failed = [r for r in reqs if r.finish_reason is FinishReason.ERROR]
    assert failed and len(failed) < len(reqs)
    assert all("injected copy failure" in r.error for r in failed)
    assert all(len(r.output_ids) == 14 for r in reqs if r not in failed)
    assert all(faulty.kv_blocks_used(t) == 0 for t in TIERS) and orch.ledger.holders == 0

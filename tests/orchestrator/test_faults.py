"""Faults injected into the real torch engine (`engines.faults`, the same wrapper a server started
with ALIGNED_FAULT_INJECTION=1 arms through its admin API): each fails only the requests it
touches, each of those gets a final error event, every other request gets exactly the tokens of
a run without the fault, no KV block stays held in any tier, and the next request is served."""
from __future__ import annotations

import time

import pytest

from engines.base import HOST, IN_FLIGHT, TransferTimedOut
from engines.faults import FaultInjectingEngine
from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason
from orchestrator.service import Orchestrator
from orchestrator.stream import TokenStream

PROMPTS = [[256] + [40 + (i * 7 + j) % 180 for j in range(n - 1)]
           for i, n in enumerate([6, 70, 9, 66, 5, 72, 8, 68, 7, 64])]
TIERS = ("cpu", "cpu:1", HOST)


@pytest.fixture(scope="module")
def engine(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=96, host_kv_blocks=256, helper_devices=("cpu:1",))
    yield eng
    eng.close()


def run(orch: Orchestrator, max_steps: int = 20_000) -> None:
    for _ in range(max_steps):
        if not orch.loop.step():
            return
    raise AssertionError("the run loop never went idle")


def serve(engine, cfg: ServeConfig, arm=None, after_steps: int = 1) -> tuple[list, list[TokenStream], Orchestrator]:
    """Submit PROMPTS, step `after_steps` times, call arm(), run to the end."""
    orch = Orchestrator(engine, cfg)
    streams = [TokenStream() for _ in PROMPTS]
    reqs = [orch.submit(p, max_tokens=14, end_id=0, on_event=s) for p, s in zip(PROMPTS, streams)]
    for _ in range(after_steps):
        orch.loop.step()
    if arm is not None:
        arm()
    run(orch)
    return reqs, streams, orch


def no_block_held(engine, timeout: float = 0.0) -> bool:
    """Every tier empty (within `timeout` s: blocks of a hung copy come back when it ends)."""
    deadline = time.monotonic() + timeout
    while any(engine.kv_blocks_used(t) for t in TIERS):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


CASES = {
    # kind: (config, steps before arming); aligned parks prefilled requests in the host pool,
    # and with the helper route its loads go host -> cpu:1 -> cpu (device <-> device copies).
    "decode_error": (dict(policy="fcfs", max_batch_size=4), 3),
    "prefill_error": (dict(policy="fcfs", max_batch_size=4), 1),
    "copy_error": (dict(policy="aligned", max_batch_size=3, kmin=2), 1),
    "copy_hang": (dict(policy="aligned", max_batch_size=3, kmin=2, transfer_timeout_s=0.3), 1),
    "host_full": (dict(policy="aligned", max_batch_size=3, kmin=2), 1),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_a_fault_ends_only_the_requests_it_touches(engine, kind):
    options, steps = CASES[kind]
    cfg = ServeConfig(**options, helper_devices="cpu:1")
    _, clean, _ = serve(engine, cfg)
    reference = [s.result(timeout=1) for s in clean]
    faulty = FaultInjectingEngine(engine, hang_s=1.5)
    reqs, streams, orch = serve(faulty, cfg, arm=lambda: faulty.faults.arm(kind), after_steps=steps)
    assert faulty.faults.snapshot()["fired"] == {kind: 1}, "the fault never fired"
    failed = [i for i, r in enumerate(reqs) if r.finish_reason is FinishReason.ERROR]
    assert failed and len(failed) < len(reqs)
    for i, s in enumerate(streams):
        tokens = s.result(timeout=1)  # a final event for everyone: nobody hangs
        if i in failed:
            assert s.finish_reason is FinishReason.ERROR and "injected" in s.error, s.error
        else:
            assert tokens == reference[i] and s.finish_reason is not FinishReason.ERROR
    assert orch.ledger.holders == 0
    assert no_block_held(faulty, timeout=3.0 if kind == "copy_hang" else 0.0)
    # The server goes on: the next request gets the tokens it gets without any fault.
    s = TokenStream()
    orch.submit(PROMPTS[1], max_tokens=14, end_id=0, on_event=s)
    run(orch)
    assert s.result(timeout=1) == reference[1]
    assert no_block_held(faulty)


def test_a_hung_move_is_given_up_at_its_deadline(engine):
    """A hung copy costs the transfer timeout, not the hang: its requests fail at the deadline
    while the copy is still stuck, and its blocks come back only once it ends."""
    hang_s = 6.0
    faulty = FaultInjectingEngine(engine, hang_s=hang_s)
    cfg = ServeConfig(policy="aligned", max_batch_size=3, kmin=2, transfer_timeout_s=0.4)
    orch = Orchestrator(faulty, cfg)
    reqs = [orch.submit(p, max_tokens=14, end_id=0) for p in PROMPTS]
    orch.loop.step()
    faulty.faults.arm("copy_hang")
    t0 = time.monotonic()
    run(orch)
    failed = [r for r in reqs if r.finish_reason is FinishReason.ERROR]
    assert failed and all("transfer_timeout_s=0.4s, given up (hang injected)" in r.error for r in failed)
    ended = max(r.finish_time for r in failed) - t0
    assert ended < hang_s / 2, f"its requests failed after {ended:.1f}s: the loop waited for the hung copy"
    if time.monotonic() - t0 < hang_s - 0.5:
        assert any(faulty.kv_blocks_used(t) for t in TIERS), "the hung copy's blocks were handed back while it ran"
    assert no_block_held(faulty, timeout=hang_s + 2)


@pytest.mark.parametrize("dst", [HOST, "cpu:1"], ids=["device-to-host", "device-to-device"])
def test_the_engine_gives_up_on_a_hung_copy_without_stalling_the_next(engine, dst):
    from engines.base import PrefillRequest
    engine.prefill([PrefillRequest("a", PROMPTS[1]), PrefillRequest("b", PROMPTS[3])])
    engine.inject_copy_fault("hang", hang_s=1.0)
    hung = engine.move(["a"], "cpu", dst)
    with pytest.raises(TransferTimedOut, match="has not finished after 0.05s"):
        engine.wait(hung, timeout=0.05)
    assert engine.tier_of("a") == IN_FLIGHT  # waiting less than it takes gives nothing up
    assert engine.abandon(hung) == "hang injected"
    ok = engine.move(["b"], "cpu", dst)  # the copy worker is not stuck behind it
    engine.wait(ok, timeout=5)
    assert engine.tier_of("b") == dst
    held = engine.kv_blocks_used("cpu"), engine.kv_blocks_used(dst)
    engine.free(["a", "b"])
    after = engine.kv_blocks_used("cpu"), engine.kv_blocks_used(dst)
    assert after[0] == held[0] > 0 and 0 < after[1] < held[1]  # a's blocks at both ends, held; b's freed
    assert no_block_held(engine, timeout=3.0)


def test_a_host_pool_too_small_for_everyone_fails_nobody(demo_engine_dir):
    """Host pool exhaustion without a fault: the policy books host blocks before it parks, so a
    pool that holds two requests' KV only means fewer are parked; everyone gets their tokens."""
    small = load_engine(demo_engine_dir, device="cpu", kv_blocks=96, host_kv_blocks=10)
    try:
        reqs, streams, orch = serve(small, ServeConfig(policy="aligned", max_batch_size=3, kmin=2))
        assert all(r.finish_reason is not FinishReason.ERROR for r in reqs)
        assert all(len(s.result(timeout=1)) == 14 for s in streams)
        assert orch.loop.metrics.transfers, "nothing was parked: the host pool was never used"
        assert small.kv_blocks_used("cpu") == 0 and small.kv_blocks_used(HOST) == 0
    finally:
        small.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop re-raises, by design
def test_a_crashed_run_loop_fails_everyone_in_flight_and_refuses_the_next(engine):
    """A bug in the scheduler kills the loop thread: the requests it held end with an error (not
    a hang), later submits are refused at once naming why, and the failures are counted."""
    from orchestrator.core import RequestRejected
    orch = Orchestrator(engine, ServeConfig(policy="fcfs"))
    streams = [TokenStream() for _ in range(3)]

    def broken(draft):
        raise RuntimeError("a scheduler bug")
    orch.loop.policy.schedule = broken
    for p, s in zip(PROMPTS, streams):
        orch.submit(p, max_tokens=4, end_id=0, on_event=s)
    orch.start()
    for s in streams:
        s.result(timeout=30)
        assert s.finish_reason is FinishReason.ERROR and "internal error in the scheduler" in s.error
    with pytest.raises(RequestRejected, match="internal error in the scheduler"):
        orch.submit(PROMPTS[0], max_tokens=4, end_id=0)
    assert orch.loop.metrics.failed["scheduler"] == 3
    assert engine.kv_blocks_used("cpu") == 0

"""The host-pool policies (`aligned`, `fcfs-offload`) on the real torch engine with a host KV
pool: exactness across offload, alignment, the starvation guard, and the transfer metrics."""
from __future__ import annotations

import pytest

from engines.base import HOST, SamplingParams
from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, RequestState
from orchestrator.service import Orchestrator
from orchestrator.stream import TokenStream


class StepClock:
    """The run loop's clock in iterations: the test advances it once per step, so waits are
    counted in iterations whatever the machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def engine(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=96, host_kv_blocks=256)
    yield eng
    eng.close()


def run(orch: Orchestrator, clock: StepClock | None = None, max_steps: int = 20_000) -> int:
    for n in range(max_steps):
        if clock is not None:
            clock.now += 1
        if not orch.loop.step():
            return n
    raise AssertionError("the run loop never went idle")


# Prompts of two length clusters, interleaved so that arrival order mixes them.
PROMPTS = [[256] + [40 + (i * 7 + j) % 180 for j in range(n - 1)]
           for i, n in enumerate([6, 70, 9, 66, 5, 72, 8, 68, 7, 64])]


def outputs(engine, policy: str, sampling=None, **cfg) -> tuple[list[list[int]], Orchestrator]:
    orch = Orchestrator(engine, ServeConfig(policy=policy, **cfg))
    streams = [TokenStream() for _ in PROMPTS]
    for i, (p, s) in enumerate(zip(PROMPTS, streams)):
        sp = sampling(i) if sampling else None
        orch.submit(p, max_tokens=14, end_id=0, sampling=sp, on_event=s)
    run(orch)
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used(HOST) == 0
    assert orch.ledger.holders == 0
    return [s.result(timeout=1) for s in streams], orch


@pytest.mark.parametrize("sampling", [None, lambda i: SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i)],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("policy", ["aligned", "fcfs-offload"])
def test_tokens_identical_whether_kv_stayed_or_went_to_host(engine, policy, sampling):
    # Reference: every request stays on the device the whole time (fcfs, one batch).
    want, _ = outputs(engine, "fcfs", sampling, max_batch_size=16)
    # Batches of 3 with Kmin 2: most requests are parked after prefill, loaded back, and spilled
    # again on switches.
    got, orch = outputs(engine, policy, sampling, max_batch_size=3, kmin=2)
    assert got == want
    m = orch.loop.metrics
    assert m.transfer_bytes > 0 and len(m.transfers) > 0
    assert {(t.src, t.dst) for t in m.transfers} == {("cpu", HOST), (HOST, "cpu")}
    assert all(len(o) == 14 for o in got)


def test_aligned_batches_are_better_aligned_than_fcfs(engine):
    _, fcfs = outputs(engine, "fcfs", max_batch_size=4)
    _, aligned = outputs(engine, "aligned", max_batch_size=4, kmin=2)

    def mean_alignment(orch):
        recs = [r for r in orch.loop.metrics.history if r.batch_size]
        return sum(r.alignment * r.batch_size for r in recs) / sum(r.batch_size for r in recs)

    a, f = mean_alignment(aligned), mean_alignment(fcfs)
    assert a > f + 0.2, f"aligned {a:.2f} vs fcfs {f:.2f}"
    assert aligned.loop.metrics.tokens == fcfs.loop.metrics.tokens == 14 * len(PROMPTS)


def test_a_lone_request_runs_at_once_and_never_touches_the_host(engine):
    orch = Orchestrator(engine, ServeConfig(policy="aligned"))
    s = TokenStream()
    orch.submit(PROMPTS[1], max_tokens=10, end_id=0, on_event=s)
    steps = run(orch)
    assert len(s.result(timeout=1)) == 10 and steps == 10
    assert orch.loop.metrics.transfer_bytes == 0


def test_a_fitting_prompt_is_prefilled_into_the_batch_ahead_of_an_earlier_misfit(engine):
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=4, max_prefill_tokens=8))
    first = orch.submit(PROMPTS[0], max_tokens=20, end_id=0)  # 6 tokens: the running batch
    orch.loop.step()
    long_one = orch.submit(PROMPTS[1], max_tokens=4, end_id=0)  # 70 tokens, arrived first
    short = orch.submit(PROMPTS[0][:-1] + [99], max_tokens=4, end_id=0)  # 6 tokens: fits the span
    orch.loop.step()
    # The prefill budget (8 tokens) takes one prompt: the fitting one, straight into the batch.
    assert orch.loop.pool.running == [first, short] and list(orch.loop.pool.waiting) == [long_one]
    orch.loop.step()  # now the long one is prefilled, and parked: it does not fit the span
    assert long_one.state is RequestState.PARKED and short.state is RequestState.RUNNING
    run(orch)
    assert all(r.finish_reason is FinishReason.LENGTH for r in (first, long_one, short))
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used(HOST) == 0


def test_engine_without_host_pool_runs_aligned_as_fcfs(demo_engine_dir, caplog):
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=32, host_kv_blocks=0)
    try:
        orch = Orchestrator(eng, ServeConfig(policy="aligned"))
        assert orch.policy.name == "fcfs" and "no host KV pool" in caplog.text
        with pytest.raises(ValueError, match="fcfs-offload.*needs a host KV pool"):
            Orchestrator(eng, ServeConfig(policy="fcfs-offload"))
    finally:
        eng.close()


@pytest.fixture
def copies_in_step(monkeypatch):
    """Host-pool copies done within the iteration that starts them: these tests count waits in
    iterations, and a copy running on the copy thread beside the step finishes after a number of
    iterations that depends on how the two threads share the cores (18 in one CI run, for a bound
    of 16), not on the policy under test."""
    from concurrent.futures import Future

    from engines.torch.kv_transfer import BlockCopier, PendingCopy

    def start(self, src, src_blocks, dst, dst_blocks):
        assert src.device.type == "cpu" and dst.device.type == "cpu"
        done: Future = Future()
        BlockCopier._copy_on_cpu(src, src_blocks, dst, dst_blocks)
        done.set_result(None)
        return PendingCopy(future=done)

    monkeypatch.setattr(BlockCopier, "start", start)


def starvation_run(engine, max_wait: float, steps: int = 240):
    """An adversarial stream: a backlog of short requests, then one more each iteration (what
    the batch of 4 finishes per iteration), so the host pool always holds short requests nearer
    to the running batch than one long outlier parked among them. Returns the outlier and every
    request."""
    clock = StepClock()
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=4, kmin=2, max_wait_s=max_wait),
                        clock=clock)
    cluster = lambda k: [256] + [50 + (k + j) % 60 for j in range(7 + k % 3)]
    reqs = [orch.submit(cluster(k), max_tokens=4, end_id=0) for k in range(24)]
    for _ in range(3):
        clock.now += 1
        orch.loop.step()
    outlier = orch.submit([256] + [70 + j % 90 for j in range(150)], max_tokens=12, end_id=0)
    reqs.append(outlier)
    for k in range(steps):
        reqs.append(orch.submit(cluster(k), max_tokens=4, end_id=0))
        clock.now += 1
        orch.loop.step()
    return outlier, reqs, orch, clock


MAX_WAIT = 16


def longest_gap(r) -> float:
    return max((b - a for a, b in zip(r.token_times, r.token_times[1:])), default=0.0)


def test_without_the_guard_density_first_starves_the_outlier(engine, copies_in_step):
    outlier, _, orch, clock = starvation_run(engine, max_wait=1e9)
    run(orch, clock)  # drain, so the module's engine is clean for the next test
    # Parked after its prefill, it waits for most of the stream: the search and the refills
    # always find something closer (it got in only once the pool ran low).
    assert longest_gap(outlier) > 6 * MAX_WAIT
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used(HOST) == 0


def test_starvation_guard_bounds_every_wait(engine, copies_in_step):
    outlier, reqs, orch, clock = starvation_run(engine, max_wait=MAX_WAIT)
    run(orch, clock)
    assert outlier.finish_reason is FinishReason.LENGTH and len(outlier.output_ids) == 12
    # The time between a request's consecutive tokens (in iterations) covers every stay in the
    # host pool: none exceeds max_wait, the outlier's included.
    worst = max(longest_gap(r) for r in reqs)
    assert worst <= MAX_WAIT, f"a request waited {worst} iterations between tokens"
    assert orch.loop.metrics.switches > 0
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used(HOST) == 0



@pytest.mark.parametrize("fault", ["copy", "move"])
def test_a_failed_move_ends_only_its_requests_and_frees_everything(engine, fault_switch, fault):
    faulty = fault_switch(engine)
    orch = Orchestrator(faulty, ServeConfig(policy="aligned", max_batch_size=3, kmin=2))
    reqs = [orch.submit(p, max_tokens=14, end_id=0) for p in PROMPTS]
    orch.loop.step()  # prefills the first request, which joins the running batch
    faulty.armed = fault  # the next move (parking the next prefills) fails
    run(orch)
    failed = [r for r in reqs if r.finish_reason is FinishReason.ERROR]
    assert failed and len(failed) < len(reqs)
    want = "injected copy failure" if fault == "copy" else "could not move its KV"
    assert all(want in r.error for r in failed)
    assert all(len(r.output_ids) == 14 for r in reqs if r not in failed)
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used(HOST) == 0
    assert orch.ledger.holders == 0

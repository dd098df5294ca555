"""The run loop: one thread that asks the policy for a plan and has the engine carry it out.

    step():  take the inbox  ->  policy.schedule(draft) -> plan  ->  apply the plan to the pool
             and the ledger  ->  executor.run(plan) -> outcomes  ->  lifecycle.apply(outcome)

Other threads talk to it only through `submit`, `cancel`, `drain`/`resume` and `switch_policy`,
which queue work (or flip a flag) and wake it. The pool and the ledger change only on this
thread: by the plan (`apply_plan`) and by the outcomes (`Lifecycle`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from engines.base import HOST, Engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, PolicySwitchRefused, Request, RequestRejected, StepPlan
from orchestrator.draft import Draft
from orchestrator.executor import PlanExecutor, StepReport
from orchestrator.kv_ledger import KVLedger
from orchestrator.lifecycle import Lifecycle
from orchestrator.metrics import IterationRecord, Metrics
from orchestrator.policies import Policy
from orchestrator.policy_switch import occupied_parts, refusal
from orchestrator.pool import RequestPool

log = logging.getLogger("alignedserve.run_loop")


class RunLoop:
    """Owns the pool, the ledger and the engine's thread of control."""

    def __init__(self, engine: Engine, policy: Policy, ledger: KVLedger, config: ServeConfig,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.policy = policy
        self.ledger = ledger
        self.config = config
        self.clock = clock
        """Time of arrivals, tokens, parking (the starvation guard reads it) and waits on
        transfers: time.monotonic, or a virtual-time engine's clock."""
        info = engine.describe()
        self.pool = RequestPool(info.model.max_seq_len, info.block_size, clock)
        self.metrics = Metrics()
        self.executor = PlanExecutor(engine, info, ledger, config, self.metrics.record_transfer, clock)
        self.lifecycle = Lifecycle(engine, self.pool, ledger, self.metrics, clock, on_broken_stream=self.cancel)
        self._device = info.decode_device
        self._has_host = info.capabilities.can_offload
        self.max_queue_tokens = config.max_queue_tokens or 4 * info.tier_blocks(info.decode_device) * info.block_size
        self._lock = threading.Lock()
        self._inbox: deque[Request] = deque()
        self._cancels: deque[tuple[str, FinishReason]] = deque()
        self._switches: deque[tuple[Policy, Future]] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._draining = False  # guarded by _lock
        self._crashed = ""  # why the loop died, if it did; guarded by _lock
        self._schedule_seconds = 0.0  # wall time of the latest plan

    # ---- called from any thread -------------------------------------------------------------

    def check_admission(self) -> None:
        """RequestRejected if a request sent now would be refused whatever its prompt: the server
        stopping or draining, or max_queue requests waiting. The front ends ask before they
        tokenize, so a refusal under overload costs no tokenizer time."""
        with self._lock:
            self._refuse(tuple(self._inbox) + tuple(self.pool.waiting))

    def _refuse(self, waiting: tuple[Request, ...]) -> None:
        if self._stopping.is_set():
            raise RequestRejected("server", self._crashed or "the server is shutting down")
        if self._draining:
            raise RequestRejected("server", "draining: an operator stopped admitting new requests (in-flight "
                                  "requests finish); retry later or on another replica")
        if len(waiting) >= self.config.max_queue:
            raise RequestRejected(
                "queue", f"{len(waiting)} requests are waiting, the limit is max_queue={self.config.max_queue}; "
                "retry later")

    def submit(self, request: Request) -> None:
        with self._lock:
            waiting = tuple(self._inbox) + tuple(self.pool.waiting)  # a copy: the loop thread changes the pool
            self._refuse(waiting)
            tokens = sum(r.prompt_len for r in waiting) + request.prompt_len
            if tokens > self.max_queue_tokens:
                raise RequestRejected(
                    "queue", f"{tokens} prompt tokens would be waiting, the limit is max_queue_tokens="
                    f"{self.max_queue_tokens}; retry later")
            request.arrival_time = self.clock()
            request.note(request.arrival_time, "submitted",
                         f"prompt {request.prompt_len} tokens, max_tokens {request.max_tokens}")
            self._inbox.append(request)
            self.metrics.submitted += 1
        self._wake.set()

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        self._cancels.append((request_id, reason))
        self._wake.set()

    def drain(self) -> None:
        """Stop admitting: `submit` refuses new requests; those already accepted run to the end."""
        with self._lock:
            self._draining = True

    def resume(self) -> None:
        """Admit new requests again after `drain`."""
        with self._lock:
            self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    def switch_policy(self, policy: Policy, timeout: float = 30.0) -> None:
        """Schedule with `policy` from the next iteration on. The loop thread swaps it in between
        two iterations; this waits for that and raises PolicySwitchRefused when requests would
        be stranded (`policy_switch`). Without a loop thread (tests that step the loop), the
        swap happens here, on the caller's thread, which is then the one stepping it; so it does
        when called from the loop thread itself (an event callback)."""
        if self._stopping.is_set():
            raise PolicySwitchRefused("the server is shutting down; the policy was not switched")
        if not self.alive or threading.current_thread() is self._thread:
            self._apply_switch(policy)
            return
        done: Future = Future()
        self._switches.append((policy, done))
        self._wake.set()
        try:
            done.result(timeout)
        except FutureTimeout:
            if done.cancel():  # not picked up yet: it will never apply
                raise TimeoutError(f"the run loop did not reach the end of an iteration within {timeout}s; "
                                   "the policy was not switched") from None
            done.result()  # picked up just now: its outcome is a moment away

    def incoming(self) -> list[Request]:
        """Submitted requests not yet taken into the pool (a copy)."""
        return list(self._inbox)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alignedserve-run-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; every request still in flight ends as cancelled and frees its KV."""
        with self._lock:
            self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"run loop did not stop within {timeout}s")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the loop thread --------------------------------------------------------------------

    def step(self) -> bool:
        """One iteration: take in new requests, cancels and policy switches, settle what
        finished, plan, execute. False if there was nothing to do. The thread calls this in a
        loop; tests and benchmarks may call it directly instead of `start()`."""
        self._take_inbox()
        for outcome in self.executor.collect():
            self.lifecycle.apply(outcome)
        plan = self._plan()
        report = StepReport()
        if not plan.empty:
            outcomes = self.executor.run(plan, report)
        elif self.executor.busy:  # nothing runnable until a move lands or a prefill ends
            outcomes = self.executor.wait_for_anything(report)
        else:
            return False
        for outcome in outcomes:
            self.lifecycle.apply(outcome)
        if not plan.empty or report.bubble:
            self._record_iteration(report, plan.switch)
        return True

    def _plan(self) -> StepPlan:
        """The policy's plan for this iteration, applied to the pool and the ledger."""
        t0 = time.perf_counter()
        now = self.clock()
        plan = self.policy.schedule(Draft(self.pool, self.ledger, now))
        apply_plan(plan, self.pool, self.ledger, now, self._device)
        self._schedule_seconds = time.perf_counter() - t0
        return plan

    def _take_inbox(self) -> None:
        while self._inbox:
            self.pool.add(self._inbox[0])
            self._inbox.popleft()  # after the add: the queue limit counts it in one place or the other
        while self._cancels:
            request_id, reason = self._cancels.popleft()
            request = self.pool.get(request_id)
            if request is not None and not request.finished:
                self.lifecycle.finish(request, reason)
        while self._switches:
            policy, done = self._switches.popleft()
            if not done.set_running_or_notify_cancel():
                continue  # the caller gave up waiting
            try:
                self._apply_switch(policy)
            except PolicySwitchRefused as e:
                done.set_exception(e)
            else:
                done.set_result(None)

    def _apply_switch(self, policy: Policy) -> None:
        """Swap the policy in, or raise PolicySwitchRefused naming the requests it would strand."""
        old = self.policy.name
        if policy.name != old:
            remote, park_after = self.executor.prefilling_elsewhere()
            reason = refusal(old, type(policy), occupied_parts(self.pool, len(self._inbox), remote, park_after))
            if reason:
                raise PolicySwitchRefused(reason)
            log.info("policy switched from %s to %s", old, policy.name)
        self.policy = policy

    def _record_iteration(self, report: StepReport, switch: bool) -> None:
        prefill, decode = report.prefill, report.decode
        calls = [t for t in (prefill, decode) if t is not None]
        b = decode.num_seqs if decode else 0
        decision = self.policy.decision
        self.metrics.record_iteration(IterationRecord(
            end=self.clock(),
            seconds=sum(t.seconds for t in calls) + report.bubble,
            batch_size=b,
            kv_max=decode.max_kv if decode else 0,
            kv_mean=decode.kv_tokens / b if b else 0.0,
            alignment=decode.kv_tokens / (b * decode.max_kv) if b else 0.0,
            prefill_tokens=prefill.num_tokens if prefill else 0,
            bubble_seconds=report.bubble,
            switch=switch,
            device_blocks_used=self.engine.kv_blocks_used(self._device),
            host_blocks_used=self.engine.kv_blocks_used(HOST) if self._has_host else 0,
            transfer_bytes=report.transfer_bytes,
            schedule_seconds=self._schedule_seconds,
            decode_seconds=decode.seconds if decode else 0.0,
            predicted_seconds=decision.predicted_s if decision and decode else None,
            decision=decision,
        ))

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.step():
                    self._wake.wait(self.config.idle_wait_s)
                    self._wake.clear()
        except BaseException:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("run loop crashed")
            with self._lock:  # and refuse whoever comes next: nobody would run their request
                self._crashed = "internal error in the scheduler; see the server log"
                self._stopping.set()
            self.metrics.failed["scheduler"] += sum(not r.finished for r in self.pool) + len(self._inbox)
            self._shutdown(FinishReason.ERROR, self._crashed)
            raise
        self._shutdown(FinishReason.CANCELLED, "the server is shutting down")

    def _shutdown(self, reason: FinishReason, message: str) -> None:
        while self._switches:  # nobody will run an iteration again
            _, done = self._switches.popleft()
            if done.set_running_or_notify_cancel():
                done.set_exception(PolicySwitchRefused("the server is shutting down; the policy was not switched"))
        while self._inbox:
            self.pool.add(self._inbox.popleft())
        for r in list(self.pool):
            if not r.finished:
                self.lifecycle.finish(r, reason, message)


def apply_plan(plan: StepPlan, pool: RequestPool, ledger: KVLedger, now: float, decode_device: str) -> None:
    """Carry a plan's decisions into the pool and the ledger: its grants, its admissions (a
    prompt prefilled in chunks or on another device starts prefilling), its offloads, its
    promotions and its loads."""
    for grant in plan.grants:
        ledger.reserve(grant.request.id, grant.tier, grant.blocks)
    if plan.admit:
        pool.take_waiting(list(plan.admit))
        elsewhere = plan.prefill if plan.prefill_on not in (None, decode_device) else ()
        for r in [*elsewhere, *(r for r, start, _ in plan.chunks if start == 0)]:
            pool.begin_prefill(r)
    for r in plan.offload:
        pool.to_host(r, now)
    for r in plan.promote:
        pool.promote(r)
    if plan.load:
        staged = set(plan.stage)  # Request compares by identity (eq=False)
        for r in plan.load:
            pool.to_device(r, as_candidate=r not in staged)

"""The run loop: one thread that asks the policy for a plan and has the engine carry it out.

Other threads talk to it only through `submit`, `cancel`, `drain`/`resume` and `switch_policy`,
which queue work (or flip a flag) and wake it. Every exit of a request (finish, cancel, engine
error, shutdown) goes through `_finish`, which frees the request's KV in the engine and the
ledger exactly once and sends its final event.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from engines.base import HOST, CallTiming, Engine, EngineError, PrefillChunk, PrefillHandle, PrefillRequest
from orchestrator.config import ServeConfig
from orchestrator.core import (FinishReason, PolicySwitchRefused, Request, RequestRejected, RequestState,
                               TokenEvent)
from orchestrator.kv_ledger import KVLedger
from orchestrator.policies import Policy
from orchestrator.pool import RequestPool
from orchestrator.metrics import IterationRecord, Metrics
from orchestrator.transfer_planner import Link, TransferPlanner
from orchestrator.transfers import TransferTracker

log = logging.getLogger("alignedserve.run_loop")

RECENT_FINISHED = 1000
"""Finished requests kept for the admin API (`RunLoop.recent_finished`)."""

# The parts of the pool each policy schedules from. A runtime switch is refused while requests sit
# in a part the new policy never looks at: they would wait there forever. "remote" is a prompt
# prefilling on another device (its KV then becomes a candidate, or parked), "chunks" a prompt
# prefilled in chunks inside the decode steps.
_HOST_POOL = frozenset({"waiting", "running", "remote", "candidates", "staged", "parked"})
POLICY_PARTS = {
    "fcfs": frozenset({"waiting", "running"}),
    "chunked-prefill": frozenset({"waiting", "running", "chunks"}),
    "disagg-fcfs": frozenset({"waiting", "running", "remote", "candidates"}),
    "aligned": _HOST_POOL,
    "fcfs-offload": _HOST_POOL,
}


_PART_WORDS = {  # (one, several)
    "waiting": ("waiting request", "waiting requests"), "running": ("running request", "running requests"),
    "remote": ("request prefilling on another device", "requests prefilling on another device"),
    "chunks": ("request prefilling in chunks", "requests prefilling in chunks"),
    "candidates": ("refill candidate", "refill candidates"), "staged": ("staged request", "staged requests"),
    "parked": ("request in the host pool", "requests in the host pool"),
}


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
        info = self._info = engine.describe()
        self.pool = RequestPool(info.model.max_seq_len, info.block_size, clock)
        self.metrics = Metrics()
        self.transfers = TransferTracker(engine, info, ledger, self.pool, self.metrics.record_transfer, clock)
        self.planner = TransferPlanner(
            info, host_link=Link(config.pcie_gb_s * 1e9, 10e-6), peer_link=Link(config.peer_gb_s * 1e9, 5e-6),
            mode=config.prefetch_route)
        self._device = info.decode_device
        self._has_host = info.capabilities.can_offload
        self._lock = threading.Lock()
        self._inbox: deque[Request] = deque()
        self._cancels: deque[str] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiting_count = 0  # inbox + waiting, for the queue limit; guarded by _lock
        self._schedule_seconds = 0.0  # wall time of the latest policy.schedule()
        self._prefills: dict[int, tuple[PrefillHandle, list[Request], set[str]]] = {}
        """Prefills running on another device: handle id -> (handle, requests, ids to park)."""
        self._draining = False  # guarded by _lock
        self._switches: deque[tuple[Policy, Future]] = deque()
        self.recent_finished: deque[Request] = deque(maxlen=RECENT_FINISHED)
        """The latest finished requests, oldest first (the admin API lists and looks them up)."""
        self._finish_listeners: list[Callable[[Request], None]] = []

    # ---- called from any thread -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise RequestRejected("server", "the server is shutting down")
            if self._draining:
                raise RequestRejected("server", "draining: an operator stopped admitting new requests (in-flight "
                                      "requests finish); retry later or on another replica")
            if self._waiting_count >= self.config.max_queue:
                raise RequestRejected(
                    "queue", f"{self._waiting_count} requests are waiting, the limit is max_queue="
                    f"{self.config.max_queue}; retry later")
            self._waiting_count += 1
            request.arrival_time = self.clock()
            request.note(request.arrival_time, "submitted",
                         f"prompt {request.prompt_len} tokens, max_tokens {request.max_tokens}")
            self._inbox.append(request)
            self.metrics.submitted += 1
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        self._cancels.append(request_id)
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
        be stranded (see POLICY_PARTS). Without a loop thread (tests that step the loop), the
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

    def add_finish_listener(self, listener: Callable[[Request], None]) -> None:
        """Call `listener(request)` on the loop thread whenever a request finishes; it must be
        quick and must not block (append to a deque and return)."""
        self._finish_listeners.append(listener)

    def remove_finish_listener(self, listener: Callable[[Request], None]) -> None:
        try:
            self._finish_listeners.remove(listener)
        except ValueError:
            pass

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
        """One iteration: take in new requests and cancels, settle finished moves, plan,
        execute. False if there was nothing to do. The thread calls this in a loop; tests may
        call it directly instead of `start()`."""
        self._drain_inbox()
        self._apply_cancels()
        self._apply_switches()
        self._settle(self.transfers.poll())
        self._collect_prefills()
        t0 = time.perf_counter()
        plan = self.policy.schedule(self.pool)
        self._schedule_seconds = time.perf_counter() - t0
        if plan.empty:
            if not (len(self.transfers) or self._prefills):
                return False
            # Nothing runnable until a move lands or a prefill ends: wait for it rather than
            # sleep. Waiting on a move counts as bubble (the device idles for its KV).
            seconds, failed = self._wait_for_anything()
            self._settle(failed)
            if seconds:
                self._record_iteration(None, None, seconds, False, 0)
            return True
        bytes_before = self.transfers.bytes_started
        self._start_moves(plan.offload, self._device, HOST)
        self._start_loads(plan.load)
        prefill_timing = None
        if plan.prefill:
            park = {r.id for r in plan.park}
            if plan.prefill_on not in (None, self._device):
                self._start_prefill(list(plan.prefill), plan.prefill_on, park)
            else:
                prefill_timing = self._prefill(list(plan.prefill), park)
        bubble = 0.0
        if plan.wait:
            bubble, failed = self.transfers.wait(list(plan.wait))
            self._settle(failed)
        decode = [r for r in plan.decode if r.state is RequestState.RUNNING and not r.moving]
        chunks = [(r, a, b) for r, a, b in plan.chunks if not r.finished]
        if chunks:
            decode_timing, chunk_timing = self._mixed(decode, chunks)
            prefill_timing = prefill_timing or chunk_timing
        else:
            decode_timing = self._decode(decode) if decode else None
        self._settle(self.transfers.poll())
        self._collect_prefills()
        self._record_iteration(prefill_timing, decode_timing, bubble, plan.switch,
                               self.transfers.bytes_started - bytes_before)
        return True

    def _wait_for_anything(self) -> tuple[float, list]:
        """Block until a move lands or a prefill on another device ends; (seconds waited on
        moves, failed moves). Without prefills under way: until every move lands."""
        if not self._prefills:
            return self.transfers.wait_all()
        start = self.clock()
        self.engine.wait_any([h for h, _, _ in self._prefills.values()] + self.transfers.handles())
        moving = len(self.transfers)
        failed = self.transfers.poll()
        self._collect_prefills()
        return (self.clock() - start if moving else 0.0), failed

    def _start_moves(self, requests, src: str, dst: str, via: str | None = None) -> None:
        """Start one move of these requests' KV; a request whose move cannot start ends with
        an error (its grants were booked for a move that will not happen)."""
        for r in self.transfers.start(requests, src, dst, via):
            self._finish(r, FinishReason.ERROR, f"could not move its KV from {src} to {dst}")

    def _start_loads(self, requests) -> None:
        """Host -> decode device, directly or through a helper device, as the planner routes it."""
        live = [r for r in requests if not r.finished]
        if not live:
            return
        nbytes = sum(self._info.blocks_for(r.kv_len) for r in live) * self._info.bytes_per_block
        route = self.planner.route(nbytes, self.transfers.queued())
        self._start_moves(live, HOST, self._device, via=route.via)

    def _settle(self, failed) -> None:
        for r, error in failed:
            if not r.finished:
                self._finish(r, FinishReason.ERROR, f"moving its KV failed: {error}")

    def _record_iteration(self, prefill: CallTiming | None, decode: CallTiming | None,
                          bubble: float, switch: bool, transfer_bytes: int) -> None:
        calls = [t for t in (prefill, decode) if t is not None]
        b = decode.num_seqs if decode else 0
        self.metrics.record_iteration(IterationRecord(
            end=self.clock(),
            seconds=sum(t.seconds for t in calls) + bubble,
            batch_size=b,
            kv_max=decode.max_kv if decode else 0,
            kv_mean=decode.kv_tokens / b if b else 0.0,
            alignment=decode.kv_tokens / (b * decode.max_kv) if b else 0.0,
            prefill_tokens=prefill.num_tokens if prefill else 0,
            bubble_seconds=bubble,
            switch=switch,
            device_blocks_used=self.engine.kv_blocks_used(self._device),
            host_blocks_used=self.engine.kv_blocks_used(HOST) if self._has_host else 0,
            transfer_bytes=transfer_bytes,
            schedule_seconds=self._schedule_seconds,
        ))

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.step():
                    self._wake.wait(self.config.idle_wait_s)
                    self._wake.clear()
        except BaseException:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("run loop crashed")
            self._shutdown(FinishReason.ERROR, "internal error in the scheduler; see the server log")
            raise
        self._shutdown(FinishReason.CANCELLED, "the server is shutting down")

    def _drain_inbox(self) -> None:
        while self._inbox:
            self.pool.add(self._inbox.popleft())

    def _apply_cancels(self) -> None:
        while self._cancels:
            request = self.pool.get(self._cancels.popleft())
            if request is not None and not request.finished:
                self._finish(request, FinishReason.CANCELLED)

    def _apply_switches(self) -> None:
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
        if policy.name == old:
            self.policy = policy
            return
        parts = self._occupied_parts()
        stranded = {part: n for part, n in parts.items() if n and part not in POLICY_PARTS.get(policy.name, ())}
        if stranded:
            where = ", ".join(f"{n} {_PART_WORDS[part][n > 1]}" for part, n in stranded.items())
            raise PolicySwitchRefused(
                f"switching from {old} to {policy.name} would strand {where}: {policy.name} never schedules "
                f"them; drain and let them finish first, or switch to aligned or fcfs-offload")
        log.info("policy switched from %s to %s", old, policy.name)
        self.policy = policy

    def _occupied_parts(self) -> dict[str, int]:
        """How many requests sit in each part of the pool a policy must schedule from."""
        pool = self.pool
        remote = {r.id for _, requests, _ in self._prefills.values() for r in requests}
        park_after = sum(len(park) for _, _, park in self._prefills.values())
        parked = sum(1 for r in pool if r.state is RequestState.PARKED)  # also those moving there
        return {
            "waiting": len(pool.waiting) + len(self._inbox),
            "running": len(pool.running),
            "remote": len(remote),
            "chunks": sum(1 for r in pool.prefilling if r.id not in remote),
            "candidates": len(pool.candidates),
            "staged": len(pool.staged),
            "parked": parked + park_after,
        }

    def _prefill(self, requests: list[Request], park: set[str]) -> CallTiming | None:
        """Prefill; the requests whose ids are in `park` then move to the host pool, the others
        join the running batch."""
        with self._lock:
            self._waiting_count -= len(requests)
        try:
            result = self.engine.prefill(
                [PrefillRequest(r.id, r.prompt_ids, r.sampling) for r in requests])
        except Exception as e:  # the engine failed this call: these requests end, others go on
            log.exception("prefill failed")
            for r in requests:
                self._finish(r, FinishReason.ERROR, f"prefill failed: {e}")
            return None
        self.metrics.record_call(result.timing)
        parked = []
        for r in requests:
            self.pool.start(r)
            self._accept_token(r, result.tokens[r.id])
            if r.id in park and not r.finished:
                self.pool.to_host(r, self.clock())
                parked.append(r)
        if parked:
            self._start_moves(parked, self._device, HOST)
        return result.timing

    def _decode(self, requests: list[Request]) -> CallTiming | None:
        try:
            result = self.engine.decode([r.id for r in requests])
        except Exception as e:
            log.exception("decode failed")
            for r in requests:
                self._finish(r, FinishReason.ERROR, f"decode failed: {e}")
            return None
        self.metrics.record_call(result.timing)
        for r in requests:
            self._accept_token(r, result.tokens[r.id])
        return result.timing

    def _mixed(self, decode: list[Request], chunks: list[tuple[Request, int, int]]
               ) -> tuple[CallTiming | None, CallTiming | None]:
        """One decode step that also prefills prompt chunks. Returns timings for the iteration
        record: the decode part (the whole step's seconds, the decode members' KV) and the
        prefill part (its prompt tokens; the step's seconds only when nothing decoded)."""
        new = sum(1 for _, a, _ in chunks if a == 0)
        with self._lock:
            self._waiting_count -= new
        kv = [r.kv_len + 1 for r in decode]
        try:
            result = self.engine.mixed_step(
                [r.id for r in decode],
                [PrefillChunk(PrefillRequest(r.id, r.prompt_ids, r.sampling), a, b) for r, a, b in chunks])
        except Exception as e:
            log.exception("mixed decode + prefill step failed")
            for r in decode + [c[0] for c in chunks]:
                self._finish(r, FinishReason.ERROR, f"decode with prefill chunks failed: {e}")
            return None, None
        self.metrics.record_call(result.timing)
        for r in decode:
            self._accept_token(r, result.tokens[r.id])
        for r, _, end in chunks:
            r.prefilled = end
            if end == r.prompt_len:
                self.pool.promote(r)
                self._accept_token(r, result.tokens[r.id])
        seconds = result.timing.seconds
        tokens = sum(b - a for _, a, b in chunks)
        prefill = CallTiming("prefill", 0.0 if decode else seconds, len(chunks), tokens, 0, 0)
        if not decode:
            return None, prefill
        return CallTiming("decode", seconds, len(decode), len(decode), sum(kv), max(kv)), prefill

    def _start_prefill(self, requests: list[Request], device: str, park: set[str]) -> None:
        """Prefill on another device; `_collect_prefills` takes the tokens when it is done."""
        with self._lock:
            self._waiting_count -= len(requests)
        for r in requests:
            self.pool.begin_prefill(r)
        try:
            handle = self.engine.start_prefill(
                [PrefillRequest(r.id, r.prompt_ids, r.sampling) for r in requests], device)
        except Exception as e:
            log.exception("prefill on %s failed to start", device)
            for r in requests:
                self._finish(r, FinishReason.ERROR, f"prefill failed: {e}")
            return
        self._prefills[handle.id] = (handle, requests, park)
        self._collect_prefills()

    def _collect_prefills(self) -> None:
        """Take the tokens of finished prefills on other devices and start moving their KV: to
        the host for the requests to park, to the decode device for the others."""
        for hid, (handle, requests, park) in list(self._prefills.items()):
            try:
                result = self.engine.prefill_result(handle)
            except EngineError as e:
                del self._prefills[hid]
                for r in requests:
                    if not r.finished:
                        self._finish(r, FinishReason.ERROR, f"prefill failed: {e}")
                continue
            if result is None:
                continue
            del self._prefills[hid]
            self.metrics.record_call(result.timing)
            to_host, to_decode = [], []
            for r in requests:
                if r.finished:
                    continue
                self._accept_token(r, result.tokens[r.id])
                if r.finished:
                    continue
                if r.id in park:
                    self.pool.to_host(r, self.clock())
                    to_host.append(r)
                else:
                    self.pool.to_candidate(r)
                    to_decode.append(r)
            self._start_moves(to_host, handle.device, HOST)
            self._start_moves(to_decode, handle.device, self._device)

    def _accept_token(self, r: Request, token: int) -> None:
        now = self.clock()
        if token in r.stop_token_ids:
            self._finish(r, FinishReason.STOP)
            return
        r.output_ids.append(token)
        r.token_times.append(now)
        if r.first_token_time is None:
            r.first_token_time = now
        self.metrics.tokens += 1
        reason = None
        if any(len(s) <= len(r.output_ids) and tuple(r.output_ids[-len(s):]) == s for s in r.stop_sequences):
            reason = FinishReason.STOP
        elif len(r.output_ids) >= r.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None:
            self._emit(r, TokenEvent(r.id, (token,)))
        else:
            self._finish(r, reason, tokens=(token,))

    def _finish(self, r: Request, reason: FinishReason, error: str | None = None,
                tokens: tuple[int, ...] = ()) -> None:
        if r.state is RequestState.WAITING and r in self.pool.waiting:
            with self._lock:
                self._waiting_count -= 1
        r.state = RequestState.FINISHED
        r.finish_reason = reason
        r.error = error
        r.finish_time = self.clock()
        self.pool.remove(r)
        try:
            self.engine.free([r.id])
        except Exception:  # freeing must never stop the loop; the leak shows in kv_blocks_used
            log.exception("engine.free failed for %s", r.id)
        self.ledger.release(r.id)
        self.metrics.finished[reason.value] += 1
        self.recent_finished.append(r)
        self._emit(r, TokenEvent(r.id, tokens, reason, error))
        for listener in list(self._finish_listeners):
            try:
                listener(r)
            except Exception:  # an observer must never stop the loop
                log.exception("finish listener failed for %s", r.id)

    def _emit(self, r: Request, event: TokenEvent) -> None:
        if r.on_event is None:
            return
        try:
            r.on_event(event)
        except Exception:  # a broken stream must not take the loop down; drop the request
            log.exception("event callback failed for %s; cancelling it", r.id)
            if not event.final:
                self.cancel(r.id)

    def _shutdown(self, reason: FinishReason, message: str) -> None:
        while self._switches:  # nobody will run an iteration again
            _, done = self._switches.popleft()
            if done.set_running_or_notify_cancel():
                done.set_exception(PolicySwitchRefused("the server is shutting down; the policy was not switched"))
        self._drain_inbox()
        for r in list(self.pool):
            if not r.finished:
                self._finish(r, reason, message)

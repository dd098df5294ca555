"""What happens to an accepted request from its first token to its end.

`Lifecycle.apply(outcome)` takes in what the engine did (`orchestrator.executor.Outcome`): KV
that reached the host pool joins the parked requests, prompt chunks advance, each token is
accepted (which may end the request) and moves the request in the pool as its step says, failed
requests end with an error. Every end of a request (stop, length, cancel, error, shutdown) goes
through `finish`, which frees the request's KV in the engine and the ledger exactly once, sends
its final event, tells the finish listeners and keeps it among the recently finished.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable

from engines.base import Engine
from orchestrator.core import FinishReason, Request, RequestState, TokenEvent
from orchestrator.executor import Outcome
from orchestrator.kv_ledger import KVLedger
from orchestrator.metrics import Metrics
from orchestrator.pool import RequestPool

log = logging.getLogger("alignedserve.lifecycle")

RECENT_FINISHED = 1000
"""Finished requests kept for the admin API (`Lifecycle.recent_finished`)."""


class Lifecycle:
    """Accepts tokens, ends requests, and tells whoever listens; run-loop thread only."""

    def __init__(self, engine: Engine, pool: RequestPool, ledger: KVLedger, metrics: Metrics,
                 clock: Callable[[], float], on_broken_stream: Callable[[str], None]):
        """on_broken_stream(request_id): called when a request's event callback raises; it
        should cancel the request (the run loop queues a cancel)."""
        self.engine = engine
        self.pool = pool
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self.on_broken_stream = on_broken_stream
        self.recent_finished: deque[Request] = deque(maxlen=RECENT_FINISHED)
        """The latest finished requests, oldest first (the admin API lists and looks them up)."""
        self._listeners: list[Callable[[Request], None]] = []

    def add_listener(self, listener: Callable[[Request], None]) -> None:
        """Call `listener(request)` whenever a request finishes; it must be quick and must not
        block (append to a deque and return)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Request], None]) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    # ---- outcomes ----------------------------------------------------------------------------

    def apply(self, outcome: Outcome) -> None:
        """Take in what one engine call did (see `Outcome`)."""
        if outcome.timing is not None:
            self.metrics.record_call(outcome.timing)
        for r, at in outcome.on_host:
            if not r.finished:
                self.pool.on_host(r, at)
        for r, end in outcome.progress:
            r.prefilled = end
        for r, token in outcome.tokens:
            self.accept(r, token, outcome.logprobs.get(r.id))
        for t in outcome.first_tokens:
            r = t.request
            if r.finished:  # cancelled while its prompt was prefilled elsewhere
                continue
            if t.step == "prefill":
                self.pool.start(r)
            elif t.step == "chunk":
                self.pool.promote(r)
            self.accept(r, t.token, outcome.logprobs.get(r.id))
            if r.finished:
                continue
            if t.park:
                self.pool.to_host(r, self.clock())
            elif t.step == "remote prefill":
                self.pool.to_candidate(r)
        for r, message in outcome.failed:
            if not r.finished:
                self.metrics.failed[outcome.failure] += 1
                self.finish(r, FinishReason.ERROR, message)

    def accept(self, r: Request, token: int, logprob: float | None = None) -> None:
        """A generated token (and its log probability, if the request asked): streamed, or the end
        of the request. An end id ends it (STOP, the token dropped); so does an output ending with
        a stop sequence (STOP, kept) or reaching max_tokens (LENGTH)."""
        if token in r.stop_token_ids:
            self.finish(r, FinishReason.STOP)
            return
        now = self.clock()
        r.output_ids.append(token)
        lps = () if logprob is None else (logprob,)
        r.output_logprobs.extend(lps)
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
            self._emit(r, TokenEvent(r.id, (token,), logprobs=lps))
        else:
            self.finish(r, reason, tokens=(token,), logprobs=lps)

    # ---- the end -----------------------------------------------------------------------------

    def finish(self, r: Request, reason: FinishReason, error: str | None = None,
               tokens: tuple[int, ...] = (), logprobs: tuple[float, ...] = ()) -> None:
        """End `r` wherever it is: free its KV everywhere, send the final event with `tokens`."""
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
        self._emit(r, TokenEvent(r.id, tokens, reason, error, logprobs))
        for listener in list(self._listeners):
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
                self.on_broken_stream(r.id)

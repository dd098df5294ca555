"""The orchestrator as the serving layer sees it: submit, cancel, start and stop, the operator's
levers (drain, resume, switch the policy at runtime), and what readers may look at (a snapshot,
a request's history, iteration records, finished requests).

It is handed a ready engine (the serving layer loads it with `engines.loader`), so nothing here
imports a concrete engine.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Callable, Iterable, Sequence

from engines.base import HOST, Engine, SamplingParams
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, PolicySwitchRefused, Request, RequestRejected, RequestState, TokenEvent
from orchestrator.kv_ledger import KVLedger
from orchestrator.metrics import IterationRecord
from orchestrator.policies import Policy, make_policy
from orchestrator.run_loop import RunLoop
from orchestrator.snapshot import RequestView, Snapshot, TierUsage, view


class Orchestrator:
    """Accepts requests, validates them against the engine's limits, and runs them."""

    def __init__(self, engine: Engine, config: ServeConfig, clock: Callable[[], float] = time.monotonic):
        """clock: the time arrivals, tokens and the starvation guard are measured in."""
        self.engine = engine
        self.clock = clock
        self.info = engine.describe()
        self.config = config.with_manifest(self.info.model.max_seq_len)
        capacity = {d.name: d.kv_blocks for d in self.info.devices}
        capacity[HOST] = self.info.host_blocks
        self.ledger = KVLedger(capacity)
        policy = make_policy(self.config.policy, self.info, self.config)
        self.loop = RunLoop(engine, policy, self.ledger, self.config, clock)
        self._ids = itertools.count(1)
        self._switching = threading.Lock()  # one switch at a time: config and policy stay in step
        self._refusals = threading.Lock()
        self._finished_views: dict[str, RequestView] = {}

    @property
    def policy(self) -> Policy:
        """The policy scheduling now (it may be switched at runtime)."""
        return self.loop.policy

    def start(self) -> "Orchestrator":
        self.loop.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.loop.stop(timeout)

    def __enter__(self) -> "Orchestrator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int | None = None,
        sampling: SamplingParams | None = None,
        end_id: int | None = None,
        stop_sequences: Iterable[Sequence[int]] = (),
        on_event: Callable[[TokenEvent], None] | None = None,
        *,
        ignore_eos: bool = False,
    ) -> Request:
        """Validate and queue a request; raises RequestRejected naming the field and the limit.

        end_id: token that ends generation; None uses the model's EOS tokens.
        stop_sequences: token sequences that end generation once generated (kept in the output).
        on_event: called from the run loop thread with each TokenEvent; must not block.
        ignore_eos: the model's EOS tokens do not end generation (they are generated as any
            token), so it runs to max_tokens: a benchmark's fixed output length. An end_id or a
            stop sequence still ends it.
        """
        try:
            request = self._build(prompt_ids, max_tokens, sampling, end_id, stop_sequences, on_event, ignore_eos)
            self.loop.submit(request)
        except RequestRejected as e:
            self.record_refusal(e.field)
            raise
        return request

    @property
    def faults(self):
        """The engine's fault injector (engines.faults.FaultInjector) when it was started with
        fault injection, else None."""
        return getattr(self.engine, "faults", None)

    def check_admission(self) -> None:
        """Raise (and count) the RequestRejected a request sent now would get whatever its prompt
        (stopping, draining, a full queue): for front ends, before they tokenize."""
        try:
            self.loop.check_admission()
        except RequestRejected as e:
            self.record_refusal(e.field)
            raise

    def record_refusal(self, reason: str) -> None:
        """Count a request refused before it was accepted (the front ends count their own checks
        here too); `Metrics.refused`, Prometheus `alignedserve_requests_refused_total`."""
        with self._refusals:
            self.loop.metrics.refused[reason] += 1

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """End a request wherever it is, with finish reason "cancelled"; or "stop" when the caller
        ends it on purpose because the output is complete (a stop string matched on the text)."""
        self.loop.cancel(request_id, reason)

    def drain(self) -> None:
        """Stop admitting: submit raises RequestRejected("server", "draining ...") until
        `resume`; requests already accepted run to the end."""
        self.loop.drain()

    def resume(self) -> None:
        """Admit new requests again after `drain`."""
        self.loop.resume()

    def wait_idle(self, timeout: float) -> int:
        """Wait up to `timeout` s until no request is in flight (after `drain`, none arrives);
        how many are still in flight then."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.snapshot()
            left = sum(len(x) for x in (s.waiting, s.prefilling, s.running, s.staged, s.candidates, s.parked))
            if left == 0 or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    @property
    def draining(self) -> bool:
        return self.loop.draining

    def switch_policy(self, name: str, timeout: float = 30.0) -> str:
        """Schedule with policy `name` from the next iteration on; returns the policy now in force
        ("aligned" on an engine without a host pool runs as "fcfs", as at startup).

        Raises ValueError for an unknown name, PolicySwitchRefused when this engine cannot run
        it or when requests sit where it never looks (e.g. fcfs while the host pool holds
        requests), TimeoutError when the run loop does not finish its iteration in `timeout` s.
        """
        with self._switching:
            config = self.config.replace(policy=name)
            try:
                policy = make_policy(name, self.info, config)
            except ValueError as e:
                raise PolicySwitchRefused(str(e)) from None
            self.loop.switch_policy(policy, timeout)
            self.config = config
            return policy.name

    def step(self) -> bool:
        """Run one iteration on the caller's thread instead of `start()`'s (benchmarks, tests);
        False when there was nothing to do."""
        return self.loop.step()

    # ---- reading (any thread) -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The pool, the KV tiers and the counters now, as one consistent copy (see
        `orchestrator.snapshot`); safe from any thread."""
        loop, pool = self.loop, self.loop.pool
        parts = {"waiting": loop.incoming() + list(pool.waiting), "prefilling": list(pool.prefilling),
                 "running": list(pool.running), "staged": list(pool.staged), "candidates": list(pool.candidates)}
        everyone = list(pool)
        listed = {r.id for part in parts.values() for r in part}
        # parked: in the host pool, or on its way there (not yet indexed)
        parts["parked"] = [r for r in everyone if r.state is RequestState.PARKED and r.id not in listed]
        device = self.info.decode_device
        prefill = self.config.prefill_device or device
        views = {part: tuple(view(r, device, prefill) for r in requests) for part, requests in parts.items()}
        # A finished request never changes again: its view is made once and kept while it is listed.
        known = self._finished_views
        finished = tuple(known.get(r.id) or view(r, device, prefill) for r in list(loop.lifecycle.recent_finished))
        self._finished_views = {v.id: v for v in finished}
        return Snapshot(
            time=self.clock(), policy=self.policy.name, draining=self.draining, **views, finished=finished,
            kv=self._tier_usage(), totals=self._totals(), max_seq_len=self.config.max_seq_len)

    def history(self, request_id: str) -> tuple[tuple[float, str, str], ...] | None:
        """(time, event, detail) of each transition of a live or recently finished request, the
        newest HISTORY_LIMIT; None if unknown."""
        r = self.loop.pool.get(request_id)
        if r is None:
            r = next((r for r in self.loop.incoming() + list(reversed(self.loop.lifecycle.recent_finished))
                      if r.id == request_id), None)
        return None if r is None else tuple(r.history)

    def iterations(self) -> list[IterationRecord]:
        """The latest iteration records, oldest first (a copy; the records never change)."""
        return list(self.loop.metrics.history)

    def recently_finished(self) -> list[Request]:
        """The latest finished requests, oldest first (finished requests never change)."""
        return list(self.loop.lifecycle.recent_finished)

    def add_finish_listener(self, listener: Callable[[Request], None]) -> None:
        """Call `listener(request)` on the run loop thread whenever a request finishes; it must
        be quick and must not block (append to a deque and return)."""
        self.loop.lifecycle.add_listener(listener)

    def remove_finish_listener(self, listener: Callable[[Request], None]) -> None:
        self.loop.lifecycle.remove_listener(listener)

    def _tier_usage(self) -> dict[str, TierUsage]:
        tiers = [d.name for d in self.info.devices] + ([HOST] if self.ledger.capacity(HOST) > 0 else [])
        usage = {}
        for tier in tiers:
            try:
                used = self.engine.kv_blocks_used(tier)
            except Exception:  # an engine without that pool; the ledger still says what is booked
                used = 0
            usage[tier] = TierUsage(int(used), self.ledger.used(tier), self.ledger.capacity(tier))
        return usage

    def _totals(self) -> dict:
        """Metrics.summary(), retried: it walks the metrics' deques, which the loop may append to
        mid-walk (a RuntimeError that a second try does not meet)."""
        for _ in range(5):
            try:
                return self.loop.metrics.summary()
            except RuntimeError:
                continue
        return self.loop.metrics.summary()

    def _shaping(self, sampling: SamplingParams, stop_ids: frozenset[int]) -> SamplingParams:
        """The penalties, min_tokens and bad words checked against the engine and the vocabulary;
        min_tokens holds back the request's stop tokens (its end_id or the model's EOS)."""
        vocab = self.info.model.vocab_size
        for word in sampling.bad_words:
            if max(word) >= vocab:
                raise RequestRejected("bad_words", f"token ids {word} fall outside the vocabulary [0, {vocab})")
        if sampling.min_tokens:
            sampling = dataclasses.replace(sampling, stop_ids=tuple(sorted(stop_ids)))
        if sampling.logprobs and not self.info.capabilities.can_return_logprobs:
            raise RequestRejected("logprobs", f"this engine ({self.info.backend}) does not return log probabilities; "
                                  "leave out return_log_probs / logprobs")
        if sampling.shapes_logits and not self.info.capabilities.can_shape_logits:
            name = next(n for n, neutral in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                                             ("frequency_penalty", 0.0), ("min_tokens", 0), ("bad_words", ()))
                        if getattr(sampling, n) != neutral)
            raise RequestRejected(name, f"this engine ({self.info.backend}) does not apply it yet; leave it out")
        return sampling

    def _build(self, prompt_ids, max_tokens, sampling, end_id, stop_sequences, on_event,
               ignore_eos: bool = False) -> Request:
        cfg, model = self.config, self.info.model
        prompt = tuple(int(t) for t in prompt_ids)
        if not prompt:
            raise RequestRejected("prompt", "the prompt is empty; send at least one token of text")
        bad = [t for t in prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise RequestRejected("prompt", f"token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})")
        if len(prompt) >= cfg.max_seq_len:
            raise RequestRejected(
                "prompt", f"{len(prompt)} tokens; the limit is {cfg.max_seq_len - 1} (max_seq_len "
                f"{cfg.max_seq_len} minus one generated token)")
        if max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, cfg.max_seq_len - len(prompt))
        if not 1 <= max_tokens <= cfg.max_tokens_limit:
            raise RequestRejected("max_tokens", f"{max_tokens} is outside [1, {cfg.max_tokens_limit}]")
        if len(prompt) + max_tokens - 1 > cfg.max_seq_len:
            raise RequestRejected(
                "max_tokens", f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds "
                f"max_seq_len ({cfg.max_seq_len}); ask for at most {cfg.max_seq_len - len(prompt) + 1}")
        blocks = self.info.blocks_for(len(prompt) + max_tokens - 1)
        capacity = self.ledger.capacity(self.info.decode_device)
        if blocks > capacity:
            raise RequestRejected(
                "max_tokens", f"prompt + max_tokens need {blocks} KV blocks but the device holds "
                f"{capacity}; lower max_tokens or build the engine with more KV memory")
        host = self.ledger.capacity(HOST)
        if type(self.policy).needs.host_pool and blocks > host:
            raise RequestRejected(
                "max_tokens", f"prompt + max_tokens need {blocks} KV blocks but the host pool holds "
                f"{host}; lower max_tokens or build the engine with more host KV memory")
        if not isinstance(ignore_eos, bool):
            raise RequestRejected("ignore_eos", f"expected True or False, got {ignore_eos!r}")
        if end_id is None:
            stop_ids = frozenset() if ignore_eos else frozenset(model.eos_token_ids)
        elif not 0 <= end_id < model.vocab_size:
            raise RequestRejected("end_id", f"{end_id} is outside the vocabulary [0, {model.vocab_size})")
        else:
            stop_ids = frozenset((end_id,))
        stops = tuple(tuple(int(t) for t in s) for s in stop_sequences if len(s))
        for s in stops:
            if any(not 0 <= t < model.vocab_size for t in s):
                raise RequestRejected("stop_words", f"token ids {s} fall outside the vocabulary")
        sampling = self._shaping(sampling or SamplingParams(), stop_ids)
        return Request(
            id=f"req-{next(self._ids)}",
            prompt_ids=prompt,
            max_tokens=max_tokens,
            sampling=sampling,
            stop_token_ids=stop_ids,
            stop_sequences=stops,
            on_event=on_event,
        )

"""Carrying out a step plan on the engine, and saying what happened.

`PlanExecutor.run(plan)` does the engine's part of an iteration in order: start the offloads and
the loads (directly or through a helper device, as the transfer planner routes them), prefill
(on the decode device, or started on another device), park the prefilled requests bound for the
host pool, wait for the loads the decode needs (the bubble), decode (with prompt chunks under
chunked prefill), then collect what finished meanwhile.

It never changes a request's place in the pool and never ends a request. It yields an `Outcome`
after each engine call (tokens, failures, KV that reached the host, the call's timing), and the
run loop applies each one (`orchestrator.lifecycle`) before the executor goes on: so a request
that ended on its first token is not parked, and one whose load failed is not decoded.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from engines.base import (HOST, CallTiming, Engine, EngineError, EngineInfo, PrefillChunk, PrefillHandle,
                          PrefillRequest)
from orchestrator.config import ServeConfig
from orchestrator.core import Request, RequestState, StepPlan
from orchestrator.kv_ledger import KVLedger
from orchestrator.transfer_planner import Link, TransferPlanner
from orchestrator.transfers import Settled, TransferRecord, TransferTracker

log = logging.getLogger("alignedserve.executor")


FAILURE_CAUSES = ("prefill", "decode", "kv_move", "engine", "scheduler")
"""Where a request can fail: its prefill, a decode step, a move of its KV between tiers (failed,
refused or past transfer_timeout_s), another engine call, the run loop itself."""


@dataclass(frozen=True, slots=True)
class FirstToken:
    """A request's first token, and where the request goes with it."""

    request: Request
    token: int
    step: str
    """"prefill" (prefilled on the decode device: it joins the running batch); "remote prefill"
    (prefilled on another device: its KV moves to the decode device as a candidate); "chunk" (its
    last prompt chunk ran: it joins the running batch)."""
    park: bool = False
    """Once prefilled, its KV goes to the host pool instead."""


@dataclass(slots=True)
class Outcome:
    """What one engine call (or one wait) did; `Lifecycle.apply` takes it in this field order."""

    timing: CallTiming | None = None
    """The engine call's timing, for the metrics."""
    on_host: Sequence[tuple[Request, float]] = ()
    """(request, when) of KV that reached the host pool."""
    progress: Sequence[tuple[Request, int]] = ()
    """(request, prompt tokens prefilled so far) after a chunk of its prompt ran."""
    tokens: Sequence[tuple[Request, int]] = ()
    """(request, token): the next token of each request decoded."""
    first_tokens: Sequence[FirstToken] = ()
    failed: Sequence[tuple[Request, str]] = ()
    """(request, message): the request ends with an error."""
    failure: str = "engine"
    """Where `failed` failed, one of FAILURE_CAUSES (the metrics count by it)."""
    logprobs: Mapping[str, float] = field(default_factory=dict)
    """Log probability of the token (or first token) of each request that asked, by request id."""


@dataclass(slots=True)
class StepReport:
    """One iteration's engine figures, for its `IterationRecord`."""

    prefill: CallTiming | None = None
    decode: CallTiming | None = None
    bubble: float = 0.0
    """Seconds the decode device waited for KV transfers."""
    transfer_bytes: int = 0
    """KV bytes of the moves started this iteration."""


class PlanExecutor:
    """Runs plans on the engine; owns the moves and the prefills under way on other devices."""

    def __init__(self, engine: Engine, info: EngineInfo, ledger: KVLedger, config: ServeConfig,
                 on_transfer: Callable[[TransferRecord], None], clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.info = info
        self.clock = clock
        self.device = info.decode_device
        self.transfers = TransferTracker(engine, info, ledger, on_transfer, clock, config.transfer_timeout_s)
        self.planner = TransferPlanner(
            info, host_link=Link(config.pcie_gb_s * 1e9, 10e-6), peer_link=Link(config.peer_gb_s * 1e9, 5e-6),
            mode=config.prefetch_route)
        self._prefills: dict[int, tuple[PrefillHandle, list[Request], set[str]]] = {}
        """Prefills running on another device: handle id -> (handle, requests, ids to park)."""

    @property
    def busy(self) -> bool:
        """Moves or prefills on other devices are under way."""
        return bool(len(self.transfers) or self._prefills)

    def prefilling_elsewhere(self) -> tuple[list[Request], int]:
        """Requests whose prompts prefill on another device now, and how many of them go to the
        host pool afterwards."""
        requests = [r for _, reqs, _ in self._prefills.values() for r in reqs]
        return requests, sum(len(park) for _, _, park in self._prefills.values())

    # ---- an iteration ------------------------------------------------------------------------

    def run(self, plan: StepPlan, report: StepReport) -> Iterator[Outcome]:
        """Carry out `plan`; yields each engine call's outcome, to be applied before resuming."""
        bytes_before = self.transfers.bytes_started
        if plan.offload:
            yield self._start_moves(plan.offload, self.device, HOST)
        if plan.load:
            yield self._start_loads(plan.load)
        if plan.prefill:
            park = {r.id for r in plan.park}
            if plan.prefill_on not in (None, self.device):
                yield from self._start_prefill(list(plan.prefill), plan.prefill_on, park)
            else:
                yield from self._prefill(list(plan.prefill), park, report)
        if plan.wait:
            report.bubble, settled = self.transfers.wait(list(plan.wait))
            yield self._settled(settled)
        decode = [r for r in plan.decode if r.state is RequestState.RUNNING and not r.moving]
        chunks = [(r, a, b) for r, a, b in plan.chunks if not r.finished]
        if chunks:
            yield from self._mixed(decode, chunks, report)
        elif decode:
            yield from self._decode(decode, report)
        yield from self.collect()
        report.transfer_bytes = self.transfers.bytes_started - bytes_before

    def collect(self) -> Iterator[Outcome]:
        """What finished since the last look: moves that landed or failed, and prefills done on
        other devices (their KV then starts moving on)."""
        if len(self.transfers):
            yield self._settled(self.transfers.poll())
        if self._prefills:
            yield from self._collect_prefills()

    def wait_for_anything(self, report: StepReport) -> Iterator[Outcome]:
        """Nothing is runnable until a move lands or a prefill on another device ends: block
        until one does. Without prefills under way: until every move lands. Waiting on a move
        counts as bubble (the device idles for its KV)."""
        if not self._prefills:
            report.bubble, settled = self.transfers.wait_all()
            yield self._settled(settled)
            return
        start = self.clock()
        self.engine.wait_any([h for h, _, _ in self._prefills.values()] + self.transfers.handles())
        moving = len(self.transfers)
        settled = self.transfers.poll()
        yield Outcome(on_host=settled.on_host)
        yield from self._collect_prefills()
        yield self._settled(Settled(failed=settled.failed))
        report.bubble = self.clock() - start if moving else 0.0

    # ---- moves ---------------------------------------------------------------------------------

    def _start_moves(self, requests, src: str, dst: str, via: str | None = None) -> Outcome:
        """Start one move of these requests' KV; a request whose move cannot start fails (its
        grants were booked for a move that will not happen)."""
        return Outcome(failed=self.transfers.start(requests, src, dst, via), failure="kv_move")

    def _start_loads(self, requests) -> Outcome:
        """Host -> decode device, directly or through a helper device, as the planner routes it."""
        live = [r for r in requests if not r.finished]
        if not live:
            return Outcome()
        nbytes = sum(self.info.blocks_for(r.kv_len) for r in live) * self.info.bytes_per_block
        route = self.planner.route(nbytes, self.transfers.queued())
        return self._start_moves(live, HOST, self.device, via=route.via)

    @staticmethod
    def _settled(settled: Settled) -> Outcome:
        return Outcome(on_host=settled.on_host, failure="kv_move",
                       failed=[(r, f"moving its KV failed: {error}") for r, error in settled.failed])

    # ---- prefill, decode -----------------------------------------------------------------------

    def _prefill(self, requests: list[Request], park: set[str], report: StepReport) -> Iterator[Outcome]:
        """Prefill on the decode device; the requests whose ids are in `park` then move to the
        host pool, the others join the running batch."""
        try:
            result = self.engine.prefill([PrefillRequest(r.id, r.prompt_ids, r.sampling, r.max_tokens) for r in requests])
        except Exception as e:  # the engine failed this call: these requests end, others go on
            log.exception("prefill failed")
            yield Outcome(failed=[(r, f"prefill failed: {e}") for r in requests], failure="prefill")
            return
        report.prefill = result.timing
        yield Outcome(timing=result.timing, logprobs=result.logprobs, first_tokens=[
            FirstToken(r, result.tokens[r.id], "prefill", park=r.id in park) for r in requests])
        parked = [r for r in requests if r.id in park and not r.finished]
        if parked:
            yield self._start_moves(parked, self.device, HOST)

    def _start_prefill(self, requests: list[Request], device: str, park: set[str]) -> Iterator[Outcome]:
        """Prefill on another device; `_collect_prefills` takes the tokens when it is done."""
        try:
            handle = self.engine.start_prefill(
                [PrefillRequest(r.id, r.prompt_ids, r.sampling, r.max_tokens) for r in requests], device)
        except Exception as e:
            log.exception("prefill on %s failed to start", device)
            yield Outcome(failed=[(r, f"prefill failed: {e}") for r in requests], failure="prefill")
            return
        self._prefills[handle.id] = (handle, requests, park)
        yield from self._collect_prefills()

    def _collect_prefills(self) -> Iterator[Outcome]:
        """Take the tokens of finished prefills on other devices and start moving their KV: to
        the host for the requests to park, to the decode device for the others."""
        for hid, (handle, requests, park) in list(self._prefills.items()):
            try:
                result = self.engine.prefill_result(handle)
            except EngineError as e:
                del self._prefills[hid]
                yield Outcome(failed=[(r, f"prefill failed: {e}") for r in requests if not r.finished],
                              failure="prefill")
                continue
            if result is None:
                continue
            del self._prefills[hid]
            yield Outcome(timing=result.timing, logprobs=result.logprobs, first_tokens=[
                FirstToken(r, result.tokens[r.id], "remote prefill", park=r.id in park)
                for r in requests if not r.finished])
            live = [r for r in requests if not r.finished]
            yield self._start_moves([r for r in live if r.id in park], handle.device, HOST)
            yield self._start_moves([r for r in live if r.id not in park], handle.device, self.device)

    def _decode(self, requests: list[Request], report: StepReport) -> Iterator[Outcome]:
        try:
            result = self.engine.decode([r.id for r in requests])
        except Exception as e:
            log.exception("decode failed")
            yield Outcome(failed=[(r, f"decode failed: {e}") for r in requests], failure="decode")
            return
        report.decode = result.timing
        tokens = result.tokens
        yield Outcome(timing=result.timing, tokens=[(r, tokens[r.id]) for r in requests], logprobs=result.logprobs)

    def _mixed(self, decode: list[Request], chunks: list[tuple[Request, int, int]],
               report: StepReport) -> Iterator[Outcome]:
        """One decode step that also prefills prompt chunks. For the iteration record it reports
        a decode part (the whole step's seconds, the decode members' KV) and a prefill part (its
        prompt tokens; the step's seconds only when nothing decoded)."""
        kv = [r.kv_len + 1 for r in decode]
        try:
            result = self.engine.mixed_step(
                [r.id for r in decode],
                [PrefillChunk(PrefillRequest(r.id, r.prompt_ids, r.sampling, r.max_tokens), a, b) for r, a, b in chunks])
        except Exception as e:
            log.exception("mixed decode + prefill step failed")
            yield Outcome(failed=[(r, f"decode with prefill chunks failed: {e}")
                                  for r in decode + [c[0] for c in chunks]], failure="decode")
            return
        seconds = result.timing.seconds
        tokens = sum(b - a for _, a, b in chunks)
        prefill = CallTiming("prefill", 0.0 if decode else seconds, len(chunks), tokens, 0, 0)
        report.prefill = report.prefill or prefill
        if decode:
            report.decode = CallTiming("decode", seconds, len(decode), len(decode), sum(kv), max(kv))
        yield Outcome(
            timing=result.timing, progress=[(r, end) for r, _, end in chunks], logprobs=result.logprobs,
            tokens=[(r, result.tokens[r.id]) for r in decode],
            first_tokens=[FirstToken(r, result.tokens[r.id], "chunk") for r, _, end in chunks if end == r.prompt_len])

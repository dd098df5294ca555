"""KV moves under way, and what finishing one means for the books.

The policy books the destination grant when it plans a move; the tracker starts the move on the
engine, and when the engine reports it finished, releases the source grant and reports what
landed (`Settled`): the run loop then tells the pool, so a request that reached the host becomes
pickable. A request freed mid-move (cancel, error) is already out of the books: its completion
is ignored.

A move may go in two hops through a helper device (GPU-Prefetch-For-GPU, DESIGN.md §1.4):
host -> helper, then helper -> decode device. The tracker books the helper's blocks for the
time between the hops and starts the second hop as soon as the first lands; the request stays
`moving` throughout, so nothing picks or decodes it before its KV is on the decode device.

Each hop has a deadline (`ServeConfig.transfer_timeout_s`): a hop still unfinished then is given
up on (`Engine.abandon`), and its requests fail like those of a failed hop. A step that waits on
a stuck hop (the loads a batch needs) waits until that deadline.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from engines.base import HOST, Engine, EngineError, EngineInfo, TransferHandle, TransferTimedOut
from orchestrator.core import Request
from orchestrator.kv_ledger import KVLedger

log = logging.getLogger("alignedserve.transfers")


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """One finished move (one hop), for metrics and cost-model fitting."""

    src: str
    dst: str
    requests: int
    bytes: int
    seconds: float


@dataclass(slots=True)
class Settled:
    """What finished moves leave for the run loop to apply."""

    on_host: list[tuple[Request, float]] = field(default_factory=list)
    """(request, when) of KV that reached the host pool: it becomes a candidate for batches."""
    failed: list[tuple[Request, str]] = field(default_factory=list)
    """(request, error) of moves that failed: the request ends with an error."""

    def add(self, other: "Settled") -> "Settled":
        self.on_host += other.on_host
        self.failed += other.failed
        return self


@dataclass(slots=True)
class _Move:
    handle: TransferHandle
    requests: list[Request]
    then: str | None
    """The final destination when this is the first hop of a two-hop move, else None."""
    deadline: float
    """When the hop is given up on (the tracker's clock)."""


class TransferTracker:
    """Starts moves, polls them, and settles the books when they finish."""

    def __init__(self, engine: Engine, info: EngineInfo, ledger: KVLedger,
                 on_record: Callable[[TransferRecord], None], clock: Callable[[], float] = time.monotonic,
                 timeout_s: float = 10.0):
        self.engine = engine
        self.timeout_s = timeout_s
        """A hop unfinished this long after it started fails its requests."""

        self.clock = clock
        """Measures the waits (the bubble): wall time, or an engine's virtual time."""
        self.info = info
        self.ledger = ledger
        self.on_record = on_record
        self.bytes_started = 0
        """KV bytes of every hop started so far (a two-hop move counts both)."""
        self._moves: dict[int, _Move] = {}

    def __len__(self) -> int:
        return len(self._moves)

    def start(self, requests: list[Request], src: str, dst: str, via: str | None = None) -> list[tuple[Request, str]]:
        """Start one move of these requests' KV, through device `via` when given (and when its
        blocks can be booked; else directly). Returns (request, why) for each it failed to start (the
        caller ends them with an error), or [] on success."""
        live = [r for r in requests if not r.finished]
        if not live:
            return []
        if via is not None and not self._book(live, via):
            via = None
        failed = self._begin(live, src, via or dst, then=dst if via else None)
        if failed and via is not None:
            for r in live:
                self.ledger.release(r.id, via)
        return failed

    def handles(self) -> list[TransferHandle]:
        """The engine handles of the unfinished hops."""
        return [m.handle for m in self._moves.values()]

    def queued(self) -> dict[str, float]:
        """Bytes of unfinished host <-> device hops per device: the load on each device's PCIe
        link, which the transfer planner weighs."""
        load: dict[str, float] = {}
        for m in self._moves.values():
            h = m.handle
            if HOST in (h.src, h.dst):
                device = h.dst if h.src == HOST else h.src
                load[device] = load.get(device, 0.0) + h.bytes
        return load

    def poll(self) -> Settled:
        """Settle every finished move, and give up on those past their deadline."""
        settled = Settled()
        for move in list(self._moves.values()):
            try:
                done = self.engine.poll(move.handle)
            except EngineError as e:
                settled.add(self._settle(move, str(e)))
                continue
            if done:
                settled.add(self._settle(move, None))
            elif self.clock() >= move.deadline:
                settled.add(self._give_up(move))
        return settled

    def wait(self, requests: list[Request]) -> tuple[float, Settled]:
        """Block until these requests' moves (every hop) finish, or until their deadlines (then
        they are given up on); returns the seconds spent waiting and what settled."""
        wanted = {r.id for r in requests}
        start = self.clock()
        settled = Settled()
        while True:
            pending = [m for m in self._moves.values() if not wanted.isdisjoint(r.id for r in m.requests)]
            if not pending:
                break
            for move in pending:
                try:
                    self.engine.wait(move.handle, timeout=max(0.0, move.deadline - self.clock()))
                    settled.add(self._settle(move, None))
                except TransferTimedOut:
                    settled.add(self._give_up(move))
                except EngineError as e:
                    settled.add(self._settle(move, str(e)))
        return self.clock() - start, settled

    def wait_all(self) -> tuple[float, Settled]:
        return self.wait([r for m in self._moves.values() for r in m.requests])

    def _give_up(self, move: _Move) -> Settled:
        note = self.engine.abandon(move.handle)
        return self._settle(move, f"no end within transfer_timeout_s={self.timeout_s:g}s, given up"
                                  + (f" ({note})" if note else ""))

    def _book(self, requests: list[Request], tier: str) -> bool:
        """Grant these requests blocks on `tier` for their KV, all or none."""
        blocks = [self.info.blocks_for(r.kv_len) for r in requests]
        if not self.ledger.can_reserve(tier, sum(blocks)):
            return False
        for r, n in zip(requests, blocks):
            self.ledger.reserve(r.id, tier, n)
        return True

    def _begin(self, requests: list[Request], src: str, dst: str, then: str | None) -> list[tuple[Request, str]]:
        try:
            handle = self.engine.move([r.id for r in requests], src, dst)
        except EngineError as e:
            log.exception("move from %s to %s failed to start", src, dst)
            return [(r, f"could not move its KV from {src} to {dst}: {e}") for r in requests]
        for r in requests:
            r.moving = True
        self.bytes_started += handle.bytes
        self._moves[handle.id] = _Move(handle, requests, then, self.clock() + self.timeout_s)
        return []

    def _settle(self, move: _Move, error: str | None) -> Settled:
        handle = move.handle
        del self._moves[handle.id]
        settled, arrived = Settled(), []
        for r in move.requests:
            r.moving = False
            if r.finished:
                continue  # freed mid-move: its grants are already released
            if error is not None:
                settled.failed.append((r, error))
                continue
            self.ledger.release(r.id, handle.src)
            if move.then is not None:
                arrived.append(r)
            elif handle.dst == HOST:
                settled.on_host.append((r, self.clock()))
        if error is None:
            self.on_record(TransferRecord(handle.src, handle.dst, len(move.requests), handle.bytes,
                                          handle.seconds or 0.0))
        if arrived:  # first hop done: on to the final destination
            settled.failed += self._begin(arrived, handle.dst, move.then, then=None)
        return settled

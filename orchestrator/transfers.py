"""KV moves under way, and what finishing one means for the books.

The policy books the destination grant when it plans a move; the tracker starts the move on the
engine, and when the engine reports it finished, releases the source grant and tells the pool
(a request that reached the host becomes pickable). A request freed mid-move (cancel, error) is
already out of the books: its completion is ignored.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from engines.base import HOST, Engine, EngineError, TransferHandle
from orchestrator.core import Request
from orchestrator.kv_ledger import KVLedger
from orchestrator.pool import RequestPool

log = logging.getLogger("alignedserve.transfers")


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """One finished move, for metrics and cost-model fitting."""

    src: str
    dst: str
    requests: int
    bytes: int
    seconds: float


class TransferTracker:
    """Starts moves, polls them, and settles the books when they finish."""

    def __init__(self, engine: Engine, ledger: KVLedger, pool: RequestPool,
                 on_record: Callable[[TransferRecord], None]):
        self.engine = engine
        self.ledger = ledger
        self.pool = pool
        self.on_record = on_record
        self._moves: dict[int, tuple[TransferHandle, list[Request]]] = {}

    def __len__(self) -> int:
        return len(self._moves)

    def start(self, requests: list[Request], src: str, dst: str) -> list[Request]:
        """Start one move of these requests' KV; returns the requests it failed to start for
        (the caller ends them with an error), or [] on success."""
        live = [r for r in requests if not r.finished]
        if not live:
            return []
        try:
            handle = self.engine.move([r.id for r in live], src, dst)
        except EngineError:
            log.exception("move from %s to %s failed to start", src, dst)
            return live
        for r in live:
            r.moving = True
        self._moves[handle.id] = (handle, live)
        return []

    def poll(self) -> list[tuple[Request, str]]:
        """Settle every finished move; returns (request, error) for moves that failed."""
        failed: list[tuple[Request, str]] = []
        for handle, requests in list(self._moves.values()):
            try:
                done = self.engine.poll(handle)
            except EngineError as e:
                failed += self._settle(handle, requests, str(e))
                continue
            if done:
                failed += self._settle(handle, requests, None)
        return failed

    def wait(self, requests: list[Request]) -> tuple[float, list[tuple[Request, str]]]:
        """Block until the moves carrying these requests finish; returns the seconds spent
        waiting and the failures."""
        wanted = {r.id for r in requests}
        start = time.perf_counter()
        failed: list[tuple[Request, str]] = []
        for handle, moving in list(self._moves.values()):
            if wanted.isdisjoint(r.id for r in moving):
                continue
            try:
                self.engine.wait(handle)
                failed += self._settle(handle, moving, None)
            except EngineError as e:
                failed += self._settle(handle, moving, str(e))
        return time.perf_counter() - start, failed

    def wait_all(self) -> tuple[float, list[tuple[Request, str]]]:
        return self.wait([r for _, moving in self._moves.values() for r in moving])

    def _settle(self, handle: TransferHandle, requests: list[Request], error: str | None):
        del self._moves[handle.id]
        failed = []
        for r in requests:
            r.moving = False
            if r.finished:
                continue  # freed mid-move: its grants are already released
            if error is not None:
                failed.append((r, error))
                continue
            self.ledger.release(r.id, handle.src)
            if handle.dst == HOST:
                self.pool.on_host(r)
        if error is None:
            self.on_record(TransferRecord(handle.src, handle.dst, len(requests), handle.bytes,
                                          handle.seconds or 0.0))
        return failed

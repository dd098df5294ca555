"""`KVTiers`: an engine's KV pools by tier name, and the moves between them that are under way.

Where a request's KV is follows from the pools' block tables alone: in the one pool that holds a
table for it, or IN_FLIGHT while a move has given it a table in two. A move takes its destination
blocks at once, all-or-nothing, and releases one side when `poll` or `wait` sees the copy end:
the source's when the copy worked, the destination's when it failed.

A copy that is still running can write its destination and read its source, so the blocks of a
request freed mid-move whose copy does not end within RELEASE_WAIT_S, and of a move given up on
(`abandon`), are held aside until the copy really ends, then freed: in the meantime they count as
used, and nobody is handed them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from engines.base import HOST, IN_FLIGHT, EngineError, OutOfKVBlocks, TransferHandle, TransferTimedOut, check_move
from engines.torch.kv_cache import KVBlockPool
from engines.torch.kv_transfer import BlockCopier, PendingCopy

RELEASE_WAIT_S = 1.0
"""How long freeing a request mid-move waits for the copy before holding its blocks instead: a
held block is free in the orchestrator's books but not yet in the pool, so only a stuck copy is
worth that."""


@dataclass(slots=True)
class _Transfer:
    """A started move: both tiers hold blocks of its requests until it is finished."""

    handle: TransferHandle
    src: KVBlockPool
    dst: KVBlockPool
    copy: PendingCopy
    started: float
    """time.perf_counter() when the copy started."""
    dropped: set[str] = field(default_factory=set)
    """Requests freed while it ran: their blocks are held aside (`KVTiers._held`), not released here."""


class KVTiers:
    """The KV pools of one engine (its devices' caches, then the host pool if any), the copier
    between them, and the unfinished moves by handle and by request id."""

    def __init__(self, pools: Sequence[KVBlockPool]):
        self.pools: dict[str, KVBlockPool] = {p.tier: p for p in pools}
        self.copier = BlockCopier()
        self._transfers: dict[int, _Transfer] = {}
        """Unfinished moves by handle id."""
        self._in_flight: dict[str, _Transfer] = {}
        """Unfinished moves by request id."""
        self._held: list[tuple[PendingCopy, KVBlockPool, list[int]]] = []
        """Blocks a running copy may still touch, freed once it ends: (copy, pool, blocks)."""

    def tier_of(self, request_id: str) -> str | None:
        """The tier holding the request's KV, IN_FLIGHT during a move, None if no tier does."""
        if request_id in self._in_flight:
            return IN_FLIGHT
        return next((tier for tier, pool in self.pools.items() if request_id in pool.tables), None)

    def used(self, tier: str) -> int:
        """Blocks held in `tier` now; 0 for HOST when there is no host pool."""
        if tier not in self.pools:
            if tier == HOST:
                return 0
            raise KeyError(f"unknown KV tier {tier!r}; known: {list(self.pools)}")
        self._free_held()
        return self.pools[tier].allocator.used

    @property
    def busy(self) -> bool:
        """Some move is unfinished."""
        return bool(self._transfers)

    def start(self, request_ids: Sequence[str], src: str, dst: str) -> TransferHandle:
        """Take the destination blocks (all-or-nothing) and start the copy; see `Engine.move`."""
        ids = list(request_ids)
        check_move(ids, src, dst, self.pools, self.tier_of)
        self._free_held()
        handle = TransferHandle(tuple(ids), src, dst)
        if not ids:
            return handle
        source, target = self.pools[src], self.pools[dst]
        src_blocks = [b for i in ids for b in source.tables[i]]
        try:
            dst_blocks = target.allocator.allocate(len(src_blocks))
        except OutOfKVBlocks as e:
            raise OutOfKVBlocks(f"move {ids[:5]} from {src!r} to {dst!r}: {e}") from None
        at = 0
        for rid in ids:
            n = len(source.tables[rid])
            target.adopt(rid, dst_blocks[at:at + n])
            at += n
        started = time.perf_counter()
        try:
            copy = self.copier.start(source, src_blocks, target, dst_blocks)
        except Exception:
            for rid in ids:
                target.release(rid)
            raise
        handle.bytes = len(src_blocks) * source.bytes_per_block
        transfer = _Transfer(handle, source, target, copy, started)
        self._transfers[handle.id] = transfer
        for rid in ids:
            self._in_flight[rid] = transfer
        return handle

    def poll(self, handle: TransferHandle) -> bool:
        transfer = self._transfers.get(handle.id)
        if transfer is None:
            return True  # finished earlier (or moved nothing)
        if not transfer.copy.done():
            return False
        self._finish(transfer)
        return True

    def wait(self, handle: TransferHandle, timeout: float | None = None) -> None:
        """Until the move ends; with `timeout`, TransferTimedOut after that long (it goes on)."""
        transfer = self._transfers.get(handle.id)
        if transfer is None:
            return
        if timeout is not None:
            try:
                transfer.copy.wait(timeout)
            except TimeoutError:
                raise TransferTimedOut(f"move {list(handle.request_ids)[:5]} from {handle.src!r} to {handle.dst!r} "
                                       f"has not finished after {timeout:g}s") from None
            except Exception:
                pass  # failed: _finish reports it
        self._finish(transfer)

    def abandon(self, handle: TransferHandle) -> str:
        """Give up on an unfinished move: its requests lose their block tables in both tiers (the
        blocks are held until the copy ends), so the caller must free them."""
        transfer = self._transfers.pop(handle.id, None)
        if transfer is None:
            return ""
        live = [rid for rid in handle.request_ids if rid not in transfer.dropped]
        for rid in live:
            del self._in_flight[rid]
        self._hold(transfer, live)
        return f"{transfer.copy.injected} injected" if transfer.copy.injected else ""

    def release(self, request_id: str) -> None:
        """Free the request's blocks in every tier. Mid-move, after waiting RELEASE_WAIT_S for the
        copy, its blocks in the move's two tiers are held until the copy ends (the rest of that
        move goes on as usual)."""
        transfer = self._in_flight.get(request_id)
        if transfer is not None:
            try:  # a copy ends in milliseconds: waiting for it keeps the orchestrator's books exact
                transfer.copy.wait(RELEASE_WAIT_S)
            except Exception:
                pass  # still running (held below), or failed (_finish reports it)
        if transfer is not None and transfer.copy.done():
            try:
                self._finish(transfer)
            except EngineError:
                pass  # the failed move already gave back its destination blocks
        elif transfer is not None:
            del self._in_flight[request_id]
            transfer.dropped.add(request_id)
            self._hold(transfer, [request_id])
        for pool in self.pools.values():
            pool.release(request_id)

    def _hold(self, transfer: _Transfer, request_ids: list[str]) -> None:
        """Take these requests' block tables in the move's two tiers out of use until it ends."""
        for pool in (transfer.src, transfer.dst):
            for rid in request_ids:
                blocks = pool.hold(rid)
                if blocks:
                    self._held.append((transfer.copy, pool, blocks))

    def _free_held(self) -> None:
        """Free the held blocks of the copies that have ended."""
        still = []
        for copy, pool, blocks in self._held:
            if not copy.done():
                still.append((copy, pool, blocks))
                continue
            try:  # a host-side last step (PendingCopy's `then`) still writes these blocks: now
                copy.wait()
            except Exception:
                pass  # the copy's failure was reported (or is moot: its requests are gone)
            pool.free_held(blocks)
        self._held = still

    def close(self) -> None:
        """Wait for every move (failures are moot now), stop the copier and drop every table."""
        for transfer in list(self._transfers.values()):
            try:
                self._finish(transfer)
            except EngineError:
                pass
        self.copier.close()
        for pool in self.pools.values():
            pool.tables.clear()
            pool.held.clear()
        self._held.clear()

    def _finish(self, transfer: _Transfer) -> None:
        """Wait for the copy, then release the source blocks (or, if it failed, the destination's)."""
        handle = transfer.handle
        del self._transfers[handle.id]
        live = [rid for rid in handle.request_ids if rid not in transfer.dropped]
        for rid in live:
            del self._in_flight[rid]
        try:
            transfer.copy.wait()
        except Exception as e:
            for rid in live:
                transfer.dst.release(rid)
            raise EngineError(f"move {live[:5]} from {handle.src!r} to {handle.dst!r} "
                              f"failed; the KV stays in {handle.src!r}: {e}") from e
        finally:
            self._free_held()
        handle.seconds = time.perf_counter() - transfer.started
        for rid in live:
            transfer.src.release(rid)

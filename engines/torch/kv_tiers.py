"""`KVTiers`: an engine's KV pools by tier name, and the moves between them that are under way.

Where a request's KV is follows from the pools' block tables alone: in the one pool that holds a
table for it, or IN_FLIGHT while a move has given it a table in two. A move takes its destination
blocks at once, all-or-nothing, and releases one side when `poll` or `wait` sees the copy end:
the source's when the copy worked, the destination's when it failed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from engines.base import HOST, IN_FLIGHT, EngineError, OutOfKVBlocks, TransferHandle, check_move
from engines.torch.kv_cache import KVBlockPool
from engines.torch.kv_transfer import BlockCopier, PendingCopy


@dataclass(slots=True)
class _Transfer:
    """A started move: both tiers hold blocks of its requests until it is finished."""

    handle: TransferHandle
    src: KVBlockPool
    dst: KVBlockPool
    copy: PendingCopy
    started: float
    """time.perf_counter() when the copy started."""


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
        return self.pools[tier].allocator.used

    @property
    def busy(self) -> bool:
        """Some move is unfinished."""
        return bool(self._transfers)

    def start(self, request_ids: Sequence[str], src: str, dst: str) -> TransferHandle:
        """Take the destination blocks (all-or-nothing) and start the copy; see `Engine.move`."""
        ids = list(request_ids)
        check_move(ids, src, dst, self.pools, self.tier_of)
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

    def wait(self, handle: TransferHandle) -> None:
        transfer = self._transfers.get(handle.id)
        if transfer is not None:
            self._finish(transfer)

    def release(self, request_id: str) -> None:
        """Free the request's blocks in every tier; a request in flight waits for its move first
        (the rest of that move completes as usual)."""
        transfer = self._in_flight.get(request_id)
        if transfer is not None:
            try:
                self._finish(transfer)
            except EngineError:
                pass  # the failed move already gave back its destination blocks
        for pool in self.pools.values():
            pool.release(request_id)

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

    def _finish(self, transfer: _Transfer) -> None:
        """Wait for the copy, then release the source blocks (or, if it failed, the destination's)."""
        handle = transfer.handle
        del self._transfers[handle.id]
        for rid in handle.request_ids:
            del self._in_flight[rid]
        try:
            transfer.copy.wait()
        except Exception as e:
            for rid in handle.request_ids:
                transfer.dst.release(rid)
            raise EngineError(f"move {list(handle.request_ids)[:5]} from {handle.src!r} to {handle.dst!r} "
                              f"failed; the KV stays in {handle.src!r}: {e}") from e
        handle.seconds = time.perf_counter() - transfer.started
        for rid in handle.request_ids:
            transfer.src.release(rid)

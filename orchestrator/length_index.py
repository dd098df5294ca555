"""Pooled requests indexed by KV length, for building length-aligned batches.

A 4-ary count tree over lengths [1, 4**depth] (leaf i holds length i + 1; depth from max_len:
8 levels cover 65,536) keeps
how many pooled requests sit under every node, so insert, remove and update cost O(depth), and the
nearest pooled length to a given one is found in O(4 * depth) by walking the tree.

Each request is indexed by its KV length and weighs the blocks it will be granted where it goes
next (`insert(..., blocks=)`; by default its KV length's blocks). The request pool weighs a
parked request by its longest possible KV, which is what the decode device grants it, so a window
the search finds is a window that can be reserved.

`densest(kmin, block_budget)` is the density-first search: among sets of at least `kmin` pooled
requests whose weights fit `block_budget` blocks, it returns one with the narrowest span of KV
lengths. It scans every window of kmin requests consecutive in length order at once, over the
distinct pooled lengths (vectorised; the prefix sums are cached until the pool changes), then
widens the winner to every pooled request inside its span, lightest first at each length, while
the budget and `kmax` allow. A window counts all the requests of its inner lengths and, at its
last length, the ones it takes at the weight of the heaviest there, so the blocks it counts never
fall short of what its members are granted. When every request weighs its own length's blocks this
is exact (the shortest kmin of any window have the smallest span and the fewest blocks); with
other weights a feasible set that skips a heavy request in the middle of a span may be missed, the
price of a search that stays one vectorised pass.

Every query takes `exclude`: ids to treat as already gone. A policy planning an iteration picks
several requests in turn (refills, then a staged batch) without touching the index; each query
answers as if the earlier picks had left it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet

import numpy as np

FANOUT = 4
NONE: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Window:
    """The result of a density-first search."""

    request_ids: tuple[str, ...]
    lo: int
    """Shortest KV length in the set."""
    hi: int
    """Longest KV length in the set."""
    blocks: int
    """KV blocks the set needs."""

    @property
    def span(self) -> int:
        return self.hi - self.lo


class LengthIndex:
    """Request ids by KV length in [1, max_len]; lengths in blocks of `block_size` tokens."""

    def __init__(self, max_len: int, block_size: int):
        if max_len < 1 or block_size < 1:
            raise ValueError(f"max_len and block_size must be >= 1, got {max_len}, {block_size}")
        self.max_len = max_len
        self.block_size = block_size
        self.depth = 1
        while FANOUT ** self.depth < max_len:
            self.depth += 1
        # counts[d][i]: pooled requests whose length falls under node i of level d (0 = leaves).
        self.counts = [np.zeros(FANOUT ** (self.depth - d), dtype=np.int64) for d in range(self.depth + 1)]
        self._length: dict[str, int] = {}
        self._bucket: dict[int, dict[str, int]] = {}  # length -> {id: blocks} in insertion order
        # Per leaf: the blocks its requests weigh together, and the heaviest one's.
        self._weight = np.zeros(self.counts[0].size, dtype=np.int64)
        self._heaviest = np.zeros(self.counts[0].size, dtype=np.int64)
        self._cache: tuple | None = None

    def __len__(self) -> int:
        return len(self._length)

    def __iter__(self):
        """Indexed request ids (no particular order)."""
        return iter(list(self._length))

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._length

    def length_of(self, request_id: str) -> int:
        return self._length[request_id]

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    def blocks_of(self, request_id: str) -> int:
        """The blocks the request weighs (`insert`'s `blocks`)."""
        return self._bucket[self._length[request_id]][request_id]

    # ---- O(depth) updates -------------------------------------------------------------------

    def insert(self, request_id: str, length: int, blocks: int | None = None) -> None:
        """Index a request of KV length `length` weighing `blocks` blocks in the searches (None:
        `blocks_for(length)`)."""
        if request_id in self._length:
            raise KeyError(f"{request_id} is already indexed")
        if not 1 <= length <= self.max_len:
            raise ValueError(f"KV length {length} of {request_id} is outside [1, {self.max_len}]")
        blocks = self.blocks_for(length) if blocks is None else blocks
        if blocks < 0:
            raise ValueError(f"{request_id} cannot weigh {blocks} blocks")
        self._length[request_id] = length
        self._bucket.setdefault(length, {})[request_id] = blocks
        self._weight[length - 1] += blocks
        self._heaviest[length - 1] = max(self._heaviest[length - 1], blocks)
        self._add(length, 1)

    def remove(self, request_id: str) -> int:
        """Take a request out; returns its length."""
        length = self._length.pop(request_id)
        bucket = self._bucket[length]
        blocks = bucket.pop(request_id)
        self._weight[length - 1] -= blocks
        if not bucket:
            del self._bucket[length]
            self._heaviest[length - 1] = 0
        elif blocks == self._heaviest[length - 1]:
            self._heaviest[length - 1] = max(bucket.values())
        self._add(length, -1)
        return length

    def update(self, request_id: str, length: int, blocks: int | None = None) -> None:
        self.remove(request_id)
        self.insert(request_id, length, blocks)

    def _add(self, length: int, delta: int) -> None:
        i = length - 1
        for level in self.counts:
            level[i] += delta
            i //= FANOUT
        self._cache = None

    # ---- nearest length (single refills) ----------------------------------------------------

    def nearest(self, length: int, exclude: AbstractSet[str] = NONE) -> str | None:
        """A pooled request whose length is closest to `length` (ties: the shorter, then the
        earliest inserted); None when the pool (less `exclude`) is empty."""
        if not self._length:
            return None
        below = self._scan_kept(min(length, self.max_len) - 1, -1, exclude)
        above = self._scan_kept(max(length, 1) - 1, +1, exclude)
        candidates = [x + 1 for x in (below, above) if x is not None]
        if not candidates:
            return None
        best = min(candidates, key=lambda x: (abs(x - length), x))
        return self._first(best, exclude)

    def _first(self, length: int, exclude: AbstractSet[str]) -> str | None:
        """The earliest inserted request of this length that is not excluded."""
        return next((rid for rid in self._bucket[length] if rid not in exclude), None)

    def _scan_kept(self, start: int, step: int, exclude: AbstractSet[str]) -> int | None:
        """`_scan`, passing over leaves whose every request is excluded."""
        i = self._scan(start, step)
        while i is not None and exclude and self._first(i + 1, exclude) is None:
            if not 0 <= i + step < self.counts[0].size:
                return None
            i = self._scan(i + step, step)
        return i

    def _scan(self, start: int, step: int) -> int | None:
        """The first non-empty leaf from `start` in direction `step` (inclusive), via the tree."""
        i, d = start, 0
        leaves = self.counts[0]
        if 0 <= i < leaves.size and leaves[i]:
            return i
        # Climb until a sibling in the scan direction holds something, then descend into it.
        while d <= self.depth:
            level = self.counts[d]
            j = i + step
            while 0 <= j < level.size and j // FANOUT == i // FANOUT:
                if level[j]:
                    return self._descend(d, j, step)
                j += step
            i //= FANOUT
            d += 1
        return None

    def _descend(self, d: int, i: int, step: int) -> int:
        while d > 0:
            d -= 1
            children = range(i * FANOUT, i * FANOUT + FANOUT)
            i = next(c for c in (children if step > 0 else reversed(children)) if self.counts[d][c])
        return i

    # ---- density-first search ---------------------------------------------------------------

    def densest(self, kmin: int, block_budget: int, kmax: int | None = None,
                exclude: AbstractSet[str] = NONE) -> Window | None:
        """The narrowest-span set of at least `kmin` pooled requests whose weights fit
        `block_budget` blocks (ties: the shorter lengths), widened to all requests inside that
        span while the budget and `kmax` allow. None if no window of kmin requests fits."""
        pooled = len(self._length) - sum(1 for rid in exclude if rid in self._length)
        if kmin < 1 or kmin > pooled:
            return None
        lengths, heaviest, cum_n, cum_b = self._prefix(exclude)
        # Window starting at distinct length index a: the kmin requests from lengths[a] upwards.
        start_n = cum_n[:-1]
        end_at = np.searchsorted(cum_n, start_n + kmin, side="left")  # cum_n[end_at] >= start + kmin
        valid = end_at < cum_n.size
        a = np.flatnonzero(valid)
        z = end_at[valid] - 1  # index of the last distinct length in the window
        taken_last = start_n[a] + kmin - cum_n[z]
        blocks = cum_b[z] - cum_b[a] + taken_last * heaviest[z]
        ok = blocks <= block_budget
        if not ok.any():
            return None
        a, z, blocks = a[ok], z[ok], blocks[ok]
        spans = lengths[z] - lengths[a]
        best = int(np.argmin(spans))  # first minimum = the shortest lengths among ties
        lo_i, hi_i = int(a[best]), int(z[best])
        return self._widen(lengths, lo_i, hi_i, block_budget, kmax if kmax is not None else pooled, exclude)

    def around(self, request_id: str, kmax: int, block_budget: int, exclude: AbstractSet[str] = NONE) -> Window:
        """`request_id` and the pooled requests of nearest KV lengths, up to `kmax` requests
        whose weights fit `block_budget` blocks (the request itself always counts, even past the
        budget): the batch the starvation guard builds around a request that waited too long."""
        center = self._length[request_id]
        lengths = self._prefix(exclude)[0]
        left = right = int(np.searchsorted(lengths, center))
        chosen, blocks, lo, hi = [request_id], self.blocks_of(request_id), center, center
        j = left
        while len(chosen) < kmax:
            length = int(lengths[j])
            for rid, per in self._bucket[length].items():
                if rid == request_id or rid in exclude:
                    continue
                if len(chosen) >= kmax or blocks + per > block_budget:
                    return Window(tuple(chosen), lo, hi, blocks)
                chosen.append(rid)
                blocks += per
                lo, hi = min(lo, length), max(hi, length)
            # The next distinct length: the nearer side (ties: the shorter).
            has_left, has_right = left > 0, right + 1 < lengths.size
            if not (has_left or has_right):
                break
            if has_left and (not has_right or center - lengths[left - 1] <= lengths[right + 1] - center):
                left -= 1
                j = left
            else:
                right += 1
                j = right
        return Window(tuple(chosen), lo, hi, blocks)

    def _widen(self, lengths: np.ndarray, lo_i: int, hi_i: int, budget: int, kmax: int,
               exclude: AbstractSet[str]) -> Window:
        chosen: list[str] = []
        blocks = 0
        for i in range(lo_i, hi_i + 1):
            length = int(lengths[i])
            bucket = self._bucket[length]
            # Lightest first: the window's last length was counted at its heaviest request.
            for rid in sorted(bucket, key=bucket.__getitem__):
                per = bucket[rid]
                if rid in exclude:
                    continue
                if len(chosen) >= kmax or blocks + per > budget:
                    break
                chosen.append(rid)
                blocks += per
        return Window(tuple(chosen), int(lengths[lo_i]), self._length[chosen[-1]], blocks)

    def _prefix(self, exclude: AbstractSet[str] = NONE):
        """(distinct lengths, the heaviest request's blocks at each, prefix sums of requests and
        of blocks), cached until the index changes; with `exclude`, less those requests."""
        if self._cache is None:
            nonempty = np.flatnonzero(self.counts[0])
            self._cache = self._sums(nonempty + 1, self.counts[0][nonempty], self._weight[nonempty],
                                     self._heaviest[nonempty])
        gone = [rid for rid in exclude if rid in self._length]
        if not gone:
            return self._cache[0], self._cache[3], self._cache[4], self._cache[5]
        lengths, counts, weights, heaviest = self._cache[:4]
        at = np.searchsorted(lengths, [self._length[rid] for rid in gone])
        counts, weights = counts.copy(), weights.copy()
        np.subtract.at(counts, at, 1)
        np.subtract.at(weights, at, [self.blocks_of(rid) for rid in gone])
        kept = counts > 0
        lengths, _, _, heaviest, cum_n, cum_b = self._sums(lengths[kept], counts[kept], weights[kept], heaviest[kept])
        return lengths, heaviest, cum_n, cum_b

    @staticmethod
    def _sums(lengths: np.ndarray, counts: np.ndarray, weights: np.ndarray, heaviest: np.ndarray):
        cum_n = np.concatenate(([0], np.cumsum(counts)))
        cum_b = np.concatenate(([0], np.cumsum(weights)))
        return lengths, counts, weights, heaviest, cum_n, cum_b

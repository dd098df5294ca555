"""Which KV blocks of a pool are free: the block accounting every engine shares.

No tensors here (and no torch): the torch engine's pools and the sim engine's counting pools
both hand out and take back block ids through this one allocator, so a double free or a leak is
caught the same way whatever holds the bytes.
"""
from __future__ import annotations

from engines.base import EngineError, OutOfKVBlocks


class KVAccountingError(EngineError):
    """A block was freed twice, freed without being allocated, or leaked (an engine bug)."""


class BlockAllocator:
    """Free list over block ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int, tier: str = "device"):
        if num_blocks <= 0:
            raise ValueError(f"a KV pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.tier = tier
        # Popped from the end, so low ids are handed out first (easier to read in a debugger).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def used(self) -> int:
        """Blocks handed out and not yet freed."""
        return len(self._used)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Hand out `n` blocks, or none at all if fewer than `n` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfKVBlocks(
                f"KV pool {self.tier!r} is out of blocks: {n} needed, {len(self._free)} of "
                f"{self.num_blocks} free; free finished requests or raise kv_blocks"
            )
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the pool; each must be allocated now, and appear once."""
        if len(set(blocks)) != len(blocks):
            raise KVAccountingError(f"KV pool {self.tier!r}: a block appears twice in one free call: {blocks}")
        bad = [b for b in blocks if b not in self._used]
        if bad:
            raise KVAccountingError(
                f"KV pool {self.tier!r}: blocks {bad} are not allocated (double free or foreign block id)"
            )
        self._used.difference_update(blocks)
        self._free.extend(reversed(blocks))

    def check_empty(self) -> None:
        """Raise if any block is still allocated (call when no request should hold KV)."""
        if self._used:
            raise KVAccountingError(f"KV pool {self.tier!r}: {len(self._used)} blocks leaked: {sorted(self._used)[:10]}")

"""The paged KV cache: one preallocated pool of fixed-size blocks per tier (device, host).

Two owners, kept apart: `BlockAllocator` knows which blocks exist and which are free;
`KVBlockPool` knows which request owns which blocks (its block table). `PagedKVCache` (a
device tier, read by the model) and `HostKVPool` (the host tier) hold the tensors, and every pool
reads and writes blocks in one common block-major layout (`gather`, `scatter`), so a copy between
any two pools is a gather from one and a scatter into the other.
Token t of a request lives in block `table[t // block_size]` at offset `t % block_size`.
"""
from __future__ import annotations

import abc

import torch

from engines.base import HOST, OutOfKVBlocks
from engines.block_allocator import BlockAllocator, KVAccountingError  # noqa: F401 (re-exported)


class KVBlockPool(abc.ABC):
    """The blocks of one KV tier and which request owns which of them (its block table).

    The tensor that holds the blocks, and its layout, belong to the subclasses: the device cache
    is laid out for the model, the host pool for copies.
    """

    kv: torch.Tensor

    def __init__(self, *, num_blocks: int, block_size: int, tier: str):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.tier = tier
        self.allocator = BlockAllocator(num_blocks, tier)
        self.tables: dict[str, list[int]] = {}
        self.held: list[list[int]] = []
        """Blocks of no request that a running copy may still touch: freed when it ends (KVTiers)."""

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def reserve(self, request_id: str, num_tokens: int) -> None:
        """Grow the request's block table so it can hold `num_tokens` tokens (all-or-nothing)."""
        table = self.tables.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > 0:
            try:
                table.extend(self.allocator.allocate(need))
            except OutOfKVBlocks:
                if not table:
                    del self.tables[request_id]
                raise

    def adopt(self, request_id: str, blocks: list[int]) -> None:
        """Make already-allocated `blocks` the request's table here (the target of a move)."""
        if request_id in self.tables:
            raise KVAccountingError(f"KV pool {self.tier!r}: request {request_id!r} already has a block table")
        self.tables[request_id] = blocks

    def release(self, request_id: str) -> None:
        """Free the request's blocks; an unknown id is a no-op."""
        table = self.tables.pop(request_id, None)
        if table:
            self.allocator.free(table)

    def hold(self, request_id: str) -> list[int] | None:
        """Take the request's blocks out of its table without freeing them (`free_held` does)."""
        table = self.tables.pop(request_id, None)
        if table:
            self.held.append(table)
        return table or None

    def free_held(self, blocks: list[int]) -> None:
        self.held = [b for b in self.held if b is not blocks]
        self.allocator.free(blocks)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @abc.abstractmethod
    def gather(self, blocks: list[int], device: torch.device) -> torch.Tensor:
        """Copy of these blocks on `device`, block-major: [n, num_layers, 2, block_size, kv_heads,
        head_dim]. Copies are queued on the current CUDA streams (non-blocking where they can be)."""

    @abc.abstractmethod
    def scatter(self, blocks: list[int], data: torch.Tensor) -> None:
        """Write block-major `data` (as `gather` returns it, on any device) into these blocks."""

    def check_consistency(self) -> None:
        """Raise if the block tables and the allocator disagree on how many blocks are held."""
        owned = [b for t in [*self.tables.values(), *self.held] for b in t]
        if len(owned) != self.allocator.used or len(set(owned)) != len(owned):
            raise KVAccountingError(
                f"KV pool {self.tier!r}: block tables and held blocks hold {len(owned)} blocks "
                f"({len(set(owned))} distinct) but the allocator counts {self.allocator.used} in use"
            )


class PagedKVCache(KVBlockPool):
    """The KV pool of one device, laid out for the model.

    Layout [num_layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim]: one block holds
    `block_size` consecutive tokens of one request for every layer, so a request's KV is found
    from its block table alone.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tier: str,
    ):
        super().__init__(num_blocks=num_blocks, block_size=block_size, tier=tier)
        # Zeroed, not empty: padded block-table entries read real blocks whose values are masked
        # out, and 0 * NaN from uninitialised memory would still poison the attention output.
        self.kv = torch.zeros(
            (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )

    @property
    def bytes_per_block(self) -> int:
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    def gather(self, blocks: list[int], device: torch.device) -> torch.Tensor:
        index = _block_index(blocks, self.kv.device)
        # Contiguous before it leaves the device, so the bus sees one run of bytes.
        staged = self.kv.index_select(2, index).movedim(2, 0).contiguous()
        return staged.to(device, non_blocking=True)

    def scatter(self, blocks: list[int], data: torch.Tensor) -> None:
        index = _block_index(blocks, self.kv.device)
        self.kv.index_copy_(2, index, data.to(self.kv.device, non_blocking=True).movedim(0, 2))

    def block_tables(self, request_ids: list[str], device: torch.device) -> torch.Tensor:
        """Block tables of these requests as [B, max_blocks], right-padded with block 0 (masked later)."""
        tables = [self.tables[r] for r in request_ids]
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.long, device=device)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V blocks of one layer, views [num_blocks, block_size, kv_heads, head_dim]."""
        return self.kv[layer, 0], self.kv[layer, 1]


class HostKVPool(KVBlockPool):
    """The host-memory tier: blocks a request's KV is offloaded to, never computed on.

    Layout [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]: each block is one
    contiguous run of bytes, so a block (or a run of adjacent blocks) crosses the bus in one copy.
    Pinned when the engine has a GPU, so those copies are asynchronous DMA.
    """

    def __init__(self, *, num_blocks: int, like: PagedKVCache, pin_memory: bool):
        super().__init__(num_blocks=num_blocks, block_size=like.block_size, tier=HOST)
        layers, _, _, block_size, heads, head_dim = like.kv.shape
        # Zeroed for the device cache's reason: a block's unused tail travels with it.
        self.kv = torch.zeros(
            (num_blocks, layers, 2, block_size, heads, head_dim), dtype=like.kv.dtype, device="cpu",
            pin_memory=pin_memory,
        )

    @property
    def bytes_per_block(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()

    def gather(self, blocks: list[int], device: torch.device) -> torch.Tensor:
        out = torch.empty((len(blocks),) + tuple(self.kv.shape[1:]), dtype=self.kv.dtype, device=device)
        for first, count, at in block_runs(blocks):  # one DMA per run of adjacent blocks
            out[at:at + count].copy_(self.kv[first:first + count], non_blocking=True)
        return out

    def scatter(self, blocks: list[int], data: torch.Tensor) -> None:
        for first, count, at in block_runs(blocks):
            self.kv[first:first + count].copy_(data[at:at + count], non_blocking=True)


def _block_index(blocks: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as a tensor on `device`. To a GPU by way of pinned memory: a plain copy would wait
    for the stream it is queued on, and a copy stream may be waiting on the model's kernels."""
    index = torch.tensor(blocks, dtype=torch.long)
    return index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index


def block_runs(blocks: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive block ids as (first block, count, offset in `blocks`)."""
    runs: list[tuple[int, int, int]] = []
    for offset, b in enumerate(blocks):
        if runs and runs[-1][0] + runs[-1][1] == b:
            first, count, at = runs[-1]
            runs[-1] = (first, count + 1, at)
        else:
            runs.append((b, 1, offset))
    return runs

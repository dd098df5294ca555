"""Block copies between the device cache and the host pool, off the compute path.

On CUDA the copies run on a dedicated stream (pinned host memory, so they are real DMA that
overlaps the model's kernels) and a CUDA event marks each transfer's end. On CPU one worker
thread does them, so `move` returns at once there too. Either way the caller gets a
`PendingCopy` to poll or wait on; which request owns which block stays the engine's business.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from engines.torch.kv_cache import HostKVPool, PagedKVCache


class PendingCopy:
    """One started copy: `done()` without blocking, `wait()` until it has finished."""

    def __init__(self, future: Future | None = None, event: torch.cuda.Event | None = None,
                 keep_alive: tuple = ()):
        self._future = future
        self._event = event
        # Staging tensors the copy stream still reads or writes; dropped when the copy ends.
        self._keep_alive = keep_alive

    def done(self) -> bool:
        if self._future is not None:
            return self._future.done()
        return self._event.query()

    def wait(self) -> None:
        """Block until the copy has finished; re-raises the copy's own failure, if any."""
        if self._future is not None:
            self._future.result()
        else:
            self._event.synchronize()
        self._keep_alive = ()


def _runs(blocks: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive block ids as (first block, count, offset in `blocks`)."""
    runs: list[tuple[int, int, int]] = []
    for offset, b in enumerate(blocks):
        if runs and runs[-1][0] + runs[-1][1] == b:
            first, count, at = runs[-1]
            runs[-1] = (first, count + 1, at)
        else:
            runs.append((b, 1, offset))
    return runs


class BlockCopier:
    """Copies KV blocks between one device cache and the host pool, asynchronously."""

    def __init__(self, cache: PagedKVCache, host: HostKVPool):
        self.cache = cache
        self.host = host
        self.device = cache.kv.device
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._worker = None
        else:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="kv-copy")

    def start(self, device_blocks: list[int], host_blocks: list[int], to_host: bool) -> PendingCopy:
        """Copy device_blocks[i] <-> host_blocks[i] for every i; to_host picks the direction."""
        if len(device_blocks) != len(host_blocks):
            raise ValueError(f"{len(device_blocks)} device blocks but {len(host_blocks)} host blocks")
        if self._worker is not None:
            return PendingCopy(future=self._worker.submit(self._copy_on_cpu, device_blocks, host_blocks, to_host))
        return self._start_on_stream(device_blocks, host_blocks, to_host)

    @torch.no_grad()
    def _copy_on_cpu(self, device_blocks: list[int], host_blocks: list[int], to_host: bool) -> None:
        dev_index = torch.tensor(device_blocks, dtype=torch.long)
        host_index = torch.tensor(host_blocks, dtype=torch.long)
        if to_host:
            self.host.kv.index_copy_(0, host_index, self.cache.kv.index_select(2, dev_index).movedim(2, 0))
        else:
            self.cache.kv.index_copy_(2, dev_index, self.host.kv.index_select(0, host_index).movedim(0, 2))

    @torch.no_grad()
    def _start_on_stream(self, device_blocks: list[int], host_blocks: list[int], to_host: bool) -> PendingCopy:
        stream = self._stream
        # The KV being copied out was written by kernels queued on the compute stream.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            dev_index = torch.tensor(device_blocks, dtype=torch.long, device=self.device)
            if to_host:
                # Gather into one block-major buffer on the GPU, then one DMA per run of host blocks.
                staged = self.cache.kv.index_select(2, dev_index).movedim(2, 0).contiguous()
                for first, count, at in _runs(host_blocks):
                    self.host.kv[first:first + count].copy_(staged[at:at + count], non_blocking=True)
            else:
                staged = torch.empty((len(host_blocks),) + tuple(self.host.kv.shape[1:]),
                                     dtype=self.host.kv.dtype, device=self.device)
                for first, count, at in _runs(host_blocks):
                    staged[at:at + count].copy_(self.host.kv[first:first + count], non_blocking=True)
                self.cache.kv.index_copy_(2, dev_index, staged.movedim(0, 2))
            event = torch.cuda.Event()
            event.record(stream)
        return PendingCopy(event=event, keep_alive=(staged, dev_index))

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        else:
            self._stream.synchronize()

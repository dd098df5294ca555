"""Block copies between any two KV pools (device caches, the host pool), off the compute path.

A copy is a `gather` from the source pool and a `scatter` into the destination (see kv_cache).
When a GPU is involved both run on per-device copy streams (the host pool is pinned, so its side
is real DMA that overlaps the model's kernels) and a CUDA event marks the transfer's end; a copy
between two CPU pools runs on one worker thread, so `move` returns at once there too. Either way
the caller gets a `PendingCopy` to poll or wait on; which request owns which block stays the
engine's business.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import ExitStack
from functools import partial
from typing import Callable

import torch

from engines.torch.cpu_threads import release_thread_pool
from engines.torch.kv_cache import KVBlockPool


class PendingCopy:
    """One started copy: `done()` without blocking, `wait()` until it has finished."""

    def __init__(self, future: Future | None = None, event: torch.cuda.Event | None = None,
                 keep_alive: tuple = (), then: Callable[[], None] | None = None, injected: str | None = None):
        self._future = future
        self._event = event
        # Staging tensors the copy streams still read or write; dropped when the copy ends.
        self._keep_alive = keep_alive
        # Host-side last step (a scatter into an unpinned CPU pool) that must wait for the event.
        self._then = then
        self.injected = injected
        """The fault this copy carries on purpose ("error", "hang"; see BlockCopier.inject), or None."""

    def done(self) -> bool:
        """True once the bytes have arrived (a pending host-side step runs in `wait`)."""
        if self._future is not None:
            return self._future.done()
        return self._event.query()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the copy has finished; re-raises the copy's own failure, if any. With
        `timeout` (seconds), TimeoutError if it has not finished by then (it goes on)."""
        if timeout is not None and not self._finished_within(timeout):
            raise TimeoutError(f"the copy did not finish within {timeout:g}s")
        try:
            if self._future is not None:
                self._future.result()
            else:
                self._event.synchronize()
                if self._then is not None:
                    self._then()
        finally:
            self._keep_alive, self._then = (), None

    def _finished_within(self, timeout: float) -> bool:
        if self._future is not None:
            return bool(wait_futures([self._future], timeout).done)
        deadline = time.monotonic() + timeout
        while not self._event.query():  # a CUDA event has no timed wait
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0002)
        return True


class BlockCopier:
    """Copies KV blocks between any two pools of one engine, asynchronously."""

    def __init__(self) -> None:
        # Threads start on first use, so a GPU-only engine never runs one.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kv-copy")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._injected: list[tuple[str, float]] = []
        self._lock = threading.Lock()

    def inject(self, fault: str, hang_s: float = 0.0) -> None:
        """Fault injection (engines/faults.py): the next copy started fails ("error": reported
        failed at once, nothing copied) or hangs ("hang": nothing copied, and it reports a failure
        only after `hang_s` seconds, as a stuck DMA would, without holding up the copies behind it)."""
        if fault not in ("error", "hang"):
            raise ValueError(f"unknown copy fault {fault!r}; use 'error' or 'hang'")
        with self._lock:
            self._injected.append((fault, hang_s))

    def start(self, src: KVBlockPool, src_blocks: list[int], dst: KVBlockPool, dst_blocks: list[int]) -> PendingCopy:
        """Copy src_blocks[i] of `src` into dst_blocks[i] of `dst` for every i."""
        if len(src_blocks) != len(dst_blocks):
            raise ValueError(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
        with self._lock:
            injected = self._injected.pop(0) if self._injected else None
        if injected is not None:
            return self._faulty(*injected)
        if src.device.type != "cuda" and dst.device.type != "cuda":
            return PendingCopy(future=self._worker.submit(self._copy_on_cpu, src, src_blocks, dst, dst_blocks))
        return self._start_on_streams(src, src_blocks, dst, dst_blocks)

    @staticmethod
    def _faulty(fault: str, hang_s: float) -> PendingCopy:
        future: Future = Future()
        message = f"injected copy {'failure' if fault == 'error' else f'hang of {hang_s:g}s'}"
        if fault == "error":
            future.set_exception(RuntimeError(message))
        else:
            timer = threading.Timer(hang_s, lambda: future.set_exception(RuntimeError(message)))
            timer.daemon = True
            timer.start()
        return PendingCopy(future=future, injected=fault)

    @staticmethod
    @torch.no_grad()
    def _copy_on_cpu(src: KVBlockPool, src_blocks: list[int], dst: KVBlockPool, dst_blocks: list[int]) -> None:
        try:
            dst.scatter(dst_blocks, src.gather(src_blocks, dst.device))
        finally:
            # The copy ran on this worker's own OpenMP pool; left idle, it slows every parallel
            # region of the run loop's steps (cpu_threads.py): a 32-row decode step of SmolLM2
            # under the aligned policy took 86 ms against fcfs's 65 ms until this was released.
            release_thread_pool()

    @torch.no_grad()
    def _start_on_streams(self, src: KVBlockPool, src_blocks: list[int], dst: KVBlockPool,
                          dst_blocks: list[int]) -> PendingCopy:
        gpus = list(dict.fromkeys(p.device for p in (src, dst) if p.device.type == "cuda"))
        with ExitStack() as streams:
            for gpu in gpus:
                stream = self._stream(gpu)
                # The source KV was written, and the destination blocks last read, by kernels
                # queued on the compute stream; the copy must come after them.
                stream.wait_stream(torch.cuda.current_stream(gpu))
                streams.enter_context(torch.cuda.stream(stream))
            if dst.device.type == "cuda" or dst.kv.is_pinned():
                # Straight into the destination: a GPU scatter on its copy stream, or DMA into
                # the runs of the pinned host pool. Across GPUs, `.to` runs on the source's copy
                # stream and makes the destination's copy stream wait for it.
                data = src.gather(src_blocks, dst.device if dst.device.type == "cuda" else src.device)
                dst.scatter(dst_blocks, data)
                then = None
            else:
                # An unpinned CPU cache: the bytes land in pinned memory, and the CPU scatter has
                # to wait until they are there.
                data = src.gather(src_blocks, torch.device("cpu"))
                then = partial(dst.scatter, dst_blocks, data)
            event = torch.cuda.Event()
            event.record(self._stream(gpus[-1]))  # the last stream to touch the bytes
        return PendingCopy(event=event, keep_alive=(data,), then=then)

    def _stream(self, gpu: torch.device) -> torch.cuda.Stream:
        if gpu not in self._streams:
            self._streams[gpu] = torch.cuda.Stream(gpu)
        return self._streams[gpu]

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        for stream in self._streams.values():
            stream.synchronize()

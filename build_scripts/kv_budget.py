"""How much memory the KV pools get when `make build-engine` is not told (no --kv-memory-gb).

The pools follow the model (bytes of KV per token, the longest request) and the machine the
engine is built on (the memory available there now), whichever is smaller:

- on a GPU (CUDA visible to the build): the device pool takes what is left of
  GPU_MEMORY_FRACTION of the first GPU's free memory once the weights are in, as vLLM's
  gpu_memory_utilization does, but never more than two full batches of the longest requests
  (BATCH_SEQUENCES: a running and a staged batch of 64);
- on a CPU: CPU_SEQUENCES requests of the longest length, but never more than CPU_MEMORY_FRACTION
  of the available RAM: a CPU decodes a few requests at a time, and every pool is resident;
- the host pool (parked requests): HOST_KV_FACTOR times the device pool, but never more than
  HOST_MEMORY_FRACTION of the available RAM.

The engine allocates its pools when it loads, so this is what the server holds; the build says
which bound applied, and `make serve` says what was reserved. A machine with a different amount of
memory than the build machine wants `--kv-memory-gb` (or ALIGNED_KV_BLOCKS when serving).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 2**30
GPU_MEMORY_FRACTION = 0.9
BATCH_SEQUENCES = 128
CPU_SEQUENCES = 2
CPU_MEMORY_FRACTION = 0.1
HOST_KV_FACTOR = 2
HOST_MEMORY_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class KVBudget:
    """Bytes for the device pool and the host pool, and why."""

    device_bytes: int
    host_bytes: int
    reason: str
    """One line: what bounded each pool."""


def available_ram() -> int:
    """Bytes of RAM available to a new process now (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_gpu_memory() -> int | None:
    """Free bytes on the first CUDA GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(0)
    return free


def default_budget(bytes_per_token: int, max_seq_len: int, weight_bytes: int,
                   gpu_free: int | None = None, ram: int | None = None) -> KVBudget:
    """The pools for a model with `bytes_per_token` of KV, requests of up to `max_seq_len` tokens
    and `weight_bytes` of weights, on this machine (or on the given gpu_free / ram)."""
    ram = available_ram() if ram is None else ram
    request = bytes_per_token * max_seq_len
    if gpu_free is not None:
        cap, room = BATCH_SEQUENCES * request, int(GPU_MEMORY_FRACTION * gpu_free) - weight_bytes
        where = (f"{BATCH_SEQUENCES} requests of {max_seq_len} tokens" if cap <= room
                 else f"{GPU_MEMORY_FRACTION:.0%} of the GPU's {gpu_free / GIB:.1f} GiB free, less the weights")
    else:
        cap, room = CPU_SEQUENCES * request, int(CPU_MEMORY_FRACTION * ram)
        where = (f"{CPU_SEQUENCES} requests of {max_seq_len} tokens on a CPU" if cap <= room
                 else f"{CPU_MEMORY_FRACTION:.0%} of the {ram / GIB:.1f} GiB of RAM available")
    device = max(min(cap, room), 0)
    host_room = int(HOST_MEMORY_FRACTION * ram)
    host = min(HOST_KV_FACTOR * device, host_room)
    host_where = (f"{HOST_KV_FACTOR}x the device pool" if HOST_KV_FACTOR * device <= host_room
                  else f"{HOST_MEMORY_FRACTION:.0%} of the {ram / GIB:.1f} GiB of RAM available")
    return KVBudget(device, host, f"device pool: {where}; host pool: {host_where}")

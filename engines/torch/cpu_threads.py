"""The OpenMP thread pool of a thread that will not run the engine's steps.

torch's CPU ops run on OpenMP (libgomp in the PyPI wheels), and every thread that starts a
parallel region gets a pool of its own. The server loads the engine on one thread and runs its
steps on another (the orchestrator's run loop), so the loading thread's idle workers stay
behind. libgomp then counts more threads than CPUs and stops spinning between parallel regions
(its "throttled" spin count), so every region of a step waits for a sleeping worker to wake: on
this project's 2-core CPU a decode step of SmolLM2-135M took 50-55 ms on the run loop's thread
against 35 ms on the thread that loaded the model, and 35 ms on both once the loading thread's
pool was released (docs/benchmarks.md, "CPU threads"). Releasing a pool is harmless: the next
parallel region on that thread makes a new one.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
"""omp_pause_soft (OpenMP 5.0): free the threads, keep the settings."""
_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (torch's), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(_RUNTIMES):
            try:
                return ctypes.CDLL(path)  # already loaded: the same library, not a second copy
            except OSError:
                continue
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's idle OpenMP worker threads; True if a runtime did it.

    Call it on a thread that has run torch ops (loading a model) and hands the steps to another.
    """
    runtime = _openmp_runtime()
    pause = getattr(runtime, "omp_pause_resource_all", None) if runtime is not None else None
    if pause is None:
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    rc = pause(OMP_PAUSE_SOFT)
    if rc != 0:  # e.g. called inside a parallel region
        log.debug("omp_pause_resource_all returned %d", rc)
    return rc == 0

"""The loading thread's OpenMP pool is released, so the run loop's thread team is the only one
(engines/torch/cpu_threads.py: with two pools libgomp stops spinning and every step slows)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_release_frees_the_calling_threads_workers():
    out = run("""
        import os, time, torch
        from engines.torch.cpu_threads import release_thread_pool
        tasks = lambda: len(os.listdir("/proc/self/task"))
        torch.set_num_threads(2)
        before = tasks()
        torch.randn(512, 512) @ torch.randn(512, 512)   # a parallel region: the pool's worker starts
        with_pool = tasks()
        released = release_thread_pool()
        deadline = time.monotonic() + 10  # the worker exits on its own schedule (a loaded CPU: later)
        while tasks() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        print(before, with_pool, tasks(), released)
        torch.randn(512, 512) @ torch.randn(512, 512)   # the next region makes a new pool
        print(tasks())
    """)
    first, second = out.splitlines()
    before, with_pool, after, released = first.split()
    assert released == "True"
    assert int(with_pool) == int(before) + 1, out  # one worker beside the calling thread
    assert int(after) == int(before), out
    assert int(second) == int(with_pool), out


def test_engine_leaves_no_pool_on_the_loading_thread(demo_engine_dir):
    out = run(f"""
        import os, threading, time, torch
        torch.set_num_threads(2)
        from engines.torch.engine import TorchEngine
        tasks = lambda: len(os.listdir("/proc/self/task"))
        before = tasks()
        engine = TorchEngine({str(demo_engine_dir)!r}, device="cpu", kv_blocks=64)
        deadline = time.monotonic() + 10  # a released worker exits on its own schedule
        while tasks() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        print(before, tasks())
    """)
    before, after = out.split()
    assert int(after) == int(before), out  # the loading thread's worker is gone


def test_cpu_block_copies_leave_no_pool_on_the_copy_thread():
    # The copy worker runs torch ops on its own thread (engines/torch/kv_transfer.py); its pool,
    # left idle, slowed the aligned policy's decode steps by ~30% (docs/benchmarks.md).
    out = run("""
        import os, time, torch
        torch.set_num_threads(2)
        from engines.torch.kv_cache import HostKVPool, PagedKVCache
        from engines.torch.kv_transfer import BlockCopier
        tasks = lambda: len(os.listdir("/proc/self/task"))
        device = PagedKVCache(num_layers=4, num_blocks=256, block_size=16, num_kv_heads=4, head_dim=64,
                              dtype=torch.float32, device=torch.device("cpu"), tier="cpu")
        device.kv.normal_()
        host = HostKVPool(num_blocks=256, like=device, pin_memory=False)
        copier = BlockCopier()
        copier.start(device, [0], host, [0]).wait()  # the worker thread exists from here on
        before = tasks()
        blocks = list(range(200))
        copier.start(device, blocks, host, blocks).wait()  # large enough for parallel regions
        deadline = time.monotonic() + 10  # a released worker exits on its own schedule
        while tasks() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        after = tasks()
        assert torch.equal(host.kv[:200].movedim(0, 2), device.kv[:, :, :200])
        print(before, after)
    """)
    before, after = out.split()
    assert int(after) == int(before), out  # no OpenMP worker left behind by the copy

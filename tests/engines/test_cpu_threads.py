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
        import os, torch
        from engines.torch.cpu_threads import release_thread_pool
        tasks = lambda: len(os.listdir("/proc/self/task"))
        torch.set_num_threads(2)
        before = tasks()
        torch.randn(512, 512) @ torch.randn(512, 512)   # a parallel region: the pool's worker starts
        with_pool = tasks()
        released = release_thread_pool()
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
        import os, threading, torch
        torch.set_num_threads(2)
        from engines.torch.engine import TorchEngine
        tasks = lambda: len(os.listdir("/proc/self/task"))
        before = tasks()
        engine = TorchEngine({str(demo_engine_dir)!r}, device="cpu", kv_blocks=64)
        print(before, tasks())
    """)
    before, after = out.split()
    assert int(after) == int(before), out  # the loading thread's worker is gone

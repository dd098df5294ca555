"""What the machine was doing during a run: load averages, and the CPU time that processes other
than the benchmark's own took (another engineer's job on the same two cores disturbs a run;
the load average alone cannot tell that from the benchmark's own load).
"""
from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds spent busy on all cores since boot, seconds stolen by the hypervisor)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / TICK, steal / TICK


def process_seconds(pid: int) -> float:
    """CPU seconds of `pid` and of its children it has waited for; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / TICK  # utime, stime, cutime, cstime


@dataclass
class CpuWatch:
    """CPU seconds on the machine between `start` and `stop`, split into the benchmark's own
    (the server's processes, the client, this process) and everybody else's."""

    pids: list[int]
    """The server's processes, read at the start and again at the end."""
    wall: float = 0.0
    busy: float = 0.0
    steal: float = 0.0
    seen: dict | None = None
    children: float = 0.0
    me: float = 0.0

    def start(self) -> "CpuWatch":
        self.wall = time.monotonic()
        self.busy, self.steal = busy_seconds()
        self.seen = {p: process_seconds(p) for p in self.pids}
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.children = usage.ru_utime + usage.ru_stime
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.me = usage.ru_utime + usage.ru_stime
        return self

    def stop(self, pids: list[int]) -> dict:
        """The figures since `start`; `pids`: the server's processes now (new ones count whole)."""
        wall = time.monotonic() - self.wall
        busy, steal = busy_seconds()
        server = sum(max(process_seconds(p) - self.seen.get(p, 0.0), 0.0) for p in set(pids) | set(self.seen))
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = usage.ru_utime + usage.ru_stime - self.children
        usage = resource.getrusage(resource.RUSAGE_SELF)
        me = usage.ru_utime + usage.ru_stime - self.me
        total = busy - self.busy
        foreign = max(total - server - client - me, 0.0)
        per = max(wall, 1e-9)
        return {"wall_s": round(wall, 1), "busy_cores": round(total / per, 2), "server_cores": round(server / per, 2),
                "client_cores": round((client + me) / per, 2), "foreign_cores": round(foreign / per, 2),
                "steal_cores": round((steal - self.steal) / per, 2)}


def describe() -> dict:
    """The machine, as the results record it."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError):
        mem_gib = 0.0
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_gib, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def wait_until_quiet(pids: list[int], max_foreign: float, max_wait: float, window: float = 5.0) -> dict:
    """Wait (at most `max_wait` s) until, over `window` s, processes other than `pids` (an idle
    server) and this one take at most `max_foreign` cores. Returns how long it waited and the
    last window's figures."""
    start = time.monotonic()
    while True:
        watch = CpuWatch(pids).start()
        time.sleep(window)
        cpu = watch.stop(pids)
        waited = time.monotonic() - start
        if cpu["foreign_cores"] <= max_foreign or waited >= max_wait:
            return {"waited_s": round(waited, 1), "quiet": cpu["foreign_cores"] <= max_foreign,
                    "foreign_cores": cpu["foreign_cores"]}

"""The server's processes and its ports: die with the launcher, start only on free ports, and
call a server ready only when the port that answers is this server's.

Linux only, as the rest of the serving path (tritonserver's Python backend): parent-death
signals come from prctl(2), port owners from /proc/net/tcp and /proc/<pid>/fd.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import socket
from typing import Callable, Iterable, Mapping

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when its parent dies (any way, SIGKILL too).
    If the parent is already gone (this process was reparented), send it now."""
    parent = os.getppid()
    if _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)


def dies_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets `sig` when the thread that started it
    exits (prctl's parent-death signal follows the creating thread: start servers from the main
    thread)."""
    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return preexec


def ports_in_use(host: str, ports: Mapping[str, int]) -> list[str]:
    """"NAME port N" for each port (name -> number, 0 = off) that cannot be bound on `host` now."""
    busy = []
    for name, port in ports.items():
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                busy.append(f"{name} port {port}")
    return busy


def listening_inodes(port: int) -> set[int]:
    """Socket inodes listening on TCP `port` (any address), from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.add(inode)
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants, from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(d)] = int(fields[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        tree += frontier
    return tree


def port_owned_by(port: int, pids: Iterable[int]) -> bool:
    """Whether one of `pids` holds a socket listening on `port`."""
    wanted = {f"socket:[{i}]" for i in listening_inodes(port)}
    if not wanted:
        return False
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return True
            except OSError:
                continue
    return False


def model_processes(pids: Iterable[int]) -> dict[int, str]:
    """The Triton Python-backend stubs among `pids`: pid -> model instance ("aligned_llm_0_0")."""
    found = {}
    for pid in pids:
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub"):
            # ... <model>_<instance>_<device> DEFAULT: the instance name Triton logs
            names = [a.decode() for a in argv[1:] if re.fullmatch(rb"\w+_\d+_\d+", a)]
            found[pid] = names[-1] if names else "?"
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False

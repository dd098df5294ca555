"""A soak of a real server (`make soak`): concurrent streams over Triton gRPC, Triton HTTP
generate_stream and the OpenAI API, mixed lengths, greedy and seeded sampling, ~20% cancelled by
the client at a random point, ~5% bad requests, faults injected on a schedule if asked. Every
stream is checked against the same request sent alone; at the end the server must hold no request
and no KV block, and nothing may be lost, duplicated, late or mismatched.

    python -m bench.soak --engine-dir engines_built/smollm2-f32 --duration 600 --concurrency 64 [--faults]
    python -m bench.soak --port 8000 --token $ALIGNED_ADMIN_TOKEN ...   # a running `make serve`

It starts the server itself (the launcher on free loopback ports, ALIGNED_ADMIN_TOKEN set, and
ALIGNED_FAULT_INJECTION=1 with --faults) and stops it by process group at the end; or, with
--port, it attaches to a running one (its admin token for the fault and policy actions). Writes
summary.json and summary.md to --out; exits 1 when an invariant broke.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import secrets
import shlex
import sys
from pathlib import Path

from bench.soak.report import markdown, summary, write
from bench.soak.runner import Options, Soak
from bench.soak.server import Endpoints, launch


def parse(argv: list[str] | None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", type=Path, default=Path("engines_built/smollm2-f32"),
                   help="engine to serve (a server started by the soak)")
    p.add_argument("--port", type=int, default=0,
                   help="attach to a running server whose Triton HTTP port this is (gRPC +1, admin +3, OpenAI +4) "
                        "instead of starting one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--token", default=os.environ.get("ALIGNED_ADMIN_TOKEN", ""),
                   help="the attached server's admin token (default $ALIGNED_ADMIN_TOKEN)")
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds of load (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="streams open at once (default %(default)s)")
    p.add_argument("--specs", type=int, default=d.specs, help="distinct requests, each with its reference (default %(default)s)")
    p.add_argument("--max-output", type=int, default=d.max_output, help="longest max_tokens (default %(default)s)")
    p.add_argument("--cancel-fraction", type=float, default=d.cancel_fraction)
    p.add_argument("--bad-fraction", type=float, default=d.bad_fraction)
    p.add_argument("--deadline", type=float, default=d.deadline_s,
                   help="seconds a stream may take before it counts as lost (default %(default)s)")
    p.add_argument("--faults", action="store_true", help="inject faults through the admin fault API on a schedule")
    p.add_argument("--fault-interval", type=float, default=d.fault_interval_s,
                   help="seconds between two faults (default: a twelfth of the duration, at least 5)")
    p.add_argument("--parking-policy", default=d.parking_policy,
                   help="policy run in the middle third with --faults, so KV-move faults can fire ('' for none)")
    p.add_argument("--settle", type=float, default=d.settle_s, help="seconds the server gets to free everything")
    p.add_argument("--progress", type=float, default=d.progress_s, help="seconds between progress lines")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=Path("bench/results/soak"), help="where summary.json/.md go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    opts = Options(duration_s=a.duration, concurrency=a.concurrency, specs=a.specs, max_output=a.max_output,
                   cancel_fraction=a.cancel_fraction, bad_fraction=a.bad_fraction, deadline_s=a.deadline,
                   faults=a.faults, fault_interval_s=a.fault_interval, parking_policy=a.parking_policy,
                   settle_s=a.settle, progress_s=a.progress, seed=a.seed)
    server = None
    if a.port:
        ends, engine = Endpoints.on_port(a.port, a.token, a.host), f"a running server on port {a.port}"
    else:
        if not (a.engine_dir / "manifest.json").is_file():
            print(f"error: no engine in {a.engine_dir} (no manifest.json); build one with make build-engine, "
                  f"or give --engine-dir", file=sys.stderr)
            return 2
        token = secrets.token_hex(16)
        print(f"starting a server for {a.engine_dir} (log {a.out / 'server.log'}) ...", flush=True)
        server, ends = launch(a.engine_dir, a.out / "server.log", token, faults=a.faults)
        engine = str(a.engine_dir)
    try:
        soak = Soak(ends, opts, say=lambda line: print(line, flush=True))
        state = soak.run()
    finally:
        if server is not None:
            killed = server.stop()
            if killed:
                print(f"warning: had to SIGKILL {killed} after SIGTERM", flush=True)
    meta = {"command": shlex.join(["python", "-m", "bench.soak", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": _machine(), "engine": engine}
    s = summary(soak, state, meta)
    js, md = write(s, a.out)
    print(markdown(s))
    print(f"written {js} and {md}")
    return 0 if s["passed"] else 1


def _machine() -> str:
    model = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {model}"


if __name__ == "__main__":
    sys.exit(main())

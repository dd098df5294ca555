"""One soak: references first, then the load, the fault schedule and the progress line, then
the settled server's state and the verdict.

    references   each distinct request sent alone, one at a time (before any fault is armed)
    load         `concurrency` workers, a third on each protocol, each sending one stream after
                 another until `duration_s` has passed; every stream judged as it ends
    faults       (optional) one fault armed every `fault_interval_s`, by kind in turn; the kinds
                 that need KV moves to the host pool are armed while the server runs a policy
                 that parks (`aligned`, switched to for the middle third of the run)
    settle       the load stopped, wait until the server holds no request and no KV block
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

import httpx

from bench.soak.checks import PROBLEMS, Reference, Tally, judge
from bench.soak.clients import GrpcClient, http_run, openai_run
from bench.soak.server import Admin, Endpoints, blocks_held, in_flight
from bench.soak.workload import PROTOCOLS, Job, JobDraw, Spec, make_specs

STEP_KINDS = ("decode_error", "prefill_error")
"""Faults any policy meets."""
MOVE_KINDS = ("copy_error", "copy_hang", "host_full")
"""Faults that fire only on a KV move between tiers: a policy that parks."""


@dataclass
class Options:
    """What `python -m bench.soak` was asked for (see its --help)."""

    duration_s: float = 600
    concurrency: int = 64
    specs: int = 18
    max_output: int = 128
    cancel_fraction: float = 0.2
    bad_fraction: float = 0.05
    deadline_s: float = 600
    faults: bool = False
    fault_interval_s: float = 0
    """0: a twelfth of the duration, at least 5 s."""
    parking_policy: str = "aligned"
    settle_s: float = 60
    progress_s: float = 10
    seed: int = 0


@dataclass
class FaultLog:
    available: bool | None = None
    armed: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    fired: dict[str, int] = field(default_factory=dict)
    left_armed: dict[str, int] = field(default_factory=dict)
    policy_switches: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, ends: Endpoints, opts: Options, say=print):
        self.ends, self.opts, self.say = ends, opts, say
        self.admin = Admin(ends)
        self.tally = Tally()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.faults = FaultLog()
        self.references: dict[int, Reference] = {}
        self.in_flight = 0

    # ---- references ---------------------------------------------------------------------------

    def prepare(self) -> list[Spec]:
        config = self.admin.config()
        self.max_seq_len = int(config["max_seq_len"])
        self.start_policy = config.get("policy", "adaptive")
        with httpx.Client(timeout=30) as h:
            self.model = h.get(self.ends.openai + "/models").json()["data"][0]["id"]
        specs = make_specs(self.opts.specs, self.max_seq_len, self.opts.max_output, self.opts.seed)
        t0 = time.monotonic()
        grpc = GrpcClient(self.ends.grpc)
        out = []
        said = t0
        with httpx.Client() as h:
            for n, spec in enumerate(specs):
                if time.monotonic() - said >= self.opts.progress_s:
                    said = time.monotonic()
                    self.say(f"references: {n}/{len(specs)} in {said - t0:.0f} s")
                rec = self._reference(spec, grpc, h)
                if spec.chat and rec.status == 400 and "chat_template" in (rec.error or ""):
                    spec = replace(spec, chat=False)  # a model without a chat template: completions
                    rec = self._reference(spec, grpc, h)
                if rec.end != "final" or rec.error:
                    raise RuntimeError(f"the reference of {spec.label} failed: {rec.end}, {rec.error}")
                self.references[spec.id] = Reference(tuple(rec.tokens), rec.finish_reason, rec.usage_tokens)
                out.append(spec)
        grpc.close()
        self.references_s = time.monotonic() - t0
        n_tokens = sum(len(r.tokens) for r in self.references.values())
        self.say(f"references: {len(out)} distinct requests sent alone in {self.references_s:.1f} s ({n_tokens} pieces)")
        return out

    def _reference(self, spec: Spec, grpc: GrpcClient, h: httpx.Client):
        job = Job("openai" if spec.api == "openai" else "grpc", spec)
        if spec.api == "openai":
            return openai_run(h, self.ends.openai, self.model, job, self.opts.deadline_s)
        return grpc.run(job, self.opts.deadline_s)

    # ---- load ---------------------------------------------------------------------------------

    def run(self) -> dict:
        specs = self.prepare()
        lengths = {s.id: len(self.references[s.id].tokens) for s in specs}
        self.draw = JobDraw(specs, lengths, self.max_seq_len, self.opts.cancel_fraction, self.opts.bad_fraction,
                            self.opts.seed)
        self.totals_before = self.admin.state()["totals"]
        self.t0 = time.monotonic()
        self.until = self.t0 + self.opts.duration_s
        workers = [threading.Thread(target=self._worker, args=(i,), daemon=True, name=f"soak-{i}")
                   for i in range(self.opts.concurrency)]
        helpers = [threading.Thread(target=self._progress, daemon=True)]
        if self.opts.faults:
            helpers.append(threading.Thread(target=self._fault_schedule, daemon=True))
        for t in workers + helpers:
            t.start()
        for t in workers:
            t.join()
        self.load_s = time.monotonic() - self.t0
        self.stop.set()
        for t in helpers:
            t.join()
        self._line()
        return self.settle()

    def _worker(self, i: int) -> None:
        protocol = PROTOCOLS[i % len(PROTOCOLS)]
        rng = self.draw.rng(i)
        grpc = GrpcClient(self.ends.grpc) if protocol == "grpc" else None
        h = httpx.Client(limits=httpx.Limits(max_connections=1)) if protocol != "grpc" else None
        try:
            while time.monotonic() < self.until:
                job = self.draw.next(protocol, rng)
                with self.lock:
                    self.in_flight += 1
                if protocol == "grpc":
                    rec = grpc.run(job, self.opts.deadline_s)
                elif protocol == "http":
                    rec = http_run(h, self.ends.http, job, self.opts.deadline_s)
                else:
                    rec = openai_run(h, self.ends.openai, self.model, job, self.opts.deadline_s)
                verdict = judge(rec, self.references.get(job.spec.id))
                with self.lock:
                    self.in_flight -= 1
                    self.tally.add(rec, verdict)
        finally:
            if grpc is not None:
                grpc.finish(grace_s=1.0)
            if h is not None:
                h.close()

    def _progress(self) -> None:
        while not self.stop.wait(self.opts.progress_s):
            if self.faults.available:
                try:
                    self.faults.fired = dict((self.admin.faults() or {}).get("fired", {}))
                except Exception:  # a progress line is not worth ending the soak for
                    pass
            self._line()

    def _line(self) -> None:
        t = self.tally
        with self.lock:
            elapsed = time.monotonic() - self.t0
            v = {k: t.count(k) for k in ("completed", "cancelled", "refused", "fault", "overloaded")}
            p = {k: t.count(k) for k in PROBLEMS}
            n, tokens, busy = t.total, t.tokens, self.in_flight
        problems = " ".join(f"{k} {p[k]}" for k in PROBLEMS)
        fired = sum(self.faults.fired.values())
        self.say(f"[{elapsed:5.0f}/{self.opts.duration_s:.0f} s] {n} streams: {v['completed']} completed, "
                 f"{v['cancelled']} cancelled, {v['refused']} refused, {v['fault']} failed by faults "
                 f"({fired} fired) | {problems} | {busy} open | {tokens / max(elapsed, 1e-9):.0f} tok/s")

    # ---- faults -------------------------------------------------------------------------------

    def _fault_schedule(self) -> None:
        api = self.admin.faults()
        self.faults.available = api is not None and api.get("enabled", False)
        if api is None:
            self.say("faults: this server has no fault API (GET /api/faults 404); the soak runs without faults")
            return
        if not api.get("enabled"):
            self.say("faults: the server's fault API is off (start it with ALIGNED_FAULT_INJECTION=1); no faults")
            return
        kinds = set(api.get("kinds") or STEP_KINDS + MOVE_KINDS)
        interval = self.opts.fault_interval_s or max(5.0, self.opts.duration_s / 12)
        window = (self.t0 + self.opts.duration_s / 3, self.t0 + 2 * self.opts.duration_s / 3)
        parking = self.opts.parking_policy and any(k in kinds for k in MOVE_KINDS)
        step_turn = move_turn = 0
        switched = False
        while not self.stop.wait(interval):
            now = time.monotonic()
            if parking and not switched and window[0] <= now < window[1]:
                switched = self._switch(self.opts.parking_policy)
            if switched and now >= window[1] and self._switch(self.start_policy):
                switched = False
            if switched:
                kind = (MOVE_KINDS + ("decode_error",))[move_turn % 4]
                move_turn += 1
            else:
                kind = STEP_KINDS[step_turn % 2]
                step_turn += 1
            if kind not in kinds:
                continue
            ok, detail = self.admin.arm(kind, 1)
            if ok:
                self.faults.armed[kind] = self.faults.armed.get(kind, 0) + 1
            else:
                self.faults.refused.append(f"{kind}: {detail}")
            state = self.admin.faults() or {}
            self.faults.fired = dict(state.get("fired", {}))
        if switched:
            self._switch(self.start_policy)

    def _switch(self, policy: str) -> bool:
        ok, detail = self.admin.switch_policy(policy, patience_s=20)
        self.faults.policy_switches.append(f"{time.monotonic() - self.t0:.0f} s: to {policy}: {detail}")
        self.say(f"policy: to {policy}: {detail}")
        return ok

    # ---- the end ------------------------------------------------------------------------------

    def settle(self) -> dict:
        """Wait until the server holds no request and no block (or settle_s passed); read it."""
        deadline = time.monotonic() + self.opts.settle_s
        if self.opts.faults and self.admin.state().get("policy") != self.start_policy:
            self._switch(self.start_policy)
        while True:
            state = self.admin.state()
            held = blocks_held(state)
            if (in_flight(state) == 0 and not any(held.values())) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        time.sleep(2.0)  # and it stays so
        state = self.admin.state()
        if self.opts.faults and self.faults.available:
            api = self.admin.faults() or {}
            self.faults.fired = dict(api.get("fired", {}))
            self.faults.left_armed = {k: n for k, n in api.get("armed", {}).items() if n}
        return state

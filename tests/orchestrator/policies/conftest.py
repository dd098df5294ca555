"""Pool states set up by hand, as the run loop would have left them, for policy tests that need
no engine and no model: build a state, hand the policy a Draft, read the plan."""
from __future__ import annotations

import pytest

from engines.base import HOST, Capabilities, DeviceInfo, EngineInfo, ModelInfo
from orchestrator.config import ServeConfig
from orchestrator.core import Request, StepPlan
from orchestrator.draft import Draft
from orchestrator.kv_ledger import KVLedger
from orchestrator.policies import make_policy
from orchestrator.pool import RequestPool

BLOCK = 16


class PoolState:
    """A request pool and a KV ledger, filled part by part; `plan(policy)` runs one decision."""

    def __init__(self, device_blocks: int = 64, host_blocks: int = 256, helper: bool = False,
                 max_seq_len: int = 1024):
        devices = [DeviceInfo("cuda:0", "cuda", device_blocks)] + ([DeviceInfo("cuda:1", "cuda", device_blocks)]
                                                                   if helper else [])
        model = ModelInfo("LlamaForCausalLM", 1000, max_seq_len, 2, 2, 8, "float32", 1000)
        caps = Capabilities(can_offload=host_blocks > 0, can_peer_copy=helper, can_chunk_prefill=True)
        self.info = EngineInfo("test", model, tuple(devices), BLOCK, 1024, host_blocks, caps)
        self.device = "cuda:0"
        self.now = 0.0
        self.ledger = KVLedger({**{d.name: d.kv_blocks for d in devices}, HOST: host_blocks})
        self.pool = RequestPool(max_seq_len, BLOCK, clock=lambda: self.now)
        self._ids = 0

    def request(self, prompt_len: int, max_tokens: int = 16, tokens: int = 0, arrival: float = 0.0) -> Request:
        """A request with `tokens` generated so far (its KV holds prompt + tokens - 1)."""
        self._ids += 1
        r = Request(f"r{self._ids}", tuple(range(prompt_len)), max_tokens)
        r.arrival_time = arrival
        r.output_ids = [7] * tokens
        r.token_times = [arrival + i for i in range(tokens)]
        return r

    def waiting(self, prompt_len: int, **kw) -> Request:
        r = self.request(prompt_len, **kw)
        self.pool.add(r)
        return r

    def running(self, prompt_len: int, tokens: int = 1, **kw) -> Request:
        """A member of the running batch, its longest KV booked on the decode device."""
        r = self.waiting(prompt_len, tokens=tokens, **kw)
        self.pool.take_waiting([r])
        self.ledger.reserve(r.id, self.device, self.info.blocks_for(r.max_kv_len))
        self.pool.start(r)
        return r

    def parked(self, prompt_len: int, tokens: int = 1, since: float = 0.0, **kw) -> Request:
        """A request whose KV is in the host pool, waiting since `since`."""
        r = self.request(prompt_len, tokens=tokens, **kw)
        r.token_times = [since]
        self.pool.add(r)
        self.pool.take_waiting([r])
        self.ledger.reserve(r.id, HOST, self.info.blocks_for(r.kv_len))
        self.pool.to_host(r, since)
        r.moving = False
        self.pool.on_host(r)
        return r

    def staged(self, prompt_len: int, tokens: int = 1, moving: bool = False, candidate: bool = False) -> Request:
        """A request loaded (or loading) to the decode device: staged, or a refill candidate."""
        r = self.parked(prompt_len, tokens)
        self.ledger.release(r.id)
        self.ledger.reserve(r.id, self.device, self.info.blocks_for(r.max_kv_len))
        self.pool.to_device(r, as_candidate=candidate)
        r.moving = moving
        return r

    def prefilling(self, prompt_len: int, done: int, **kw) -> Request:
        """A request whose prompt is prefilled in chunks, `done` tokens so far."""
        r = self.waiting(prompt_len, **kw)
        self.pool.take_waiting([r])
        self.ledger.reserve(r.id, self.device, self.info.blocks_for(r.max_kv_len))
        self.pool.begin_prefill(r)
        r.prefilled = done
        return r

    def policy(self, name: str, **config):
        return make_policy(name, self.info, ServeConfig(policy=name, **config))

    def plan(self, policy) -> StepPlan:
        """One decision; the pool and the ledger must come out untouched."""
        before = self._fingerprint()
        plan = policy.schedule(Draft(self.pool, self.ledger, self.now))
        assert self._fingerprint() == before, "the policy changed the pool or the ledger"
        return plan

    def _fingerprint(self):
        p = self.pool
        parts = [[r.id for r in part] for part in (p.waiting, p.prefilling, p.running, p.staged, p.candidates)]
        requests = [(r.id, r.state, r.moving, r.parked_since, len(r.history)) for r in p]
        grants = {r.id: self.ledger.holds(r.id) for r in p}
        return parts, sorted(p.parked), requests, grants, {t: self.ledger.used(t) for t in (self.device, HOST)}

    @staticmethod
    def ids(requests) -> list[str]:
        return [r.id for r in requests]

    @staticmethod
    def grants(plan: StepPlan) -> dict[str, dict[str, int]]:
        """request id -> tier -> blocks the plan books."""
        out: dict[str, dict[str, int]] = {}
        for g in plan.grants:
            held = out.setdefault(g.request.id, {})
            held[g.tier] = held.get(g.tier, 0) + g.blocks
        return out


@pytest.fixture
def state() -> PoolState:
    return PoolState()



@pytest.fixture
def make_state():
    """PoolState, to build one with other device / host pools or a helper device."""
    return PoolState

"""Serving a list of timed requests on the virtual-time engine (H100 profile, OPT-13B), for the
policies' tests at a GPU's scale."""
from __future__ import annotations

from collections import deque

from engines.sim.cost_model import CostModel
from engines.sim.engine import SimEngine
from engines.sim.profiles import H100_SXM, OPT_13B
from orchestrator.config import ServeConfig
from orchestrator.service import Orchestrator


def serve(policy: str, arrivals: list[tuple[float, int, int]], spy=None, kv_blocks: int = 400,
          max_seq_len: int = 1024, **cfg) -> tuple[Orchestrator, list]:
    """Submit each (time, prompt_len, max_tokens) once the virtual clock reaches it; step until
    done. The default device holds ~10 requests at max KV; `cfg` overrides the ServeConfig."""
    cost = CostModel(H100_SXM, OPT_13B)
    engine = SimEngine(cost, kv_blocks=kv_blocks, block_size=16, max_seq_len=max_seq_len,
                       host_kv_bytes=20_000 * cost.model.kv_bytes_per_token * 16)
    settings = dict(policy=policy, max_batch_size=16, kmin=4, max_prefill_tokens=2048, max_queue=len(arrivals),
                    max_queue_tokens=sum(plen for _, plen, _ in arrivals))
    orch = Orchestrator(engine, ServeConfig(**{**settings, **cfg}), clock=engine.clock)
    m = orch.loop.metrics
    m.history, m.transfers = deque(), deque()  # every iteration and move, not the last 4,096
    if spy:
        spy(orch.policy)
    submitted, i = [], 0
    for _ in range(200_000):
        while i < len(arrivals) and arrivals[i][0] <= engine.clock():
            _, plen, out = arrivals[i]
            submitted.append(orch.submit([1] + [5] * (plen - 1), max_tokens=out))
            i += 1
        if orch.step():
            continue
        if i == len(arrivals):
            break
        engine.clock.advance_to(arrivals[i][0])
    assert all(r.finished for r in submitted)
    return orch, submitted

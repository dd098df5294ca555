"""FCFS continuous batching, the baseline every other policy is compared with.

As vLLM and TensorRT-LLM's in-flight batcher do it: admit waiting requests in arrival order
while the batch has room and their KV fits, and let finished requests' places be refilled next
iteration. KV for prompt + max_tokens is reserved on admission (TensorRT-LLM's
GUARANTEED_NO_EVICT), so a running request never has to be preempted.
"""
from __future__ import annotations

from typing import Callable

from engines.base import EngineInfo

from orchestrator.config import ServeConfig
from orchestrator.core import Request, StepPlan
from orchestrator.kv_ledger import KVLedger
from orchestrator.pool import RequestPool


class FcfsPolicy:
    name = "fcfs"

    def __init__(self, info: EngineInfo, config: ServeConfig, ledger: KVLedger):
        self.info = info
        self.config = config
        self.ledger = ledger
        self.device = info.decode_device

    def schedule(self, pool: RequestPool) -> StepPlan:
        room = self.config.max_batch_size - len(pool.running)
        admitted = admit_in_order(pool, self.config, self.ledger, room,
                                  lambda r: [(self.device, self.info.blocks_for(r.max_kv_len))])
        return StepPlan(prefill=admitted, decode=list(pool.running))


def admit_in_order(pool: RequestPool, config: ServeConfig, ledger: KVLedger, room: int,
                   grants: Callable[[Request], list[tuple[str, int]]]) -> list[Request]:
    """Take waiting requests in strict arrival order while there is `room`, their prompts fit
    max_prefill_tokens and the ledger can book every (tier, blocks) of `grants(request)`; book
    them and take them out of the queue. The head of the queue blocks those behind it, so no
    request can be overtaken forever by shorter ones."""
    admitted: list[Request] = []
    prompt_tokens = 0
    for request in pool.waiting:
        if len(admitted) >= room:
            break
        if admitted and prompt_tokens + request.prompt_len > config.max_prefill_tokens:
            break
        need = grants(request)
        if not all(ledger.can_reserve(tier, blocks) for tier, blocks in need):
            break
        for tier, blocks in need:
            ledger.reserve(request.id, tier, blocks)
        admitted.append(request)
        prompt_tokens += request.prompt_len
    for _ in admitted:
        pool.waiting.popleft()
    return admitted

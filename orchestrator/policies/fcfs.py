"""FCFS continuous batching, the baseline every other policy is compared with.

As vLLM and TensorRT-LLM's in-flight batcher do it: admit waiting requests in arrival order
while the batch has room and their KV fits, and let finished requests' places be refilled next
iteration. KV for prompt + max_tokens is reserved on admission (TensorRT-LLM's
GUARANTEED_NO_EVICT), so a running request never has to be preempted.
"""
from __future__ import annotations

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
        admitted: list[Request] = []
        prompt_tokens = 0
        room = self.config.max_batch_size - len(pool.running)
        # Strict arrival order: the head of the queue blocks those behind it, so no request can
        # be overtaken forever by shorter ones.
        for request in pool.waiting:
            if len(admitted) >= room:
                break
            if admitted and prompt_tokens + request.prompt_len > self.config.max_prefill_tokens:
                break
            blocks = self.info.blocks_for(request.max_kv_len)
            if not self.ledger.can_reserve(self.device, blocks):
                break
            self.ledger.reserve(request.id, self.device, blocks)
            admitted.append(request)
            prompt_tokens += request.prompt_len
        for request in admitted:
            pool.waiting.popleft()
        return StepPlan(prefill=admitted, decode=list(pool.running))

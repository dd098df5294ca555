"""Chunked prefill: FCFS continuous batching whose prompts ride along in the decode steps.

DeepSpeed-FastGen's Dynamic SplitFuse (Holmes et al., arXiv 2401.08671) and Sarathi-Serve
(Agrawal et al., OSDI 2024) cut prompts into chunks and run them in the same forward as the
decode batch, with a fixed token budget per step, so decode never stops for a whole long
prompt and every step keeps the GPU busy. As Sarathi-Serve schedules a step: the running
requests' decode tokens first, then the next chunk of prompts already under way (oldest first),
then new requests in arrival order while tokens of the budget, places in the batch, and KV
blocks for their longest KV (GUARANTEED_NO_EVICT, as fcfs) are left. The last chunk of a prompt
gives its first token, and the request decodes from the next step.
"""
from __future__ import annotations

from engines.base import EngineInfo
from orchestrator.config import ServeConfig
from orchestrator.core import Request, StepPlan
from orchestrator.kv_ledger import KVLedger
from orchestrator.pool import RequestPool


class ChunkedPrefillPolicy:
    name = "chunked-prefill"

    def __init__(self, info: EngineInfo, config: ServeConfig, ledger: KVLedger):
        self.info, self.config, self.ledger = info, config, ledger
        self.device = info.decode_device

    def schedule(self, pool: RequestPool) -> StepPlan:
        budget = max(self.config.chunk_tokens - len(pool.running), 0)
        chunks: list[tuple[Request, int, int]] = []
        for r in pool.prefilling:
            if budget <= 0:
                break
            n = min(r.prompt_len - r.prefilled, budget)
            chunks.append((r, r.prefilled, r.prefilled + n))
            budget -= n
        room = self.config.max_batch_size - len(pool.running) - len(pool.prefilling)
        while budget > 0 and room > 0 and pool.waiting:
            request = pool.waiting[0]
            blocks = self.info.blocks_for(request.max_kv_len)
            if not self.ledger.can_reserve(self.device, blocks):
                break  # strict arrival order: the head waits for memory, nobody overtakes it
            self.ledger.reserve(request.id, self.device, blocks)
            pool.waiting.popleft()
            pool.begin_prefill(request)
            n = min(request.prompt_len, budget)
            chunks.append((request, 0, n))
            budget -= n
            room -= 1
        return StepPlan(decode=list(pool.running), chunks=chunks)

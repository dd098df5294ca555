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

from typing import Callable, Iterable

from orchestrator.core import Request, StepPlan
from orchestrator.draft import Draft
from orchestrator.policies.base import Needs, Policy


class ChunkedPrefillPolicy(Policy):
    name = "chunked-prefill"
    summary = "fcfs with prompts prefilled in chunks inside the decode steps (SplitFuse, Sarathi-Serve)"
    parts = frozenset({"waiting", "running", "chunks"})
    needs = Needs(chunked_prefill=True)

    def schedule(self, draft: Draft) -> StepPlan:
        chunks, budget = continue_chunks(draft, self.config.chunk_tokens - len(draft.running))
        room = self.config.max_batch_size - len(draft.running) - len(draft.prefilling)
        chunks += admit_chunks(draft, draft.waiting, budget, room,
                               lambda r: [(self.device, self.info.blocks_for(r.max_kv_len))])
        return draft.plan(decode=draft.running, chunks=chunks)


def continue_chunks(draft: Draft, budget: int) -> tuple[list[tuple[Request, int, int]], int]:
    """The next chunk of each prompt under way, oldest first, within `budget` tokens; returns
    the chunks and the budget left."""
    budget = max(budget, 0)
    chunks: list[tuple[Request, int, int]] = []
    for r in draft.prefilling:
        if budget <= 0:
            break
        n = min(r.prompt_len - r.prefilled, budget)
        chunks.append((r, r.prefilled, r.prefilled + n))
        budget -= n
    return chunks, budget


def admit_chunks(draft: Draft, order: Iterable[Request], budget: int, room: int,
                 grants: Callable[[Request], list[tuple[str, int]]]) -> list[tuple[Request, int, int]]:
    """Admit waiting requests in `order` while tokens of the budget, places and every grant of
    `grants(request)` are left, each with its first chunk; the head waits for memory and nobody
    overtakes it. Returns the first chunks."""
    chunks: list[tuple[Request, int, int]] = []
    admitted = []
    for request in order:
        if budget <= 0 or room <= 0:
            break
        need = grants(request)
        if not all(draft.can_reserve(tier, blocks) for tier, blocks in need):
            break  # strict order: the head waits for memory, nobody overtakes it
        for tier, blocks in need:
            draft.reserve(request, tier, blocks)
        admitted.append(request)
        n = min(request.prompt_len, budget)
        chunks.append((request, 0, n))
        budget -= n
        room -= 1
    draft.admit(admitted)
    return chunks

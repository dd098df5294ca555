"""FCFS continuous batching, the baseline every other policy is compared with.

As vLLM and TensorRT-LLM's in-flight batcher do it: admit waiting requests in arrival order
while the batch has room and their KV fits, and let finished requests' places be refilled next
iteration. KV for prompt + max_tokens is reserved on admission (TensorRT-LLM's
GUARANTEED_NO_EVICT), so a running request never has to be preempted.
"""
from __future__ import annotations

from typing import Callable, Iterable

from orchestrator.core import Request, StepPlan
from orchestrator.draft import Draft
from orchestrator.policies.base import Policy


class FcfsPolicy(Policy):
    name = "fcfs"
    summary = "continuous batching in arrival order, as vLLM and TensorRT-LLM's in-flight batcher do"
    parts = frozenset({"waiting", "running"})

    def schedule(self, draft: Draft) -> StepPlan:
        room = self.config.max_batch_size - len(draft.running)
        admitted = admit_in_order(draft, self.config.max_prefill_tokens, room,
                                  lambda r: [(self.device, self.info.blocks_for(r.max_kv_len))])
        return draft.plan(prefill=admitted, decode=draft.running)


def admit_in_order(draft: Draft, max_prefill_tokens: int, room: int,
                   grants: Callable[[Request], list[tuple[str, int]]],
                   order: Iterable[Request] | None = None) -> list[Request]:
    """Admit waiting requests in strict arrival order (or in `order`, waiting requests a policy
    chose) while there is `room`, their prompts fit `max_prefill_tokens` and every (tier, blocks)
    of `grants(request)` can be booked. The head of the queue blocks those behind it, so no
    request can be overtaken forever by shorter ones."""
    admitted: list[Request] = []
    prompt_tokens = 0
    for request in draft.waiting if order is None else order:
        if len(admitted) >= room:
            break
        if admitted and prompt_tokens + request.prompt_len > max_prefill_tokens:
            break
        need = grants(request)
        if not all(draft.can_reserve(tier, blocks) for tier, blocks in need):
            break
        for tier, blocks in need:
            draft.reserve(request, tier, blocks)
        admitted.append(request)
        prompt_tokens += request.prompt_len
    draft.admit(admitted)
    return admitted

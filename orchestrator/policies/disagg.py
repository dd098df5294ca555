"""Disaggregated FCFS: DistServe's split of prefill and decode onto separate devices, no alignment.

Zhong et al., "DistServe: Disaggregating Prefill and Decoding for Goodput-optimized LLM
Serving", OSDI 2024: a prefill instance runs prompts while a decode instance runs the decode
batch, so a long prompt never stalls the decode steps, and each prompt's KV is shipped to the
decode instance when its prefill ends. Here the prefill instance is the first helper device and
the decode instance the decode device (`prefill_device`, by default the first helper); requests go in arrival order, as in fcfs.

Per iteration: candidates whose KV has landed on the decode device join the running batch;
waiting requests are admitted in arrival order while the batch (running + in prefill + in
transit) has room, their prompts fit `max_prefill_tokens`, and the ledger can grant both their
prompt's blocks on the prefill device and their longest KV on the decode device. Booking the
decode side at admission, not when the prefill ends, is GUARANTEED_NO_EVICT as in fcfs: a
request never waits on the prefill device for decode memory, so no prefill is wasted. The run
loop prefills them on the prefill device and moves their KV over the peer link once done; the
tracker then releases the prefill device's grant.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.core import StepPlan
from orchestrator.draft import Draft
from orchestrator.policies.base import Needs, Policy
from orchestrator.policies.fcfs import admit_in_order

if TYPE_CHECKING:
    from engines.base import EngineInfo
    from orchestrator.config import ServeConfig


class DisaggFcfsPolicy(Policy):
    name = "disagg-fcfs"
    summary = "fcfs with prompts prefilled on a helper device and their KV shipped to the decode device (DistServe)"
    parts = frozenset({"waiting", "running", "remote", "candidates"})
    needs = Needs(helper_device=True)
    prefills_elsewhere = True

    def __init__(self, info: EngineInfo, config: ServeConfig):
        super().__init__(info, config)
        self.prefill_device = config.prefill_device or info.devices[1].name

    def schedule(self, draft: Draft) -> StepPlan:
        for r in [c for c in draft.candidates if not draft.moving(c)]:
            draft.promote(r)
        room = self.config.max_batch_size - len(draft.running) - len(draft.prefilling) - len(draft.candidates)
        admitted = admit_in_order(draft, self.config.max_prefill_tokens, room, lambda r: [
            (self.device, self.info.blocks_for(r.max_kv_len)), (self.prefill_device, self.info.blocks_for(r.prompt_len))])
        return draft.plan(prefill=admitted, prefill_on=self.prefill_device, decode=draft.running)

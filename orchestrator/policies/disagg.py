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

from engines.base import EngineInfo
from orchestrator.config import ServeConfig
from orchestrator.core import StepPlan
from orchestrator.kv_ledger import KVLedger
from orchestrator.policies.fcfs import admit_in_order
from orchestrator.pool import RequestPool


class DisaggFcfsPolicy:
    name = "disagg-fcfs"

    def __init__(self, info: EngineInfo, config: ServeConfig, ledger: KVLedger):
        helpers = [d.name for d in info.devices[1:]]
        if not helpers:
            raise ValueError(f"policy: 'disagg-fcfs' prefills on a separate device, and this {info.backend} engine "
                             "has only the decode device; give it a helper device (helper_devices, e.g. cuda:1)")
        if not info.capabilities.can_peer_copy:
            raise ValueError(f"policy: 'disagg-fcfs' moves KV between devices, and this {info.backend} engine "
                             "cannot (can_peer_copy=False)")
        self.info, self.config, self.ledger = info, config, ledger
        self.device = info.decode_device
        self.prefill_device = config.prefill_device or helpers[0]

    def schedule(self, pool: RequestPool) -> StepPlan:
        for r in [c for c in pool.candidates if not c.moving]:
            pool.promote(r)
        room = self.config.max_batch_size - len(pool.running) - len(pool.prefilling) - len(pool.candidates)
        admitted = admit_in_order(pool, self.config, self.ledger, room, lambda r: [
            (self.device, self.info.blocks_for(r.max_kv_len)), (self.prefill_device, self.info.blocks_for(r.prompt_len))])
        return StepPlan(prefill=admitted, prefill_on=self.prefill_device, decode=list(pool.running))

"""Length-aligned batches from a host-memory KV pool, scheduled a batch at a time.

Each iteration, in this order:
1. **Switch.** The staged batch replaces the running batch when the running batch fell below
   Kmin, or when the staged batch's alignment beats the running batch's by `switch_margin` and
   the running batch has decoded `min_batch_iterations` since the last switch. The running
   members' KV spills to the host. A switch waits for the staged batch's loads (a bubble) only
   when the running batch is empty; otherwise it waits for the next iteration. A staged batch
   that fits beside a small running batch (and within its span) joins it instead.
2. **Starvation guard.** A parked request that has waited `max_wait_s / 2` is loaded as a
   priority candidate and, once on the device, swapped into the running batch for the member
   farthest from the batch's median length (which goes to the host). So no request waits in the
   host pool much over half of max_wait, whatever the search prefers.
3. **Refill.** Finished places in the running batch are refilled by candidates already on the
   device, nearest in KV length to the batch's median; new candidates start loading for the
   places still open (by length, only those within the batch's span while the pool holds Kmin
   requests: a staged batch will do better than a misfit).
4. **Admit.** Waiting requests are prefilled, up to max_prefill_tokens per iteration: first any
   that have waited max_wait_s / 2, then those whose prompt length fits the running batch's span
   (nearest first, as many as it has room for), then the rest in arrival order. A fresh request
   joins the running batch when there is room and its length falls within the batch's span (or
   the batch is empty); otherwise its KV goes to the host pool.
5. **Stage.** With no staged batch, the density-first search picks the next one from the host
   pool (at least Kmin requests, the narrowest KV-length span fitting Bmax blocks; where no
   Kmin requests fit Bmax, as for the longest lengths, Kmin is halved until some do), if it
   would be worth switching to, and its loads start; they overlap the running batch's decode.

With `prefill_device` set (the paper's prefill GPU), prompts are prefilled there while the decode
device decodes; joiners hold their place in the batch while they prefill and then move over the
peer link as candidates, and the others go from there to the host over that device's PCIe link.

Grants: a request on the device (running, staged, candidate, or being prefilled to run) holds
device blocks for its longest possible KV, so a running request never needs eviction; a parked
one holds host blocks for its KV length. A move holds both until it finishes, then the run loop
releases the source grant.

Each pass reads the `Draft`, which shows the pool as the earlier passes' decisions would leave
it (a request the switch spilled is gone from the running batch; one the guard loaded is no longer
parked), and records its own decisions there; nothing is applied until the plan is done.

`FcfsOffloadPolicy` ("fcfs-offload") is the ablation: the same machinery choosing requests in
arrival order (refills and staged batches take the oldest parked requests, every fresh request
may join).
"""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from engines.base import HOST
from orchestrator.core import Request, StepPlan
from orchestrator.draft import Draft
from orchestrator.policies.base import Needs, Policy

if TYPE_CHECKING:
    from engines.base import EngineInfo
    from orchestrator.config import ServeConfig

_HOST_POOL = frozenset({"waiting", "running", "remote", "candidates", "staged", "parked"})


def alignment(lengths: list[int]) -> float:
    """sum(L) / (B * max L): 1.0 when every member has the same KV length."""
    return sum(lengths) / (len(lengths) * max(lengths)) if lengths else 0.0


class AlignedPolicy(Policy):
    """The `aligned` policy (and, as `FcfsOffloadPolicy`, `fcfs-offload`)."""

    name = "aligned"
    summary = "length-aligned batches from a host-memory KV pool, switched a batch at a time (AlignedServe)"
    parts = _HOST_POOL
    needs = Needs(host_pool=True)
    prefills_elsewhere = True
    fallback = "fcfs"
    by_length = True
    """Choose requests by KV length (False: in arrival order, the fcfs-offload ablation)."""

    def __init__(self, info: EngineInfo, config: ServeConfig):
        super().__init__(info, config)
        self.kmin = max(1, min(config.kmin, config.max_batch_size))
        self.bmax = max(1, int(config.bmax_fraction * info.tier_blocks(self.device)))
        self.prefill_device = config.prefill_device or None
        """Where prompts are prefilled (None: the decode device)."""
        self._batch_age = 0  # iterations since the running batch was last switched in

    # -- the iteration ------------------------------------------------------------------------

    def schedule(self, draft: Draft) -> StepPlan:
        wait: list[Request] = []
        self._batch_age += 1
        decoded_last = list(draft.running)  # members that may give up their place
        switch = self._switch(draft, wait)
        self._rescue(draft, decoded_last)
        self._refill(draft)
        prefill, park = self._admit(draft)
        self._stage(draft)
        # this iteration's joiners start decoding next iteration
        return draft.plan(prefill=prefill, park=park, wait=wait, decode=draft.running, switch=switch,
                          prefill_on=self.prefill_device)

    def _switch(self, draft: Draft, wait: list) -> bool:
        """Bring the staged batch in; True when that spilled the running batch (a switch)."""
        staged, running = draft.staged, draft.running
        if not staged:
            return False
        loading = [r for r in staged if draft.moving(r)]
        if loading and running:
            return False  # keep decoding; bring it in once its loads are done
        if len(running) < self.kmin and self._joinable(staged, running):
            # Room for both, and (by length) the staged requests fit the running batch's span:
            # they join it and nothing spills.
            for r in list(staged):
                draft.promote(r)
            wait.extend(loading)
            return False
        shrunk = len(running) < self.kmin and len(staged) > len(running)
        better = (self.by_length and self._batch_age >= self.config.min_batch_iterations
                  and len(staged) >= min(len(running), self.kmin)
                  and alignment([r.kv_len for r in staged])
                  >= alignment([r.kv_len for r in running]) + self.config.switch_margin)
        if not (shrunk or better):
            return False
        lengths = [r.kv_len for r in staged]
        spill = list(running) + [c for c in draft.candidates if self.by_length and not draft.moving(c)
                                 and not self._fits(lengths, c.kv_len) and not self._starving(c, draft.now)]
        if not self._spill(draft, spill):
            return False  # the host pool cannot take the running batch now
        for r in list(staged):
            draft.promote(r)
        wait.extend(loading)
        self._batch_age = 0
        return True

    def _joinable(self, staged: list[Request], running: list[Request]) -> bool:
        if len(running) + len(staged) > self.config.max_batch_size:
            return False
        lengths = [r.kv_len for r in running]
        return not self.by_length or not lengths or all(self._fits(lengths, r.kv_len) for r in staged)

    def _fits(self, lengths: list[int], length: int) -> bool:
        """`length` lies within the span of `lengths`, widened by align_tolerance."""
        tol = self.config.align_tolerance
        return min(lengths) * (1 - tol) <= length <= max(lengths) * (1 + tol)

    def _rescue(self, draft: Draft, decoded_last: list) -> None:
        """The starvation guard: overdue candidates on the device join the running batch (a
        full batch gives up its least aligned member among those that decoded last iteration,
        never one that just joined), and overdue parked requests load."""
        for c in [c for c in draft.candidates if not draft.moving(c) and self._starving(c, draft.now)]:
            if len(draft.running) >= self.config.max_batch_size:
                others = [r for r in decoded_last if r in draft.running]
                if not others:
                    break
                center = statistics.median_low(r.kv_len for r in draft.running)
                victim = max(others, key=lambda r: abs(r.kv_len - center))
                if not self._spill(draft, [victim]):
                    return
            draft.promote(c)
        while draft.parked:
            r = draft.oldest_parked()[0]
            if not self._starving(r, draft.now) or not self._reserve_device(draft, r, headroom=0):
                return
            draft.load(r, stage=False)

    def _spill(self, draft: Draft, requests: list[Request]) -> bool:
        """Book host blocks for these device requests and send them to the host; False (and
        nothing done) when the host pool cannot take them all."""
        blocks = [self.info.blocks_for(r.kv_len) for r in requests]
        if not draft.can_reserve(HOST, sum(blocks)):
            return False
        for r, n in zip(requests, blocks):
            draft.reserve(r, HOST, n)
            draft.offload(r)
        return True

    def _refill(self, draft: Draft) -> None:
        resident = [c for c in draft.candidates if not draft.moving(c)]
        if not draft.running and (draft.staged or not resident):
            return  # an empty running batch is replaced by the staged batch, not refilled
        room = self.config.max_batch_size - len(draft.running)
        center = statistics.median_low(r.kv_len for r in (draft.running or resident))
        for r in sorted(resident, key=lambda c: abs(c.kv_len - center)):
            if room <= 0:
                break
            draft.promote(r)
            room -= 1
        lengths = [r.kv_len for r in draft.running]
        for _ in range(room - len(draft.candidates)):
            r = self._pick_single(draft, center)
            if r is None:
                break
            if (self.by_length and draft.parked + len(draft.waiting) >= self.kmin
                    and not self._fits(lengths, r.kv_len)):
                # Leave the place open while there are enough requests (parked, or still to be
                # prefilled) to align from: once the batch is below Kmin, a staged batch replaces it.
                break
            if not self._reserve_device(draft, r, headroom=0):
                break
            draft.load(r, stage=False)

    def _admit(self, draft: Draft) -> tuple[list, list]:
        prefill: list[Request] = []
        park: list[Request] = []
        prompt_tokens = 0
        room = self.config.max_batch_size - len(draft.running)
        if self.prefill_device:  # joiners still prefilling elsewhere, or on their way, hold places
            room -= len(draft.candidates) + sum(1 for r in draft.prefilling if self.device in draft.holds(r))
        lengths = [r.kv_len for r in draft.running]
        # The prompt's KV is computed where it is prefilled: on the prefill device, or on the
        # decode device (for a parked request, until its move to the host is done).
        at = self.prefill_device or self.device
        for r in self._admission_order(draft, lengths, room):
            if prefill and prompt_tokens + r.prompt_len > self.config.max_prefill_tokens:
                break
            blocks = self.info.blocks_for(r.prompt_len)
            if self.prefill_device and not draft.can_reserve(at, blocks):
                break
            aligned = not lengths or not self.by_length or self._fits(lengths, r.prompt_len)
            if room > 0 and aligned and self._reserve_device(draft, r, headroom=self._headroom(draft)):
                room -= 1
                lengths.append(r.prompt_len)
                if self.prefill_device:
                    draft.reserve(r, at, blocks)
            else:
                # Parked once prefilled: blocks where it is prefilled until the move is done,
                # host blocks for it from now.
                if not (draft.can_reserve(at, blocks) and draft.can_reserve(HOST, blocks)):
                    break
                draft.reserve(r, at, blocks)
                draft.reserve(r, HOST, blocks)
                park.append(r)
            prefill.append(r)
            prompt_tokens += r.prompt_len
        draft.admit(prefill)
        return prefill, park

    def _admission_order(self, draft: Draft, lengths: list[int], room: int) -> list[Request]:
        """Which waiting requests to prefill first. fcfs-offload: arrival order. aligned: those
        overdue (waiting max_wait_s / 2) in arrival order, then the ones whose prompt fits the
        running batch (or, with no running batch, the oldest request's length), nearest first, as
        many as there is room for; then the rest in arrival order, to be parked. Prefilling a
        fitting prompt straight into the batch spares it a trip through the host pool."""
        waiting = list(draft.waiting)
        if not self.by_length or room <= 0 or len(waiting) < 2:
            return waiting
        overdue = [r for r in waiting if draft.now - r.arrival_time >= self.config.max_wait_s / 2]
        rest = [r for r in waiting if draft.now - r.arrival_time < self.config.max_wait_s / 2]
        span = lengths or [(overdue or rest)[0].prompt_len]
        center = statistics.median_low(span)
        fit = sorted((r for r in rest if self._fits(span, r.prompt_len)), key=lambda r: abs(r.prompt_len - center))
        join = fit[:max(room - len(overdue), 0)]
        joining = set(join)  # Request compares by identity (eq=False)
        return overdue + join + [r for r in rest if r not in joining]

    def _stage(self, draft: Draft) -> None:
        if draft.staged or not draft.parked:
            return
        batch = [draft.get(i) for i in self._next_batch(draft)]
        running = [r.kv_len for r in draft.running]
        if (self.by_length and batch and len(running) >= self.kmin
                and alignment([r.kv_len for r in batch]) < alignment(running) + self.config.switch_margin):
            return  # not worth switching to: keep the device memory for a better batch
        for r in batch:
            if not self._reserve_device(draft, r, headroom=0):
                break  # the device is full: stage what fits
            draft.load(r, stage=True)

    # -- choosing requests --------------------------------------------------------------------

    def _next_batch(self, draft: Draft) -> tuple[str, ...]:
        """Ids of the next batch, best first."""
        kmax = self.config.max_batch_size
        if not self.by_length:
            return tuple(r.id for r in draft.oldest_parked(kmax))
        # Kmin is bounded by what Bmax holds: Kmin of the longest requests may not fit, and
        # then (halving) the largest such batch does, or those requests would wait for the
        # running batch to drain or for the starvation guard.
        k = self.kmin
        while k >= 1 and (k == self.kmin or draft.parked >= self.kmin):
            window = draft.densest_parked(k, self.bmax, kmax)
            if window is not None:
                return window.request_ids
            k //= 2
        if draft.running:
            return ()  # too few parked requests to align: they are refilled one at a time
        # The device would idle: run what the pool holds, around its oldest request.
        return draft.parked_around(draft.oldest_parked()[0], kmax, self.bmax).request_ids

    def _pick_single(self, draft: Draft, center: int) -> Request | None:
        if not draft.parked:
            return None
        if self.by_length:
            return draft.nearest_parked(center)
        return draft.oldest_parked()[0]

    def _starving(self, r: Request, now: float) -> bool:
        return now - r.parked_since >= self.config.max_wait_s / 2

    # -- grants -------------------------------------------------------------------------------

    def _headroom(self, draft: Draft) -> int:
        """Device blocks kept free for the next staged batch while there is one to stage."""
        return self.bmax if not draft.staged and draft.parked >= self.kmin else 0

    def _reserve_device(self, draft: Draft, r: Request, headroom: int) -> bool:
        blocks = self.info.blocks_for(r.max_kv_len)
        if not draft.can_reserve(self.device, blocks + headroom):
            return False
        draft.reserve(r, self.device, blocks)
        return True


class FcfsOffloadPolicy(AlignedPolicy):
    """The aligned machinery choosing requests in arrival order: isolates the effect of alignment."""

    name = "fcfs-offload"
    summary = "the aligned machinery (host pool, staged batches, switches) choosing in arrival order (ablation)"
    fallback = None
    by_length = False

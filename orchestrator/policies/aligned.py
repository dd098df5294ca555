"""Length-aligned batches from a host-memory KV pool, scheduled a batch at a time.

Each iteration, in this order:
1. **Switch.** The staged batch replaces the running batch when the running batch fell below
   Kmin, or when the staged batch's alignment beats the running batch's by `switch_margin` and
   the running batch has decoded `min_batch_iterations` since the last switch. The running
   members' KV spills to the host. A switch waits for the staged batch's loads (a bubble) only
   when the running batch is empty; otherwise it waits for the next iteration. A staged batch
   that fits beside a small running batch (and within its span) joins it instead.
2. **Starvation guard.** A request that has waited `max_wait_s / 2` since its last token (parked,
   or loaded but not running) is overdue. Once on the device it joins the running batch, a full
   batch giving up a member for it; a parked one is loaded as a priority candidate, and where the
   device cannot grant it its longest KV, running members are spilled to the host to make room
   (those farthest from the batch's median length among the ones that decoded last iteration,
   never one that is overdue itself or just joined; the room they free is counted for it until
   their moves land, so nobody is spilled twice for one request). Making room takes a move out
   and a move in, a few iterations: the rest of max_wait_s leaves time for them, so no request
   waits more than max_wait_s between two tokens, plus one decode step and one transfer at most.
   The limit: the spilled members need host blocks. Admission keeps enough host blocks free to
   spill the longest running member; if the host pool is full anyway (a switch spilled a whole
   batch into it), the guard waits for host blocks and the bound can be exceeded.
3. **Refill.** Finished places in the running batch are refilled by candidates already on the
   device, nearest in KV length to the batch's median; new candidates start loading for the
   places still open (by length, only those within the batch's span while the pool holds Kmin
   requests: a staged batch will do better than a misfit), leaving Bmax blocks free on the device
   for the next staged batch while there is one to stage, as admission does.
4. **Admit.** Waiting requests are prefilled, up to max_prefill_tokens per iteration: first any
   that have waited max_wait_s / 2, then those whose prompt length fits the running batch's span
   (nearest first, as many as it has room for), then the rest in arrival order. A fresh request
   joins the running batch when there is room and its length falls within the batch's span (or
   the batch is empty); otherwise its KV goes to the host pool, unless the starvation guard is
   falling behind (a parked request has waited max_wait_s / 4): then it stays in the queue, its
   wait counted in TTFT, since every request started is one more the guard must bring back in
   time.
5. **Stage.** With no staged batch, the density-first search picks the next one from the host
   pool (at least Kmin requests, the narrowest KV-length span whose device grants, at each
   request's longest KV, fit Bmax blocks and the blocks free on the device; where no Kmin
   requests fit Bmax, as for the longest lengths, Kmin is halved until some do; where they fit
   Bmax but not the device yet, nothing is staged until the device frees room), if it would be
   worth switching to, and its loads start; they overlap the running batch's decode.

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
from orchestrator.core import Decision, Request, RequestState, StepPlan
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
        self._making_room: set[str] = set()  # members the starvation guard spilled, until they land

    # -- the iteration ------------------------------------------------------------------------

    def schedule(self, draft: Draft) -> StepPlan:
        wait: list[Request] = []
        self._batch_age += 1
        decoded_last = list(draft.running)  # members that may give up their place
        before = alignment([r.kv_len for r in decoded_last])
        switch = self._switch(draft, wait)
        preempted = self._rescue(draft, decoded_last)
        refills = self._refill(draft)
        prefill, park = self._admit(draft)
        staged = self._stage(draft)
        # this iteration's joiners start decoding next iteration
        plan = draft.plan(prefill=prefill, park=park, wait=wait, decode=draft.running, switch=switch,
                          prefill_on=self.prefill_device)
        self.decision = self._explain(draft, plan, before, preempted, refills, staged)
        return plan

    def _explain(self, draft: Draft, plan: StepPlan, before: float, preempted: list[Request], refills: int,
                 staged: int) -> Decision:
        running = [r.kv_len for r in draft.running]
        now = alignment(running)
        if plan.switch:
            kind, reason = "switched", (f"staged batch of {len(running)} at alignment {now:.2f} replaced "
                                        f"the running batch at {before:.2f}")
        elif preempted:
            kind, reason = "preempted", (f"{len(preempted)} running member(s) spilled to the host so that "
                                         f"overdue requests (waiting >= {self.config.max_wait_s / 2:g} s) decode")
        elif self.by_length and (plan.park or refills or staged):
            kind, reason = "grouped", (f"batch of {len(running)} at alignment {now:.2f}; {len(plan.park)} fresh "
                                       f"request(s) parked, {refills} refill(s) and {staged} staged by KV length "
                                       f"({draft.parked} parked)")
        else:
            kind, reason = "filled", f"batch of {len(running)} at alignment {now:.2f}; nothing held back by length"
        costs = self.info.step_costs
        predicted = costs[0].step_seconds([r.kv_len for r in draft.running]) if costs else None
        return Decision(kind, reason, predicted)

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

    def _rescue(self, draft: Draft, decoded_last: list) -> list[Request]:
        """The starvation guard: overdue requests on the device join the running batch (a full
        batch gives up a member), and overdue parked requests load, spilling running members
        where the device cannot grant them. Returns the members spilled."""
        spilled: list[Request] = []
        for c in [c for c in draft.candidates + draft.staged if not draft.moving(c) and self._starving(c, draft.now)]:
            if len(draft.running) >= self.config.max_batch_size:
                victims = self._victims(draft, decoded_last)[:1]
                if not victims or not self._spill(draft, victims):
                    break
                spilled += victims
            draft.promote(c)
        # Device blocks already on their way free: members spilled for earlier overdue requests.
        self._making_room = {rid for rid in self._making_room if (v := draft.get(rid)) is not None
                             and v.state is RequestState.PARKED and v.moving and draft.holds(v).get(self.device)}
        coming = sum(draft.holds(draft.get(rid))[self.device] for rid in self._making_room)
        for r in self._overdue_parked(draft):
            if self._reserve_device(draft, r, headroom=0):
                draft.load(r, stage=False)
                continue
            short = self.info.blocks_for(r.max_kv_len) - draft.free(self.device)
            if coming >= short:
                coming -= short  # room for it is on its way
                continue
            short -= coming
            coming = 0
            victims = []
            for v in self._victims(draft, decoded_last):
                if short <= 0:
                    break
                victims.append(v)
                short -= self.info.blocks_for(v.max_kv_len)
            if short > 0 or not self._spill(draft, victims):
                break  # nobody left to spill, or the host pool is full: see the module's docstring
            spilled += victims
            self._making_room.update(v.id for v in victims)
        return spilled

    def _overdue_parked(self, draft: Draft) -> list[Request]:
        """Parked requests that have waited max_wait_s / 2, oldest first."""
        k = 4
        while True:
            oldest = draft.oldest_parked(k)
            if len(oldest) < k or not self._starving(oldest[-1], draft.now):
                return [r for r in oldest if self._starving(r, draft.now)]
            k *= 2

    def _victims(self, draft: Draft, decoded_last: list) -> list[Request]:
        """Running members that may be spilled for an overdue request, best first: those that
        decoded last iteration (never one that just joined) and are not overdue themselves, the
        most recent token first, then the farthest from the batch's median KV length."""
        running = set(draft.running)  # Request compares by identity (eq=False)
        others = [r for r in decoded_last if r in running and not self._starving(r, draft.now)]
        if not others:
            return []
        center = statistics.median_low(r.kv_len for r in draft.running)
        return sorted(others, key=lambda r: (-self._last_token(r), -abs(r.kv_len - center)))

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

    def _refill(self, draft: Draft) -> int:
        """Fill the running batch's open places; returns how many candidates it promoted or loaded."""
        resident = [c for c in draft.candidates if not draft.moving(c)]
        if not draft.running and (draft.staged or not resident):
            return 0  # an empty running batch is replaced by the staged batch, not refilled
        chosen = 0
        room = self.config.max_batch_size - len(draft.running)
        center = statistics.median_low(r.kv_len for r in (draft.running or resident))
        for r in sorted(resident, key=lambda c: abs(c.kv_len - center)):
            if room <= 0:
                break
            draft.promote(r)
            room -= 1
            chosen += 1
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
            if not self._reserve_device(draft, r, headroom=self._headroom(draft)):
                break
            draft.load(r, stage=False)
            chosen += 1
        return chosen

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
        # While the starvation guard falls behind (a parked request has waited a quarter of
        # max_wait_s, half the way to overdue), no new request is
        # started into the host pool: each one started is one more the guard must bring back
        # within max_wait_s, and past what the device can cycle in that time no order keeps
        # the bound. It waits in the queue instead, where its wait counts in TTFT.
        oldest = draft.oldest_parked() if self.by_length else []
        behind = bool(oldest) and draft.now - self._last_token(oldest[0]) >= self.config.max_wait_s / 4
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
                # host blocks for it from now, leaving the starvation guard room to spill.
                if behind or not (draft.can_reserve(at, blocks) and draft.can_reserve(HOST, blocks + self._host_headroom(draft))):
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

    def _stage(self, draft: Draft) -> int:
        """Start loading the next batch; returns how many requests it stages."""
        if draft.staged or not draft.parked:
            return 0
        batch = [draft.get(i) for i in self._next_batch(draft)]
        running = [r.kv_len for r in draft.running]
        if (self.by_length and batch and len(running) >= self.kmin
                and alignment([r.kv_len for r in batch]) < alignment(running) + self.config.switch_margin):
            return 0  # not worth switching to: keep the device memory for a better batch
        staged = 0
        for r in batch:
            if not self._reserve_device(draft, r, headroom=0):
                break  # the device is full: stage what fits (only fcfs-offload's batches get here)
            draft.load(r, stage=True)
            staged += 1
        return staged

    # -- choosing requests --------------------------------------------------------------------

    def _next_batch(self, draft: Draft) -> tuple[str, ...]:
        """Ids of the next batch, best first."""
        kmax = self.config.max_batch_size
        if not self.by_length:
            return tuple(r.id for r in draft.oldest_parked(kmax))
        # Windows are sized by the device grants (each request's longest KV), within Bmax and
        # what the device has free, so every window found can be reserved whole. Kmin is bounded
        # by what Bmax holds: Kmin of the longest requests may not fit, and then (halving) the
        # largest such batch does, or those requests would wait for the running batch to drain
        # or for the starvation guard. A window that fits Bmax but not the device's free blocks
        # waits for room rather than being staged cut short.
        budget = min(self.bmax, draft.free(self.device))
        k = self.kmin
        while k >= 1 and (k == self.kmin or draft.parked >= self.kmin):
            window = draft.densest_parked(k, budget, kmax)
            if window is not None:
                return window.request_ids
            if budget < self.bmax and draft.densest_parked(k, self.bmax, kmax) is not None:
                return ()
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
        """It waited max_wait_s / 2 since its last token (a parked request's `parked_since`)."""
        return now - max(r.parked_since, self._last_token(r)) >= self.config.max_wait_s / 2

    @staticmethod
    def _last_token(r: Request) -> float:
        return r.token_times[-1] if r.token_times else r.arrival_time

    # -- grants -------------------------------------------------------------------------------

    def _headroom(self, draft: Draft) -> int:
        """Device blocks kept free for the next staged batch while there is one to stage."""
        return self.bmax if not draft.staged and draft.parked >= self.kmin else 0

    def _host_headroom(self, draft: Draft) -> int:
        """Host blocks admission leaves free so the starvation guard can spill the longest running
        member (its longest KV: an upper bound on what it will hold when spilled)."""
        if not self.by_length or not draft.parked:
            return 0
        return max((self.info.blocks_for(r.max_kv_len) for r in draft.running), default=0)

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

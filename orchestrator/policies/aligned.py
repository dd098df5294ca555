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

`by_length=False` is the "fcfs-offload" ablation: the same machinery choosing requests in arrival
order (refills and staged batches take the oldest parked requests, every fresh request may join).
"""
from __future__ import annotations

import statistics
from typing import Callable

from engines.base import HOST, EngineInfo
from orchestrator.config import ServeConfig
from orchestrator.core import Request, StepPlan
from orchestrator.kv_ledger import KVLedger
from orchestrator.pool import RequestPool


def alignment(lengths: list[int]) -> float:
    """sum(L) / (B * max L): 1.0 when every member has the same KV length."""
    return sum(lengths) / (len(lengths) * max(lengths)) if lengths else 0.0


class AlignedPolicy:
    """The `aligned` policy (and, with by_length=False, `fcfs-offload`)."""

    def __init__(self, info: EngineInfo, config: ServeConfig, ledger: KVLedger,
                 clock: Callable[[], float], by_length: bool = True):
        self.name = "aligned" if by_length else "fcfs-offload"
        self.info = info
        self.config = config
        self.ledger = ledger
        self.clock = clock
        self.by_length = by_length
        self.device = info.decode_device
        self.kmin = max(1, min(config.kmin, config.max_batch_size))
        self.bmax = max(1, int(config.bmax_fraction * info.tier_blocks(self.device)))
        self.prefill_device = config.prefill_device or None
        """Where prompts are prefilled (None: the decode device)."""
        self._batch_age = 0  # iterations since the running batch was last switched in

    # -- the iteration ------------------------------------------------------------------------

    def schedule(self, pool: RequestPool) -> StepPlan:
        now = self.clock()
        offload: list[Request] = []
        load: list[Request] = []
        wait: list[Request] = []
        self._batch_age += 1
        decoded_last = list(pool.running)  # members that may give up their place
        switch = self._switch(pool, now, offload, wait)
        self._rescue(pool, now, load, offload, decoded_last)
        self._refill(pool, load)
        prefill, park = self._admit(pool, now)
        self._stage(pool, load)
        decode = list(pool.running)  # this iteration's joiners start decoding next iteration
        return StepPlan(prefill=prefill, park=park, offload=offload, load=load, wait=wait,
                        decode=decode, switch=switch, prefill_on=self.prefill_device)

    def _switch(self, pool: RequestPool, now: float, offload: list, wait: list) -> bool:
        """Bring the staged batch in; True when that spilled the running batch (a switch)."""
        staged, running = pool.staged, pool.running
        if not staged:
            return False
        loading = [r for r in staged if r.moving]
        if loading and running:
            return False  # keep decoding; bring it in once its loads are done
        if len(running) < self.kmin and self._joinable(staged, running):
            # Room for both, and (by length) the staged requests fit the running batch's span:
            # they join it and nothing spills.
            for r in list(staged):
                pool.promote(r)
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
        spill = list(running) + [c for c in pool.candidates if self.by_length and not c.moving
                                 and not self._fits(lengths, c.kv_len) and not self._starving(c, now)]
        if not self._spill(pool, spill, now, offload):
            return False  # the host pool cannot take the running batch now
        for r in list(staged):
            pool.promote(r)
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

    def _rescue(self, pool: RequestPool, now: float, load: list, offload: list, decoded_last: list) -> None:
        """The starvation guard: overdue candidates on the device join the running batch (a
        full batch gives up its least aligned member among those that decoded last iteration,
        never one that just joined), and overdue parked requests load."""
        for c in [c for c in pool.candidates if not c.moving and self._starving(c, now)]:
            if len(pool.running) >= self.config.max_batch_size:
                others = [r for r in decoded_last if r in pool.running]
                if not others:
                    break
                center = statistics.median_low(r.kv_len for r in pool.running)
                victim = max(others, key=lambda r: abs(r.kv_len - center))
                if not self._spill(pool, [victim], now, offload):
                    return
            pool.promote(c)
        while len(pool.parked):
            r = pool.oldest_parked()[0]
            if not self._starving(r, now) or not self._reserve_device(r, headroom=0):
                return
            pool.to_device(r, as_candidate=True)
            load.append(r)

    def _spill(self, pool: RequestPool, requests: list[Request], now: float, offload: list) -> bool:
        """Book host blocks for these device requests and send them to the host; False (and
        nothing done) when the host pool cannot take them all."""
        blocks = [self.info.blocks_for(r.kv_len) for r in requests]
        if not self.ledger.can_reserve(HOST, sum(blocks)):
            return False
        for r, n in zip(requests, blocks):
            self.ledger.reserve(r.id, HOST, n)
            pool.to_host(r, now)
            offload.append(r)
        return True

    def _refill(self, pool: RequestPool, load: list) -> None:
        resident = [c for c in pool.candidates if not c.moving]
        if not pool.running and (pool.staged or not resident):
            return  # an empty running batch is replaced by the staged batch, not refilled
        room = self.config.max_batch_size - len(pool.running)
        center = statistics.median_low(r.kv_len for r in (pool.running or resident))
        for r in sorted(resident, key=lambda c: abs(c.kv_len - center)):
            if room <= 0:
                break
            pool.promote(r)
            room -= 1
        lengths = [r.kv_len for r in pool.running]
        for _ in range(room - len(pool.candidates)):
            r = self._pick_single(pool, center)
            if r is None:
                break
            if self.by_length and len(pool.parked) + len(pool.waiting) >= self.kmin and not self._fits(lengths, r.kv_len):
                # Leave the place open while there are enough requests (parked, or still to be
                # prefilled) to align from: once the batch is below Kmin, a staged batch replaces it.
                break
            if not self._reserve_device(r, headroom=0):
                break
            pool.to_device(r, as_candidate=True)
            load.append(r)

    def _admit(self, pool: RequestPool, now: float) -> tuple[list, list]:
        prefill: list[Request] = []
        park: list[Request] = []
        prompt_tokens = 0
        room = self.config.max_batch_size - len(pool.running)
        if self.prefill_device:  # joiners still prefilling elsewhere, or on their way, hold places
            room -= len(pool.candidates) + sum(1 for r in pool.prefilling if self.device in self.ledger.holds(r.id))
        lengths = [r.kv_len for r in pool.running]
        # The prompt's KV is computed where it is prefilled: on the prefill device, or on the
        # decode device (for a parked request, until its move to the host is done).
        at = self.prefill_device or self.device
        for r in self._admission_order(pool, lengths, room, now):
            if prefill and prompt_tokens + r.prompt_len > self.config.max_prefill_tokens:
                break
            blocks = self.info.blocks_for(r.prompt_len)
            if self.prefill_device and not self.ledger.can_reserve(at, blocks):
                break
            aligned = not lengths or not self.by_length or self._fits(lengths, r.prompt_len)
            if room > 0 and aligned and self._reserve_device(r, headroom=self._headroom(pool)):
                room -= 1
                lengths.append(r.prompt_len)
                if self.prefill_device:
                    self.ledger.reserve(r.id, at, blocks)
            else:
                # Parked once prefilled: blocks where it is prefilled until the move is done,
                # host blocks for it from now.
                if not (self.ledger.can_reserve(at, blocks) and self.ledger.can_reserve(HOST, blocks)):
                    break
                self.ledger.reserve(r.id, at, blocks)
                self.ledger.reserve(r.id, HOST, blocks)
                park.append(r)
            prefill.append(r)
            prompt_tokens += r.prompt_len
        pool.take_waiting(prefill)
        return prefill, park

    def _admission_order(self, pool: RequestPool, lengths: list[int], room: int, now: float) -> list[Request]:
        """Which waiting requests to prefill first. fcfs-offload: arrival order. aligned: those
        overdue (waiting max_wait_s / 2) in arrival order, then the ones whose prompt fits the
        running batch (or, with no running batch, the oldest request's length), nearest first, as
        many as there is room for; then the rest in arrival order, to be parked. Prefilling a
        fitting prompt straight into the batch spares it a trip through the host pool."""
        waiting = list(pool.waiting)
        if not self.by_length or room <= 0 or len(waiting) < 2:
            return waiting
        overdue = [r for r in waiting if now - r.arrival_time >= self.config.max_wait_s / 2]
        rest = [r for r in waiting if now - r.arrival_time < self.config.max_wait_s / 2]
        span = lengths or [(overdue or rest)[0].prompt_len]
        center = statistics.median_low(span)
        fit = sorted((r for r in rest if self._fits(span, r.prompt_len)), key=lambda r: abs(r.prompt_len - center))
        join = fit[:max(room - len(overdue), 0)]
        joining = set(join)  # Request compares by identity (eq=False)
        return overdue + join + [r for r in rest if r not in joining]

    def _stage(self, pool: RequestPool, load: list) -> None:
        if pool.staged or not len(pool.parked):
            return
        batch = [pool.get(i) for i in self._next_batch(pool)]
        running = [r.kv_len for r in pool.running]
        if (self.by_length and batch and len(running) >= self.kmin
                and alignment([r.kv_len for r in batch]) < alignment(running) + self.config.switch_margin):
            return  # not worth switching to: keep the device memory for a better batch
        for r in batch:
            if not self._reserve_device(r, headroom=0):
                break  # the device is full: stage what fits
            pool.to_device(r, as_candidate=False)
            load.append(r)

    # -- choosing requests --------------------------------------------------------------------

    def _next_batch(self, pool: RequestPool) -> tuple[str, ...]:
        """Ids of the next batch, best first."""
        parked = pool.parked
        kmax = self.config.max_batch_size
        if not self.by_length:
            return tuple(r.id for r in pool.oldest_parked(kmax))
        # Kmin is bounded by what Bmax holds: Kmin of the longest requests may not fit, and
        # then (halving) the largest such batch does, or those requests would wait for the
        # running batch to drain or for the starvation guard.
        k = self.kmin
        while k >= 1 and (k == self.kmin or len(parked) >= self.kmin):
            window = parked.densest(k, self.bmax, kmax)
            if window is not None:
                return window.request_ids
            k //= 2
        if pool.running:
            return ()  # too few parked requests to align: they are refilled one at a time
        # The device would idle: run what the pool holds, around its oldest request.
        return parked.around(pool.oldest_parked()[0].id, kmax, self.bmax).request_ids

    def _pick_single(self, pool: RequestPool, center: int) -> Request | None:
        if not len(pool.parked):
            return None
        if self.by_length:
            return pool.get(pool.parked.nearest(center))
        return pool.oldest_parked()[0]

    def _starving(self, r: Request, now: float) -> bool:
        return now - r.parked_since >= self.config.max_wait_s / 2

    # -- grants -------------------------------------------------------------------------------

    def _headroom(self, pool: RequestPool) -> int:
        """Device blocks kept free for the next staged batch while there is one to stage."""
        return self.bmax if not pool.staged and len(pool.parked) >= self.kmin else 0

    def _reserve_device(self, r: Request, headroom: int) -> bool:
        blocks = self.info.blocks_for(r.max_kv_len)
        if not self.ledger.can_reserve(self.device, blocks + headroom):
            return False
        self.ledger.reserve(r.id, self.device, blocks)
        return True


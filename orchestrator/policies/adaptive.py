"""Continuous batching that reads the engine's step cost: the default policy.

What the measurements said (DESIGN.md §7): a decode step's attention costs its KV bytes on a
kernel that splits long sequences, and batch size times the longest KV on one that does not
(this project's padded torch path, FlashAttention-2 varlen on an H100: bench/results/
decode_bubble-h100.log). Parking a request after its first token moves its wait into TPOT. So:

- **A started request is never parked.** KV for its longest sequence (prompt + max_tokens) is
  granted on admission, as fcfs and TensorRT-LLM's GUARANTEED_NO_EVICT do, so it is never
  preempted; it decodes every iteration until it finishes. All waiting happens before the first
  token (TTFT).
- **Whom to start is decided by the predicted cost.** Each iteration with free places, the
  policy considers caps M on the batch's longest KV: the running batch's longest, and each
  longer prompt among the oldest waiting requests. A cap splits the waiting requests into those
  that start now with the running batch (no longer than M, in arrival order, as many as there
  are places) and the longer ones, held to run later as a batch of their own. It prices both
  steps with the engine's step cost (`EngineInfo.step_costs`, fitted per attention path) and
  keeps the cap of the lowest seconds per token; no cap at all is the fcfs batch. Holding wins
  only where the longer prompts' padding of everyone's step costs more than a whole step of
  their own: on a kernel whose step costs batch x longest KV (this project's padded path), not
  where a step is a weight read plus its real KV (a split kernel, this CPU's paged kernels, a
  no-split GPU kernel whose long sequences run beside the others): there every place is filled
  in arrival order, as fcfs does. Held long prompts then start together, sharing their padding.
- **Held requests are bounded.** A request that has waited `max_wait_s / 2` is started ahead of
  the others, whatever the cost says; requests that do not fit the device's KV wait in arrival
  order as in fcfs (the head blocks the queue), so memory cannot starve a long one either.
- **Prompts in chunks.** Where the engine can (`can_chunk_prefill`) and its step cost says a chunk
  rides on the weight read of a decode step (`adaptive_chunks` "auto": a GPU's memory-bound
  decode, not this CPU's), prompts ride in the decode steps, at most `chunk_tokens` tokens a step
  with the decode tokens (Sarathi-Serve's budget), so a long prompt never stalls the running
  batch for a whole prefill: the running requests' TPOT stays near a decode step's.
- **Decode order.** Where the engine says the order of a batch changes its step time
  (`StepCost.order_matters`: a kernel that starts per-sequence work in launch order), the batch
  decodes longest first.

Without a step cost (an engine directory never profiled) it is fcfs. With `prefill_device` set
(a helper device, the paper's prefill GPU) prompts are prefilled there while the decode device
decodes, and their KV moves over the peer link, as disagg-fcfs does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.core import Decision, Request, StepPlan
from orchestrator.draft import Draft
from orchestrator.policies.base import Policy
from orchestrator.policies.chunked import admit_chunks, continue_chunks
from orchestrator.policies.fcfs import admit_in_order

if TYPE_CHECKING:
    from engines.base import EngineInfo
    from orchestrator.config import ServeConfig

CAPS = 16
"""Most caps on the longest KV priced per iteration (quantiles of the candidates' lengths): the
decision stays well under a millisecond with hundreds of requests waiting."""


class AdaptivePolicy(Policy):
    name = "adaptive"
    summary = ("continuous batching that prices each batch with the engine's step cost: groups by KV "
               "length where a step costs batch x longest KV, fills every place where it does not; "
               "a started request is never parked")
    parts = frozenset({"waiting", "running", "remote", "candidates", "chunks"})
    prefills_elsewhere = True

    def __init__(self, info: EngineInfo, config: ServeConfig):
        super().__init__(info, config)
        self.cost = info.step_costs[0] if info.step_costs else None
        """The step cost of the path the engine runs (None: not profiled; the policy is fcfs)."""
        self.prefill_device = config.prefill_device or None
        wanted = config.adaptive_chunks == "on" or (config.adaptive_chunks == "auto" and self._chunk_rides())
        self.chunked = info.capabilities.can_chunk_prefill and not self.prefill_device and wanted
        """Prompts ride in the decode steps in chunks of at most chunk_tokens a step (Sarathi-Serve),
        so no whole prompt stalls the running batch; else whole prompts, max_prefill_tokens a call."""

    def _chunk_budget(self, draft: Draft) -> int:
        """Prompt tokens this step may carry: chunk_tokens less the decode tokens (Sarathi-Serve's
        budget), or with a TPOT target the most whole blocks whose chunks keep the predicted step
        under it (at least one block, so a prompt under way always progresses). The chunks are
        priced as the rest of the oldest prompt under way (from where it stands), then new ones."""
        if not self.config.tpot_slo_s or self.cost is None:
            return self.config.chunk_tokens - len(draft.running)
        decode = self.cost.step_seconds([r.kv_len for r in draft.running])
        return self._tokens_within(draft, self.config.tpot_slo_s - decode)

    def _tokens_within(self, draft: Draft, left: float) -> int:
        """The most whole blocks of prompt whose chunks add at most `left` seconds to the step (at
        least one block), priced from where the oldest prompt under way stands, then new ones."""
        first = draft.prefilling[0] if draft.prefilling else None
        start, rest = (first.prefilled, first.prompt_len - first.prefilled) if first else (0, 0)
        bs = self.info.block_size
        lo, hi = 1, max(self.config.max_prefill_tokens // bs, 1)
        while lo < hi:  # the most blocks that fit (the price grows with the blocks)
            mid = (lo + hi + 1) // 2
            tokens = mid * bs
            if self._chunks_seconds([(start, start + min(tokens, rest)), (0, tokens - min(tokens, rest))]) <= left:
                lo = mid
            else:
                hi = mid - 1
        return lo * bs

    def _chunks_seconds(self, spans: list[tuple[int, int]]) -> float:
        """What prompt chunks [begin, end) add to a decode step: their tokens' linear layers as
        one chunk, plus each chunk's attention over the prompt before it."""
        spans = [(b, e) for b, e in spans if e > b]
        total = sum(e - b for b, e in spans)
        return self.cost.chunk_seconds(total) + sum(self.cost.chunk_seconds(e - b, b) - self.cost.chunk_seconds(e - b)
                                                    for b, e in spans if b)

    def _chunk_rides(self) -> bool:
        """A chunk of chunk_tokens prompt tokens adds at most one decode step's time to a step: its
        tokens ride on the weight read the step pays anyway (memory-bound decode, as on a GPU).
        Where the linear layers' compute grows with every token (this CPU: 0.28 ms a token against
        a 12.5 ms step), chunks only add steps, and whole prompts prefill faster."""
        if self.cost is None:
            return False
        return self.cost.chunk_seconds(self.config.chunk_tokens) <= self.cost.step_seconds([1])

    def schedule(self, draft: Draft) -> StepPlan:
        for r in [c for c in draft.candidates if not draft.moving(c)]:
            draft.promote(r)  # prefilled elsewhere, its KV landed: it joins the batch
        room = self.config.max_batch_size - len(draft.running)
        if self.prefill_device or self.chunked:  # places held by prompts under way, or on their way
            room -= len(draft.prefilling) + len(draft.candidates)
        chunks, budget = continue_chunks(draft, self._chunk_budget(draft)) if self.chunked else ([], 0)
        lengths = [r.kv_len for r in draft.running] + [r.prompt_len for r in draft.prefilling + tuple(draft.candidates)]
        window = _oldest(draft, 2 * max(room, 0) + 32) if room > 0 else []
        cap, held_reason = self._cap(lengths, window, room)
        order = self._order(draft, window, cap)
        if self.chunked:
            new = admit_chunks(draft, order, budget, room, self._grants) if room > 0 else []
            chunks += new
            admitted = [r for r, _, _ in new]
            prefill = []
        else:
            admitted = prefill = (admit_in_order(draft, self.config.max_prefill_tokens, room, self._grants, order=order)
                                  if room > 0 else [])
        decode = draft.running
        if self.cost is not None and self.cost.order_matters:
            decode = sorted(decode, key=lambda r: r.kv_len, reverse=True)
        self._explain(draft, decode, window, admitted, cap, held_reason, room, budget, [(b, e) for _, b, e in chunks])
        return draft.plan(prefill=prefill, prefill_on=self.prefill_device, decode=decode, chunks=chunks)

    # -- choosing the cap on the longest KV ---------------------------------------------------

    def _cap(self, lengths: list[int], window: list[Request], room: int) -> tuple[int | None, str]:
        """The cap on the longest KV to start requests under (None: no cap), and a sentence on
        what it saves. A cap m splits the oldest waiting requests into those that start now, with
        the running batch (S), and the longer ones held (H); its price is what running S now and
        H later as a batch of their own costs per token, t(S) + t(H) over |S| + |H|, against t of
        everyone together. So holding wins only where the longer prompts' padding of the batch
        costs more than a step of their own: a step costing batch x longest KV, not a weight
        read or a split kernel's real KV."""
        if self.cost is None or room <= 0 or not window:
            return None, ""
        longest = max(lengths, default=0)
        longer = sorted({r.prompt_len for r in window if r.prompt_len > longest})
        if not longer:
            return None, ""
        if len(longer) > CAPS:
            longer = [longer[(i * (len(longer) - 1)) // (CAPS - 1)] for i in range(CAPS)]
        caps = ([longest] if lengths else []) + longer
        best, best_cost, together = None, float("inf"), 0.0
        for m in caps:
            start = lengths + [r.prompt_len for r in window if r.prompt_len <= m][:room]
            held = [r.prompt_len for r in window if r.prompt_len > m][:room]
            per_token = (self.cost.step_seconds(start) + self.cost.step_seconds(held)) / (len(start) + len(held))
            if per_token <= best_cost:  # ties: the larger cap, which holds fewer
                best, best_cost = m, per_token
            together = per_token
        if best == caps[-1]:
            return None, ""
        return best, (f"starting those up to KV {best} now and the longer ones as a batch of their own costs "
                      f"{best_cost * 1e3:.2f} ms per token, {together * 1e3:.2f} all together")

    def _order(self, draft: Draft, window: list[Request], cap: int | None) -> list[Request]:
        """Whom to start, in order: those that have waited max_wait_s / 2 first, then the others
        under the cap in arrival order (the admission stops at the first that does not fit the
        device's KV: the oldest waits first, as in fcfs)."""
        overdue = [r for r in window if draft.now - r.arrival_time >= self.config.max_wait_s / 2]
        first = set(overdue)  # Request compares by identity (eq=False)
        return overdue + [r for r in window if r not in first and (cap is None or r.prompt_len <= cap)]

    def _grants(self, r: Request) -> list[tuple[str, int]]:
        """The longest KV on the decode device; the prompt on the prefill device, if any."""
        grants = [(self.device, self.info.blocks_for(r.max_kv_len))]
        if self.prefill_device:
            grants.append((self.prefill_device, self.info.blocks_for(r.prompt_len)))
        return grants

    def _explain(self, draft: Draft, decode: list[Request], window: list[Request], admitted: list[Request],
                 cap: int | None, held_reason: str, room: int, budget: int, spans: list[tuple[int, int]]) -> None:
        predicted = None
        if self.cost is not None and decode:  # the step the engine will run: decode, and the chunks riding in it
            predicted = self.cost.step_seconds([r.kv_len for r in decode])
            predicted += self._chunks_seconds(spans)
        if cap is not None:
            started = set(admitted)
            held = sum(1 for r in window if r.prompt_len > cap and r not in started)
            self.decision = Decision("grouped", f"{held} longer prompts wait: {held_reason}", predicted)
        elif admitted:
            how = "no step cost fitted" if self.cost is None else "more members are cheaper per token"
            self.decision = Decision("filled", f"started {len(admitted)} in arrival order ({how})", predicted)
        elif decode:
            if not len(draft.waiting):
                why = "nothing is waiting"
            elif room <= 0:
                why = "every place is taken"
            elif self.chunked and budget <= 0:
                why = "this step's chunk budget goes to prompts under way"
            else:
                why = "the device's KV is full"
            self.decision = Decision("filled" if not len(draft.waiting) else "waiting",
                                     f"decoding {len(decode)}; {why}", predicted)
        else:
            self.decision = Decision("idle", "nothing to decode", None)


def _oldest(draft: Draft, k: int) -> list[Request]:
    """The first k waiting requests in arrival order."""
    out = []
    for r in draft.waiting:
        if len(out) >= k:
            break
        out.append(r)
    return out

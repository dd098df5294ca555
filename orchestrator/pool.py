"""The request pool: every accepted, unfinished request, and where it stands.

- `waiting`: accepted, no KV yet, in arrival order.
- `prefilling`: admitted, prompt being prefilled (in chunks, or on a prefill device).
- `running`: the running batch, KV on the decode device.
- `staged`: the next batch, KV on (or loading to) the decode device.
- `candidates`: single requests loaded (or loading) to refill the running batch.
- `parked`: requests whose KV is resident in the host pool, indexed by KV length. A request on
  its way to the host is PARKED but not yet in the index, so nobody picks it mid-move.

Owned by the run loop thread, which moves requests between the parts only through these methods
(applying a policy's plan, then what the engine did), so a request is always in exactly one of
them. Each method also notes the transition in the request's history (the admin API shows it),
timed by the pool's clock. Policies never call them: they read the pool through a `Draft`.
"""
from __future__ import annotations

import heapq
import time
from collections import deque
from typing import AbstractSet, Callable, Iterator

from orchestrator.core import Request, RequestState
from orchestrator.length_index import NONE, LengthIndex


class RequestPool:
    """Waiting requests, the running batch, the staged batch, refill candidates, the host pool."""

    def __init__(self, max_len: int = 1, block_size: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        """Times the history entries: the run loop sets its own clock."""
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.staged: list[Request] = []
        self.candidates: list[Request] = []
        self.parked = LengthIndex(max(max_len, 1), max(block_size, 1))
        self._by_id: dict[str, Request] = {}
        self._ages: list[tuple[float, int, str]] = []  # heap of (parked_since, seq, id); stale entries skipped
        self._seq = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._by_id.values()))

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def add(self, request: Request) -> None:
        if request.id in self._by_id:
            raise KeyError(f"request id {request.id} is already in the pool")
        self._by_id[request.id] = request
        self.waiting.append(request)
        request.note(self.clock(), "waiting", f"queued for admission behind {len(self.waiting) - 1}")

    def take_waiting(self, requests: list[Request]) -> None:
        """These waiting requests are admitted (about to be prefilled): out of the queue."""
        taken = set(requests)  # Request compares by identity (eq=False)
        if taken:
            self.waiting = deque(r for r in self.waiting if r not in taken)
            now = self.clock()
            for r in requests:
                r.note(now, "admitted", "to be prefilled")

    def begin_prefill(self, request: Request) -> None:
        """An admitted request's prompt starts prefilling in chunks or on a prefill device."""
        request.state = RequestState.PREFILLING
        self.prefilling.append(request)
        request.note(self.clock(), "prefilling", f"{request.prompt_len} prompt tokens")

    def to_candidate(self, request: Request) -> None:
        """Its KV is (about to be) on its way to the decode device from a prefill device: it
        waits there as a candidate to join the running batch."""
        self._detach(request)
        request.state = RequestState.STAGED
        request.moving = True
        self.candidates.append(request)
        request.note(self.clock(), "candidate", f"prefilled; KV ({request.kv_len} tokens) moving to the decode device")

    def start(self, request: Request) -> None:
        """A request's prefill succeeded and it decodes from the next iteration: it joins the
        running batch."""
        request.state = RequestState.RUNNING
        self.running.append(request)
        # Prefilled requests bound for the host pool pass through here too: say what is certain.
        request.note(self.clock(), "prefilled", f"KV ({request.prompt_len} tokens) on the decode device")

    def to_host(self, request: Request, now: float) -> None:
        """The request's KV is (about to be) on its way to the host pool; the run loop starts
        the move."""
        self._detach(request)
        request.state = RequestState.PARKED
        # The wait the starvation guard bounds runs from the request's last token, not from this
        # move: a request sent back before it decoded keeps the time it already waited.
        request.parked_since = request.token_times[-1] if request.token_times else now
        request.moving = True  # from the moment it is planned: nobody may pick it until it lands
        request.note(now, "offloading", f"KV ({request.kv_len} tokens) moving to the host pool")

    def on_host(self, request: Request, at: float | None = None) -> None:
        """Its KV arrived in the host pool (at time `at`, default now): it becomes a candidate
        for batches."""
        # Weighed by the device blocks a load will grant it (its longest KV), so that the windows
        # the density-first search finds can be reserved.
        self.parked.insert(request.id, request.kv_len, self.parked.blocks_for(request.max_kv_len))
        self._seq += 1
        heapq.heappush(self._ages, (request.parked_since, self._seq, request.id))
        request.note(self.clock() if at is None else at, "parked", f"KV ({request.kv_len} tokens) in the host pool")

    def oldest_parked(self, k: int = 1, exclude: AbstractSet[str] = NONE) -> list[Request]:
        """The k parked requests that have waited longest, oldest first, passing over the ids in
        `exclude` (O((k + excluded) log n))."""
        ages, taken, kept, seen = self._ages, [], [], set()
        while ages and len(taken) < k:
            entry = heapq.heappop(ages)
            if self._current(entry) and entry[2] not in seen:  # else: it left the host pool since
                (kept if entry[2] in exclude else taken).append(entry)
                seen.add(entry[2])
        for entry in taken + kept:
            heapq.heappush(ages, entry)
        return [self._by_id[e[2]] for e in taken]

    def _current(self, entry: tuple[float, int, str]) -> bool:
        since, _, rid = entry
        r = self._by_id.get(rid)
        return r is not None and rid in self.parked and r.parked_since == since

    def to_device(self, request: Request, as_candidate: bool) -> None:
        """A parked request is picked: for the staged batch, or as a refill candidate."""
        self.parked.remove(request.id)
        request.state = RequestState.STAGED
        request.moving = True
        (self.candidates if as_candidate else self.staged).append(request)
        request.note(self.clock(), "loading", f"KV ({request.kv_len} tokens) moving to the decode device "
                     f"{'as a refill candidate' if as_candidate else 'for the staged batch'}")

    def promote(self, request: Request) -> None:
        """A staged request or a candidate joins the running batch."""
        origin = ("from the staged batch" if request in self.staged
                  else "as a refill candidate" if request in self.candidates else "after its prefill")
        self._detach(request)
        request.state = RequestState.RUNNING
        self.running.append(request)
        request.note(self.clock(), "running", f"joined the running batch {origin} (KV {request.kv_len} tokens)")

    def remove(self, request: Request) -> None:
        """Take a request out wherever it is (finish, cancel, error)."""
        if self._by_id.pop(request.id, None) is None:
            return
        self._detach(request)
        reason = request.finish_reason.value if request.finish_reason else "removed"
        request.note(self.clock(), "finished", f"{reason}: {request.error}" if request.error
                     else f"{reason} after {len(request.output_ids)} tokens")

    def _detach(self, request: Request) -> None:
        for part in (self.running, self.staged, self.candidates, self.prefilling):
            if request in part:
                part.remove(request)
                return
        if request.id in self.parked:
            self.parked.remove(request.id)
            return
        try:
            self.waiting.remove(request)
        except ValueError:
            pass  # admitted by the policy this iteration, not yet started

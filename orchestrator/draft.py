"""A plan being made: what a policy reads and where it writes its decisions.

A policy never touches the pool or the ledger. The run loop hands it a `Draft` of the pool; the
policy reads the parts through it and records each decision on it (admit, grant KV, promote,
offload, load). The draft shows the pool as the decisions so far would leave it, so a policy
deciding in several passes (a switch, then refills, then a staged batch) sees its own earlier
choices, while the real pool and ledger stay as they were. `draft.plan(...)` returns the
finished `StepPlan`; the run loop applies it to the pool and the ledger, then executes it.

    draft = Draft(pool, ledger, now=clock())
    plan = policy.schedule(draft)        # reads and records; pool and ledger unchanged
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from orchestrator.core import Grant, Request, StepPlan
from orchestrator.length_index import Window

if TYPE_CHECKING:
    from orchestrator.kv_ledger import KVLedger
    from orchestrator.pool import RequestPool


class WaitingQueue:
    """The pool's waiting queue less the requests this plan has admitted, in arrival order; read
    in place (the queue may be long: nothing is copied each iteration)."""

    __slots__ = ("_queue", "_admitted")

    def __init__(self, queue: Iterable[Request], admitted: set[Request]):
        self._queue = queue
        self._admitted = admitted

    def __iter__(self) -> Iterator[Request]:
        if not self._admitted:
            return iter(self._queue)
        return (r for r in self._queue if r not in self._admitted)

    def __len__(self) -> int:
        return len(self._queue) - len(self._admitted)


class Draft:
    """The pool and the ledger as one iteration's decisions so far would leave them."""

    __slots__ = ("now", "_pool", "_ledger", "_admitted", "waiting", "prefilling", "running", "staged", "candidates",
                 "_left_host", "_moving", "_booked", "_admit", "_grants", "_promote", "_offload", "_load", "_stage")

    def __init__(self, pool: RequestPool, ledger: KVLedger, now: float):
        self.now = now
        """The run loop's clock when planning began (waits and ages are measured against it)."""
        self._pool = pool
        self._ledger = ledger
        self._admitted: set[Request] = set()  # Request compares by identity (eq=False)
        self.waiting = WaitingQueue(pool.waiting, self._admitted)
        """Accepted requests without KV, in arrival order, less those admitted by this plan."""
        self.prefilling: tuple[Request, ...] = tuple(pool.prefilling)
        """Requests whose prompts are being prefilled (in chunks, or on another device)."""
        self.running: list[Request] = list(pool.running)
        """The running batch, with this plan's promotions and less its offloads."""
        self.staged: list[Request] = list(pool.staged)
        self.candidates: list[Request] = list(pool.candidates)
        self._left_host: set[str] = set()  # ids this plan loads out of the host pool
        self._moving: set[str] = set()  # ids whose KV this plan starts moving
        self._booked: dict[str, int] = {}  # tier -> blocks granted by this plan
        self._admit: list[Request] = []
        self._grants: list[Grant] = []
        self._promote: list[Request] = []
        self._offload: list[Request] = []
        self._load: list[Request] = []
        self._stage: list[Request] = []

    # ---- reading ------------------------------------------------------------------------------

    def get(self, request_id: str) -> Request | None:
        return self._pool.get(request_id)

    def moving(self, request: Request) -> bool:
        """Its KV is on its way between tiers (already, or by this plan): it cannot decode yet."""
        return request.moving or request.id in self._moving

    @property
    def parked(self) -> int:
        """Requests in the host pool that this plan has not picked."""
        return len(self._pool.parked) - len(self._left_host)

    def oldest_parked(self, k: int = 1) -> list[Request]:
        """The k requests in the host pool that have waited longest, oldest first."""
        return self._pool.oldest_parked(k, exclude=self._left_host)

    def nearest_parked(self, length: int) -> Request | None:
        """A request in the host pool whose KV length is closest to `length`."""
        rid = self._pool.parked.nearest(length, exclude=self._left_host)
        return None if rid is None else self._pool.get(rid)

    def densest_parked(self, kmin: int, block_budget: int, kmax: int) -> Window | None:
        """The density-first search over the host pool (`LengthIndex.densest`). Each parked
        request counts the device blocks a load grants it (its longest KV), so `block_budget` is
        in those blocks and a window found can be reserved if that many are free."""
        return self._pool.parked.densest(kmin, block_budget, kmax, exclude=self._left_host)

    def parked_around(self, request: Request, kmax: int, block_budget: int) -> Window:
        """`request` and the parked requests nearest to it in KV length (`LengthIndex.around`)."""
        return self._pool.parked.around(request.id, kmax, block_budget, exclude=self._left_host)

    def can_reserve(self, tier: str, blocks: int) -> bool:
        return blocks <= self._ledger.free(tier) - self._booked.get(tier, 0)

    def free(self, tier: str) -> int:
        """Blocks of `tier` no one is granted, this plan's grants counted."""
        return self._ledger.free(tier) - self._booked.get(tier, 0)

    def holds(self, request: Request) -> dict[str, int]:
        """Blocks the request is granted per tier, this plan's grants included."""
        held = self._ledger.holds(request.id)
        for g in self._grants:
            if g.request is request:
                held[g.tier] = held.get(g.tier, 0) + g.blocks
        return held

    # ---- deciding -----------------------------------------------------------------------------

    def reserve(self, request: Request, tier: str, blocks: int) -> None:
        """Grant `blocks` KV blocks in `tier`; check `can_reserve` first."""
        if not self.can_reserve(tier, blocks):
            raise ValueError(f"cannot grant {blocks} blocks in {tier} to {request.id}: "
                             f"{self._ledger.free(tier) - self._booked.get(tier, 0)} free")
        self._booked[tier] = self._booked.get(tier, 0) + blocks
        self._grants.append(Grant(request, tier, blocks))

    def admit(self, requests: Sequence[Request]) -> None:
        """These waiting requests leave the queue to be prefilled (whole or in chunks); call it
        once the policy is done walking `waiting`."""
        self._admitted.update(requests)
        self._admit.extend(requests)

    def promote(self, request: Request) -> None:
        """A staged request or a refill candidate joins the running batch."""
        for part in (self.staged, self.candidates):
            if request in part:
                part.remove(request)
                break
        self.running.append(request)
        self._promote.append(request)

    def offload(self, request: Request) -> None:
        """A request on the decode device goes to the host pool (book its host blocks first)."""
        for part in (self.running, self.staged, self.candidates):
            if request in part:
                part.remove(request)
                break
        self._moving.add(request.id)
        self._offload.append(request)

    def load(self, request: Request, stage: bool) -> None:
        """A parked request goes to the decode device: for the staged batch (`stage`), or as a
        refill candidate (book its device blocks first)."""
        self._left_host.add(request.id)
        self._moving.add(request.id)
        (self.staged if stage else self.candidates).append(request)
        self._load.append(request)
        if stage:
            self._stage.append(request)

    def plan(self, *, decode: Iterable[Request] = (), prefill: Sequence[Request] = (), park: Sequence[Request] = (),
             wait: Sequence[Request] = (), chunks: Sequence[tuple[Request, int, int]] = (),
             prefill_on: str | None = None, switch: bool = False) -> StepPlan:
        """The finished plan: the decisions recorded here, and what the engine is to run."""
        return StepPlan(admit=_frozen(self._admit), grants=_frozen(self._grants), promote=_frozen(self._promote),
                        offload=_frozen(self._offload), load=_frozen(self._load), stage=_frozen(self._stage),
                        prefill=_frozen(prefill), park=_frozen(park), wait=_frozen(wait), decode=tuple(decode),
                        chunks=_frozen(chunks), prefill_on=prefill_on, switch=switch)


def _frozen(items: Sequence) -> tuple:
    return tuple(items) if items else ()  # most parts of most plans are empty: skip the call

"""Shared nouns every layer of the orchestrator speaks: requests, their states, stream events,
and the step plan a policy hands to the run loop."""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from engines.base import SamplingParams

__all__ = [
    "SamplingParams",
    "RequestState",
    "FinishReason",
    "Request",
    "TokenEvent",
    "Grant",
    "StepPlan",
    "RequestRejected",
    "PolicySwitchRefused",
    "HISTORY_LIMIT",
]

HISTORY_LIMIT = 64
"""Most entries a request's history keeps (the newest; a request spilled and reloaded many
times would otherwise grow it without bound)."""


class RequestRejected(ValueError):
    """A request was refused before it was accepted: `field` names the offending input and
    `message` says what limit it broke and what to do."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)  # both in args: the exception pickles (process pools)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class PolicySwitchRefused(RuntimeError):
    """A runtime policy switch was refused: this engine cannot run the policy, or requests in
    the pool sit where the new policy never looks (they would wait forever). The message says
    which and what to do."""


class RequestState(enum.Enum):
    WAITING = "waiting"
    """Accepted, no KV yet."""
    PREFILLING = "prefilling"
    """Admitted, its prompt being prefilled: in chunks on the decode device (chunked prefill), or
    whole on a prefill device (disaggregated prefill). No token yet."""
    RUNNING = "running"
    """KV on the decode device, decoding each iteration."""
    PARKED = "parked"
    """KV in the host pool (or on its way there), waiting to be picked for a batch."""
    STAGED = "staged"
    """KV on the decode device (or on its way there), picked for the next batch or as a refill
    of the running batch, not decoding yet."""
    FINISHED = "finished"
    """Terminal: stopped, cancelled or failed. Holds no KV."""


class FinishReason(str, enum.Enum):
    STOP = "stop"
    """end_id or a stop word was generated."""
    LENGTH = "length"
    """max_tokens reached, or the KV reached the model's max sequence length."""
    CANCELLED = "cancelled"
    """The client or an operator cancelled it."""
    ERROR = "error"
    """The engine failed on it; the event carries the message."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """What a request's stream receives: new tokens, and on the last event a finish reason."""

    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: tuple[float, ...] = ()
    """Each token's log probability, where the request asked (`SamplingParams.logprobs`)."""

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False, slots=True)
class Request:
    """One generation request and everything that happens to it. State lives here; the policy
    and the ledger only look at it."""

    id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: frozenset[int] = frozenset()
    """Generating any of these finishes the request; the token is not part of the output."""
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    """Token sequences that finish the request once the output ends with one (kept in output)."""
    on_event: Callable[[TokenEvent], None] | None = None
    """Called from the run loop thread for every event; must not block."""

    state: RequestState = RequestState.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    """Log probability of each output token, where the request asked (`SamplingParams.logprobs`)."""
    finish_reason: FinishReason | None = None
    error: str | None = None
    moving: bool = False
    """A move of its KV between tiers is under way; it cannot decode or move again until done."""
    prefilled: int = 0
    """Prompt tokens whose KV is computed so far, while its prompt is prefilled in chunks."""
    parked_since: float = 0.0
    """Start of its current wait in the host pool (run-loop clock): its last token's time. The
    starvation guard bounds now - parked_since."""
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LIMIT))
    """(time, event, detail) of each state transition, run-loop clock, the newest HISTORY_LIMIT;
    written by the run loop thread (the pool's methods), read by the admin API."""

    def note(self, t: float, event: str, detail: str = "") -> None:
        """Add a history entry."""
        self.history.append((t, event, detail))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def kv_len(self) -> int:
        """Tokens in the KV cache: the prompt plus every generated token but the newest, which is
        fed at the next decode step."""
        return self.prompt_len + max(len(self.output_ids) - 1, 0)

    @property
    def max_kv_len(self) -> int:
        """The longest the KV can grow: the last generated token is never fed back."""
        return self.prompt_len + self.max_tokens - 1

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass(frozen=True, slots=True)
class Grant:
    """KV blocks a plan books for a request in one tier (the ledger's side of the books)."""

    request: Request
    tier: str
    blocks: int


@dataclass(frozen=True, slots=True)
class Decision:
    """Why a policy planned its last iteration as it did, for the dashboard and the metrics."""

    kind: str
    """One word: "filled" (every place the batch has was filled in arrival order), "grouped"
    (requests were held back or chosen so the batch's KV lengths stay close), "switched" (the
    staged batch replaced the running one), "preempted" (a running request gave up its place),
    "waiting" (nothing could start: memory or the batch is full), "idle"."""
    reason: str
    """One sentence with the figures behind it."""
    predicted_s: float | None = None
    """The decode step's predicted seconds (the engine's step cost), None without a cost model."""


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One iteration as a policy decided it.

    The run loop first applies the decisions about the pool and the ledger (`admit`, `grants`,
    `offload`, `promote`, `load`), then has the engine carry the plan out, in this order: start
    the moves, prefill, park the prefilled requests that do not join the running batch, wait for
    the loads the decode needs, decode."""

    admit: Sequence[Request] = ()
    """Waiting requests leaving the queue this iteration: prefilled whole (`prefill`) or in
    chunks (`chunks` starting at 0)."""
    grants: Sequence[Grant] = ()
    """KV blocks booked for this plan's requests."""
    promote: Sequence[Request] = ()
    """Staged requests or refill candidates joining the running batch."""
    prefill: Sequence[Request] = ()
    park: Sequence[Request] = ()
    """Requests of `prefill` whose KV goes to the host pool once prefilled."""
    offload: Sequence[Request] = ()
    """Device -> host now: running members spilled by a switch, or staged requests given back."""
    load: Sequence[Request] = ()
    """Host -> device now: the next batch, or candidates to refill the running batch."""
    stage: Sequence[Request] = ()
    """The requests of `load` that form the next batch; the others are refill candidates."""
    wait: Sequence[Request] = ()
    """Loads that must finish before this decode; the time spent waiting is the bubble."""
    decode: Sequence[Request] = ()
    prefill_on: str | None = None
    """Device `prefill` runs on: None for the decode device. Another device (a disaggregated
    prefill GPU) prefills while the decode device goes on; when it is done, the KV moves to the
    decode device (the request becomes a candidate until it lands) or, for `park`, to the host."""
    chunks: Sequence[tuple[Request, int, int]] = ()
    """(request, start, end): prompt positions prefilled in this iteration's decode step
    (chunked prefill); the chunk that ends the prompt gives the first token and the request
    joins the running batch."""
    switch: bool = False
    """The running batch was replaced by the staged batch this iteration."""

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.offload or self.load or self.wait or self.decode or self.chunks)

"""What every scheduling policy is: a class that turns a `Draft` of the pool into a `StepPlan`,
and declares what it needs to run.

A policy decides; it does not mutate. It reads the pool and the ledger through the draft and
records its decisions there; the run loop applies the plan. Its class attributes are what the
registry (`orchestrator.policies`) reads for config validation, the runtime policy switch, the
dashboard and the benchmarks.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from orchestrator.core import Decision, StepPlan
from orchestrator.draft import Draft

if TYPE_CHECKING:
    from engines.base import EngineInfo
    from orchestrator.config import ServeConfig

PARTS = ("waiting", "running", "remote", "chunks", "candidates", "staged", "parked")
"""The parts of the pool a policy may schedule from. "remote": a prompt prefilling on another
device (its KV then becomes a candidate, or parked); "chunks": a prompt prefilled in chunks
inside the decode steps; "parked": KV in the host pool (or on its way there)."""


@dataclass(frozen=True, slots=True)
class Needs:
    """What a policy needs of the engine."""

    host_pool: bool = False
    """A host KV pool to offload to (can_offload and host blocks > 0)."""
    chunked_prefill: bool = False
    """`mixed_step`: prompts prefilled in chunks inside decode steps (can_chunk_prefill)."""
    helper_device: bool = False
    """A second device to prefill on, and peer copies to the decode device (can_peer_copy)."""


class Policy(abc.ABC):
    """A scheduling policy. Subclasses set the class attributes and write `schedule`."""

    name: ClassVar[str]
    """The name in config (`ALIGNED_POLICY`), the admin API and the benchmarks."""
    summary: ClassVar[str]
    """One line on what it does, for the dashboard and `docs/ARCHITECTURE.md`."""
    parts: ClassVar[frozenset[str]]
    """The parts of the pool (`PARTS`) it schedules from. A runtime switch to it is refused while
    requests sit anywhere else: they would wait there forever."""
    needs: ClassVar[Needs] = Needs()
    prefills_elsewhere: ClassVar[bool] = False
    """It can prefill on a helper device (`prefill_device`)."""
    fallback: ClassVar[str | None] = None
    """The policy to run instead, with a warning, on an engine without its `needs.host_pool`."""

    def __init__(self, info: EngineInfo, config: ServeConfig):
        self.info = info
        self.config = config
        self.device = info.decode_device
        self.decision: Decision | None = None
        """Why the last plan is what it is (`Decision`); a policy that explains itself sets it in
        `schedule`, the run loop records it beside the step's measured time."""

    @abc.abstractmethod
    def schedule(self, draft: Draft) -> StepPlan:
        """Decide the next iteration: record the decisions on `draft` and return `draft.plan(...)`."""

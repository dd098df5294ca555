"""The TensorRT-LLM engine's books: where each request is, which stream carries its tokens, and
which moves are in flight. TensorRT-LLM keeps its own state; these are what the engine contract
needs on top (tiers, tokens already handed to the orchestrator, submissions)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engines.base import SamplingParams, TransferHandle


@dataclass(slots=True)
class RequestState:
    """The engine's books on one request."""

    rid: str
    prompt: tuple[int, ...]
    sampling: SamplingParams
    tier: str
    max_new: int
    """The most tokens it may generate in all (the client's max_tokens, bounded by max_seq_len):
    each submission asks TensorRT-LLM for what is left of it, which is what it reserves KV for."""
    generated: list[int] = field(default_factory=list)
    """Tokens the orchestrator has received."""
    stream: str | None = None
    """Key of the current decode-side stream."""
    ctx_stream: str | None = None
    """Key of the context_only stream on the prefetch instance."""
    submissions: int = 0
    complete: bool = False
    """TensorRT-LLM already produced every token this request can get (it reached max_new or
    max_seq_len while the orchestrator read behind): they wait in `stream`, and no KV is held for it anywhere."""

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt + tuple(self.generated)

    @property
    def remaining(self) -> int:
        """Tokens it may still generate."""
        return self.max_new - len(self.generated)


@dataclass(slots=True)
class PendingMove:
    """A move the engine started and has not seen land yet."""

    kind: str
    """"park", "resume" or "handoff"."""
    handle: TransferHandle
    started: float
    done: bool = False

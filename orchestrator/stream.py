"""A blocking view of one request's events, for callers that are not streaming servers
(benchmarks, tests, scripts)."""
from __future__ import annotations

import queue
from typing import Iterator

from orchestrator.core import FinishReason, TokenEvent


class TokenStream:
    """Pass as `on_event`; then iterate the events, or wait for the whole result."""

    def __init__(self) -> None:
        self._q: queue.Queue[TokenEvent] = queue.Queue()
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None

    def __call__(self, event: TokenEvent) -> None:
        self._q.put(event)

    def events(self, timeout: float = 60.0) -> Iterator[TokenEvent]:
        while self.finish_reason is None:
            try:
                event = self._q.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no event for {timeout}s") from None
            self.token_ids.extend(event.token_ids)
            if event.final:
                self.finish_reason, self.error = event.finish_reason, event.error
            yield event

    def result(self, timeout: float = 60.0) -> list[int]:
        """All generated token ids once the request has finished."""
        for _ in self.events(timeout):
            pass
        return self.token_ids

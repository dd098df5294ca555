"""The request pool: every accepted, unfinished request, waiting or running.

Owned by the run loop thread; other threads reach it only through the run loop's inbox.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

from orchestrator.core import Request, RequestState


class RequestPool:
    """Waiting requests in arrival order, and the running batch."""

    def __init__(self) -> None:
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}

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

    def start(self, request: Request) -> None:
        """A waiting request's prefill succeeded: it joins the running batch."""
        request.state = RequestState.RUNNING
        self.running.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out wherever it is (finish, cancel, error)."""
        if self._by_id.pop(request.id, None) is None:
            return
        if request in self.running:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass  # admitted by the policy this iteration, not yet started

"""Each submitted request's output stream, drained into a queue of tokens.

The executor decodes every admitted request every iteration, whether or not the orchestrator
asked for that request's token yet, so tokens are buffered here and handed out one per
`decode`. Streams are submitted and read on one asyncio loop in a background thread: the LLM
API's results are async-iterable when created where an event loop runs.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from engines.base import EngineError


@dataclass(slots=True)
class _Stream:
    tokens: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)
    output: Any = None
    """The RequestOutput, once submitted (abort goes through it)."""
    disaggregated_params: Any = None
    """From the last output (a context-only request's hand-off)."""
    ended: bool = False
    submitted: threading.Event = field(default_factory=threading.Event)


class TokenStreams:
    """Streams by key; one background loop reads them all."""

    def __init__(self, timeout_s: float = 120.0):
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trtllm-streams", daemon=True)
        self._thread.start()
        self._streams: dict[str, _Stream] = {}

    def open(self, key: str, submit: Callable[[], Any], skip: int = 0) -> None:
        """Call `submit()` (which returns a RequestOutput) on the loop and drain it; the first
        `skip` tokens of the stream are dropped. A failing submit is raised here."""
        if key in self._streams:
            raise EngineError(f"stream {key!r} is already open")
        s = self._streams[key] = _Stream()
        fut = asyncio.run_coroutine_threadsafe(self._drain(s, submit, skip), self._loop)
        if not s.submitted.wait(self.timeout_s):
            fut.cancel()
        if s.output is None:
            del self._streams[key]
            kind, err = s.tokens.get() if not s.tokens.empty() else ("error", TimeoutError("submit timed out"))
            raise EngineError(f"submitting {key!r} to TensorRT-LLM failed: {err}") from err

    async def _drain(self, s: _Stream, submit: Callable[[], Any], skip: int) -> None:
        try:
            s.output = submit()
        except Exception as e:
            s.tokens.put(("error", e))
            s.submitted.set()
            return
        s.submitted.set()
        seen = 0
        try:
            async for out in s.output:
                done = out.outputs[0]
                if getattr(done, "disaggregated_params", None) is not None:  # before its token is seen
                    s.disaggregated_params = done.disaggregated_params
                ids = list(done.token_ids)
                for t in ids[max(seen, skip):]:
                    s.tokens.put(("token", int(t)))
                seen = max(seen, len(ids))
            s.tokens.put(("end", None))
        except Exception as e:  # noqa: BLE001 - reported to the caller of next_token
            s.tokens.put(("error", e))

    def next_token(self, key: str, op: str, request_id: str) -> int:
        """The stream's next token, waiting for it; EngineError if it ended or failed instead."""
        s = self._streams.get(key)
        if s is None:
            raise EngineError(f"{op}: request {request_id!r} has no running stream")
        try:
            kind, value = s.tokens.get(timeout=self.timeout_s)
        except queue.Empty:
            raise EngineError(f"{op}: request {request_id!r}: no token from TensorRT-LLM in "
                              f"{self.timeout_s}s") from None
        if kind == "token":
            return value
        s.ended = True
        s.tokens.put((kind, value))  # stays ended for later calls
        if kind == "end":
            raise EngineError(f"{op}: request {request_id!r} ended in TensorRT-LLM (max_tokens reached or aborted)")
        raise EngineError(f"{op}: request {request_id!r} failed in TensorRT-LLM: {value}") from value

    def has_token(self, key: str) -> bool:
        """A token (or the end) is waiting, so `next_token` will not block."""
        s = self._streams.get(key)
        return s is not None and not s.tokens.empty()

    def ended(self, key: str) -> bool:
        """The stream has delivered its last output (normal end, abort or error)."""
        s = self._streams.get(key)
        if s is None:
            return True
        return s.ended or any(kind != "token" for kind, _ in list(s.tokens.queue))

    def ended_with_all_tokens(self, key: str) -> int | None:
        """If the stream ended normally (no error), the number of tokens still waiting in it; else None.
        Such a stream holds every token its request will ever get: nothing more runs in TensorRT-LLM."""
        s = self._streams.get(key)
        if s is None:
            return None
        items = list(s.tokens.queue)
        if not items or items[-1][0] != "end":
            return None
        return sum(1 for kind, _ in items if kind == "token")

    def disaggregated_params(self, key: str) -> Any:
        s = self._streams.get(key)
        return None if s is None else s.disaggregated_params

    def abort(self, key: str) -> None:
        """Ask TensorRT-LLM to end the request; the stream then ends by itself."""
        s = self._streams.get(key)
        if s is not None and s.output is not None and not s.ended:
            s.output.abort()

    def close(self, key: str) -> None:
        """Abort (if still running) and forget the stream. Unknown keys are ignored."""
        self.abort(key)
        self._streams.pop(key, None)

    def keys(self) -> tuple[str, ...]:
        return tuple(self._streams)

    def shutdown(self) -> None:
        for key in list(self._streams):
            self.close(key)
        if not self._loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""Stop strings matched on the generated text, for every serving path.

A stop string is text, and text does not map to one token sequence: " world" may be one token
after "hello" and two after "hello,", and a byte-level tokenizer splits a character over several
tokens. So the match is made on the detokenized text, never on token ids. Text that could be
the start of a stop string is held back until the next tokens say whether it is; a client never
receives text it would have to take back.

    output = TextOutput(tokenizer, stop=("\\n\\n",), on_stop=stop_request)
    for event in events:                   # the orchestrator's TokenEvents of one request
        piece = output.feed(event)
        if piece is None:                  # ended by a stop string; the rest is dropped
            continue
        send(piece.text, piece.finish_reason)

On a match the text is cut (`keep_stop`: after the stop string, as TensorRT-LLM's Triton models
answer; otherwise before it, as OpenAI and vLLM do), the output finishes with reason "stop", and
`on_stop(request_id)` ends the request in the orchestrator (`stop_request` below: with reason
"stop"), which frees its KV. Tokens the engine made before that landed are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from tokenizers import Tokenizer

from orchestrator.core import FinishReason, TokenEvent
from serving.detokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from orchestrator.service import Orchestrator


class StopMatcher:
    """Finds the first stop string in text that arrives in pieces.

    `push` returns the text that is final: everything up to the match, or everything except a
    tail that is the beginning of some stop string. The first stop string to be completed wins
    (the earliest end; at the same end the longest), whatever the pieces' boundaries were."""

    def __init__(self, stops: Sequence[str], keep_stop: bool = False):
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self.keep_stop = keep_stop
        self.matched: str | None = None
        """The stop string found, once one is."""
        self._held = ""

    def push(self, text: str) -> str:
        if self.matched is not None:
            return ""
        buf = self._held + text
        if not self.stops:
            return buf
        # Only the held tail can start a match: anything released earlier started no stop string.
        found = None
        for s in self.stops:
            at = buf.find(s)
            if at >= 0 and (found is None or (at + len(s), at) < (found[0] + len(found[1]), found[0])):
                found = (at, s)
        if found is not None:
            at, self.matched = found
            self._held = ""
            return buf[:at + len(self.matched)] if self.keep_stop else buf[:at]
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """The held tail, at the end of generation: it turned out to start no stop string."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest tail of `buf` that some stop string begins with."""
        longest = min(len(buf), max(len(s) for s in self.stops) - 1)
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


@dataclass(frozen=True, slots=True)
class Piece:
    """What one token event adds to a request's output."""

    text: str
    token_ids: tuple[int, ...]
    """The tokens behind it (after a stop string: up to the token that completed it)."""
    finish_reason: str | None = None
    """None while it goes on; then "stop", "length", "cancelled" or "error"."""
    error: str | None = None
    logprobs: tuple[float, ...] = ()
    """The log probabilities of `token_ids`, where the request asked for them."""


class TextOutput:
    """One request's output as text: token events in, pieces of final text out, stop strings
    applied (see the module docstring). Used by one thread at a time."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), keep_stop: bool = False,
                 on_stop: Callable[[str], None] | None = None):
        """on_stop(request_id): called once when a stop string ends the output early; it ends the
        request in the orchestrator (`stop_request`)."""
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stop, keep_stop)
        self._on_stop = on_stop
        self.finished = False
        self.token_count = 0
        """Tokens of the output so far (the ones after a stop string's not counted)."""

    def feed(self, event: TokenEvent) -> Piece | None:
        """The piece `event` adds; None once the output has finished."""
        if self.finished:
            return None
        if event.error is not None or (event.final and event.finish_reason.value in ("cancelled", "error")):
            self.finished = True
            return Piece("", (), event.finish_reason.value, event.error)
        text, ids = [], []
        for token in event.token_ids:  # one at a time: a stop string may end inside the event
            ids.append(token)
            text.append(self._stops.push(self._detok.push((token,))))
            if self._stops.matched is not None:
                return self._stopped("".join(text), ids, event)
        if event.final:
            text.append(self._stops.push(self._detok.flush()))
            if self._stops.matched is not None:
                return self._stopped("".join(text), ids, event)
            text.append(self._stops.flush())
            self.finished = True
        self.token_count += len(ids)
        return Piece("".join(text), tuple(ids), event.finish_reason.value if event.final else None,
                     logprobs=event.logprobs)

    def _stopped(self, text: str, ids: list[int], event: TokenEvent) -> Piece:
        self.finished = True
        self.token_count += len(ids)
        if not event.final and self._on_stop is not None:
            self._on_stop(event.request_id)
        return Piece(text, tuple(ids), "stop", logprobs=event.logprobs[:len(ids)])


def stop_request(orchestrator: Orchestrator) -> Callable[[str], None]:
    """The `on_stop` for requests of `orchestrator`: the request ends with reason "stop" (its
    output is complete), not "cancelled", in the orchestrator's books and the dashboard."""
    return lambda request_id: orchestrator.cancel(request_id, FinishReason.STOP)

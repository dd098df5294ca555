"""The three clients, each reading one stream as a real client does and recording everything
that arrives: tokens (ids over Triton, text over OpenAI), final responses, anything after the
final one, errors, and when each came.

A client never decides whether the stream was right; `checks.py` compares the record with the
reference. What it does decide is how the stream ended: "final" (a final response or a final
error arrived), "cancelled" (this client cancelled it), "refused" (an HTTP status other
than 200), "lost" (no final answer by the
deadline; the client then gives up and closes the stream). A final error is a "final" end
with `error` set; `checks.py` tells a refusal, an injected fault and a failure apart."""
from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from bench.soak.workload import Job, Spec

MODEL = "aligned_llm"
_ids = itertools.count()


@dataclass
class Record:
    """What one stream got."""

    job: Job
    start: float
    end: str = "lost"
    """How it ended: final, cancelled, refused, lost (see the module docstring)."""
    tokens: list = field(default_factory=list)
    """Token ids (Triton) or text pieces (OpenAI), in arrival order."""
    pieces: list = field(default_factory=list)
    """Each response's tokens, as it came: duplicates show here."""
    first_at: float | None = None
    end_at: float | None = None
    finish_reason: str | None = None
    finals: int = 0
    late: int = 0
    """Responses after the final one (on the same stream or connection)."""
    error: str | None = None
    status: int | None = None
    """HTTP status of a refused request."""
    usage_tokens: int | None = None
    """OpenAI's usage.completion_tokens."""

    def got(self, new: list, now: float) -> None:
        if self.finals:
            self.late += 1
            return
        if new and self.first_at is None:
            self.first_at = now
        self.tokens.extend(new)
        self.pieces.append(list(new))

    def final(self, now: float, reason: str | None = None, error: str | None = None) -> None:
        self.finals += 1
        if self.finals == 1:
            self.end, self.end_at, self.finish_reason, self.error = "final", now, reason, error

    @property
    def n_tokens(self) -> int:
        if self.job.protocol == "openai" and self.usage_tokens is not None:
            return self.usage_tokens
        return len(self.tokens)  # an OpenAI stream cut short: its text pieces, about a token each


# ---- Triton gRPC -----------------------------------------------------------------------------

def _tensor(name: str, value, dtype) -> grpcclient.InferInput:
    arr = np.array([[value]], dtype=dtype)
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


def triton_body(spec: Spec, change: dict | None = None) -> dict:
    """aligned_llm's inputs for `spec` (HTTP's JSON; gRPC sends the same as tensors)."""
    body = {"text_input": spec.prompt, "max_tokens": spec.max_tokens, "stream": True}
    if spec.temperature:
        body["temperature"] = spec.temperature
    return _sampled(body, spec, change)


def _sampled(body: dict, spec: Spec, change: dict | None) -> dict:
    """`body` with the spec's seed and top_k where it samples, then `change` applied (a None
    value removes the field): the part both protocols' bodies share."""
    if spec.temperature:
        body["seed"] = spec.seed
        if spec.top_k:
            body["top_k"] = spec.top_k
    for k, v in (change or {}).items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    return body


_GRPC_TYPES = {"text_input": object, "max_tokens": np.int32, "stream": bool, "temperature": np.float32,
               "top_k": np.int32, "top_p": np.float32, "seed": np.uint64}


class GrpcClient:
    """One gRPC bidirectional stream, reused for a worker's requests one after another; a cancel
    closes it (stop_stream(cancel_requests=True)) and the next request opens a new one. A
    response for a request that already had its final one counts as late for that request."""

    def __init__(self, url: str):
        self.url = url
        self.client = None
        self.done: dict[str, Record] = {}
        self.lock = threading.Lock()

    def _open(self) -> None:
        self.client = grpcclient.InferenceServerClient(self.url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((time.monotonic(), result, error)))

    def close(self, cancel: bool = False) -> None:
        if self.client is not None:
            try:
                self.client.stop_stream(cancel_requests=cancel)
            finally:
                self.client.close()
                self.client = None

    def run(self, job: Job, deadline_s: float) -> Record:
        if self.client is None:
            self._open()
        self._drain_late()
        body = triton_body(job.spec, job.bad.change if job.bad else None)
        rid = f"soak-{next(_ids)}"
        rec = Record(job, time.monotonic())
        inputs = [_tensor(k, v.encode() if isinstance(v, str) else v, _GRPC_TYPES[k]) for k, v in body.items()]
        self.client.async_stream_infer(MODEL, inputs, request_id=rid, enable_empty_final_response=True)
        deadline = rec.start + deadline_s
        cancel_at = rec.start + job.cancel_delay_s if job.cancel_after == 0 else None
        while True:
            wait = deadline - time.monotonic()
            if cancel_at is not None:
                wait = min(wait, cancel_at - time.monotonic())
            try:
                now, result, error = self.responses.get(timeout=max(wait, 0))
            except queue.Empty:
                if cancel_at is not None and time.monotonic() >= cancel_at:
                    return self._cancel(rec)
                self.close(cancel=True)  # lost: give up on it (and free it, if the server still holds it)
                return rec
            if error is not None:  # a final error (the stream's errors carry no request id)
                rec.final(now, error=error.message() or str(error))
                break
            response = result.get_response(as_json=True)
            if response.get("id") != rid:
                self._late(response.get("id"))
                continue
            ids = result.as_numpy("output_ids")
            rec.got([] if ids is None else ids.reshape(-1).tolist(), now)
            if response.get("parameters", {}).get("triton_final_response", {}).get("bool_param"):
                reason = result.as_numpy("finish_reason")
                rec.final(now, reason=None if reason is None else reason.reshape(-1)[0].decode())
                break
            if job.cancel_after and len(rec.tokens) >= job.cancel_after:
                return self._cancel(rec)
        with self.lock:
            self.done[rid] = rec
        return rec

    def finish(self, grace_s: float) -> None:
        """Wait `grace_s` for late responses to the last request (they still count), then close."""
        if self.client is not None:
            time.sleep(grace_s)
            self._drain_late()
        self.close()

    def _cancel(self, rec: Record) -> Record:
        rec.end, rec.end_at = "cancelled", time.monotonic()
        self.close(cancel=True)
        return rec

    def _drain_late(self) -> None:
        while True:
            try:
                _, result, error = self.responses.get_nowait()
            except queue.Empty:
                return
            self._late(None if result is None else result.get_response(as_json=True).get("id"))

    def _late(self, rid: str | None) -> None:
        with self.lock:
            rec = self.done.get(rid) if rid else None
            if rec is None and self.done:  # an error carries no id: the last finished request's
                rec = self.done[next(reversed(self.done))]
            if rec is not None:
                rec.late += 1


# ---- Triton HTTP generate_stream -------------------------------------------------------------

def http_run(client: httpx.Client, base: str, job: Job, deadline_s: float) -> Record:
    """POST /v2/models/aligned_llm/generate_stream; reads the server-sent events to the end of
    the body, so events after the final one are seen."""
    body = triton_body(job.spec, job.bad.change if job.bad else None)
    return _sse(client, f"{base}/v2/models/{MODEL}/generate_stream", body, job, deadline_s, _triton_event)


def _triton_event(rec: Record, event: dict, now: float) -> None:
    if "error" in event:
        rec.final(now, error=str(event["error"]))
        return
    ids = event.get("output_ids", [])
    rec.got(ids if isinstance(ids, list) else [ids], now)
    if event.get("finish_reason"):
        rec.final(now, reason=event["finish_reason"])


# ---- OpenAI ----------------------------------------------------------------------------------

def openai_body(spec: Spec, model: str, change: dict | None = None) -> dict:
    body = {"model": model, "max_tokens": spec.max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "temperature": spec.temperature}
    if spec.chat and not change:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return _sampled(body, spec, change)


def openai_run(client: httpx.Client, base: str, model: str, job: Job, deadline_s: float) -> Record:
    """A streaming /v1/chat/completions or /v1/completions (bad requests always the latter)."""
    body = openai_body(job.spec, model, job.bad.change if job.bad else None)
    path = "/chat/completions" if "messages" in body else "/completions"
    return _sse(client, base + path, body, job, deadline_s, _openai_event)


def _openai_event(rec: Record, event: dict, now: float) -> None:
    if "error" in event:
        rec.final(now, error=str(event["error"].get("message", event["error"])))
        return
    if event.get("usage"):
        if rec.usage_tokens is not None:
            rec.late += 1
        rec.usage_tokens = event["usage"]["completion_tokens"]
    for choice in event.get("choices", []):
        text = choice.get("text") if "text" in choice else choice.get("delta", {}).get("content")
        if text:
            rec.got([text], now)
        if choice.get("finish_reason"):
            rec.final(now, reason=choice["finish_reason"])


# ---- server-sent events, both HTTP APIs ------------------------------------------------------

def _sse(client: httpx.Client, url: str, body: dict, job: Job, deadline_s: float, on_event) -> Record:
    """Reads the events on this thread only: a cancel closes the response here, between two
    lines (closing it from a timer thread while this one reads can leave the read blocked on a
    socket that no longer has a file descriptor). A cancel "at a moment" therefore lands at the
    first line after it: OpenAI's chat sends its role chunk at once, Triton HTTP its headers
    with the first token."""
    rec = Record(job, time.monotonic())
    deadline = rec.start + deadline_s
    cancel_at = rec.start + job.cancel_delay_s if job.cancel_after == 0 else None
    cancelled = False
    try:
        with client.stream("POST", url, json=body, timeout=httpx.Timeout(deadline_s, connect=30)) as r:
            if r.status_code != 200:
                rec.status, rec.end, rec.end_at = r.status_code, "refused", time.monotonic()
                rec.error = _error_text(r.read().decode(errors="replace"))
                return rec
            for line in r.iter_lines():
                now = time.monotonic()
                if line.startswith("data: ") and line != "data: [DONE]":
                    on_event(rec, json.loads(line[6:]), now)
                elif line == "data: [DONE]" and not rec.finals:
                    rec.error = "[DONE] before a final chunk"
                if not rec.finals and ((job.cancel_after and len(rec.tokens) >= job.cancel_after)
                                       or (cancel_at is not None and now >= cancel_at)):
                    cancelled = True
                    break  # leaving the block closes the connection: the server must cancel
                if now > deadline:
                    break
    except httpx.TimeoutException:
        pass  # no final answer in time: lost
    except httpx.HTTPError as e:  # the connection broke: no final answer came
        if not rec.finals:
            rec.error = f"{type(e).__name__}: {e}"
    if cancelled:
        rec.end, rec.end_at = "cancelled", time.monotonic()
    # no final answer and not cancelled: lost (past the deadline, or the connection broke)
    return rec


def _error_text(text: str) -> str:
    try:
        body = json.loads(text[6:] if text.startswith("data: ") else text)
    except ValueError:
        return text[:300]
    err = body.get("error", body)
    return str(err.get("message", err) if isinstance(err, dict) else err)

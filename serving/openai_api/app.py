"""The OpenAI-compatible app: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Each request is checked (`protocol.parse`: sizes and fields before any tokenizing), rendered
with the chat template and tokenized on a worker thread, and submitted to the one orchestrator,
so the admin dashboard, the metrics, admission control and the queue limit see it as they see
a Triton request. The orchestrator's events reach the event loop through `call_soon_threadsafe`
(its thread never blocks); `TextOutput` turns them into text with the stop strings applied. A
client that goes away (closes its stream, or drops a non-streaming request) has its request
cancelled in the orchestrator, which frees its KV.

Every error is OpenAI's object `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer

import serving.openai_api.protocol as protocol
from orchestrator.core import RequestRejected, TokenEvent
from orchestrator.service import Orchestrator
from serving.openai_api.chat_template import ChatTemplate, TemplateError
from serving.openai_api.errors import ApiError, error_body, rejected
from serving.stop_strings import Piece, TextOutput, stop_request
from serving.tokenizer import max_prompt_bytes

log = logging.getLogger("alignedserve.openai")
DISCONNECT_POLL_S = 0.25
"""How often a request waiting for tokens looks whether its client is still there."""
RETRY_AFTER_S = 1
"""The Retry-After of a 429 (queue full) or 503 (draining) answer."""
BODY_BYTES_PER_PROMPT_BYTE = 6
"""The most JSON bytes one UTF-8 byte of a prompt can take (a control byte as \\u00XX)."""
ENDPOINTS = "GET /v1/models, POST /v1/completions, POST /v1/chat/completions"


def create_app(orch: Orchestrator, tokenizer: Tokenizer, model_name: str,
               chat_template: ChatTemplate | None = None, *, no_template_reason: str = "") -> FastAPI:
    """The app serving `orch` as `model_name`. chat_template None: chat requests are refused
    (400) with `no_template_reason`; completions work."""
    cfg = orch.config
    limits = protocol.Limits(cfg.max_tokens_limit, cfg.max_seq_len,
                             max_prompt_bytes(tokenizer, cfg.max_seq_len, cfg.max_prompt_bytes))
    max_body = 64 * 1024 + BODY_BYTES_PER_PROMPT_BYTE * limits.prompt_bytes
    created = int(time.time())
    app = FastAPI(title="AlignedServe OpenAI-compatible API", version="1",
                  description=f"OpenAI's completions and chat completions for {model_name!r}, served by the "
                              "AlignedServe orchestrator.")
    app.state.open_streams = 0

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        if not e.counted and (400 <= e.status < 500 or e.status == 503):
            orch.record_refusal(e.param or e.code or str(e.status))
        # A full queue or a draining server: come back in a second (OpenAI's clients retry on 429).
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}; this server serves {ENDPOINTS}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; this server serves {ENDPOINTS}"
        else:
            message = str(e.detail)
        return JSONResponse(error_body(message, code="not_found" if e.status_code == 404 else None),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "alignedserve",
                "max_model_len": cfg.max_seq_len}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def model(name: str) -> dict:
        if name != model_name:
            raise ApiError(404, f"model: {name!r} does not exist here; this server serves {model_name!r}",
                           "model", "model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    async def generate(request: Request, kind: str) -> Response:
        gen = protocol.parse(await _read_json(request, max_body), kind, model_name, limits)
        if kind == "chat" and chat_template is None:
            raise ApiError(400, f"messages: this model has no chat template ({no_template_reason}); use "
                           "/v1/completions with your own prompt format", "messages", "chat_template_missing")
        try:
            orch.check_admission()  # a full queue refuses at once, before tokenizing
        except RequestRejected as e:
            raise rejected(e, gen.prompt_param, gen.max_tokens_param) from None
        prompt_ids = await run_in_threadpool(tokenize, gen)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def on_event(event: TokenEvent) -> None:  # the run loop's thread: hand over, never block
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # this server's loop has closed; nobody is listening any more
                pass

        try:
            req = orch.submit(prompt_ids, gen.max_tokens, gen.sampling, None, (), on_event,
                              ignore_eos=gen.ignore_eos)
        except RequestRejected as e:
            raise rejected(e, gen.prompt_param, gen.max_tokens_param) from None
        answer = _Answer(gen, req.id, len(prompt_ids), TextOutput(tokenizer, gen.stop, on_stop=stop_request(orch)),
                         events, orch)
        headers = {"x-request-id": req.id}
        if gen.stream:
            return _EventStream(_sse(answer, request, app), on_close=answer.close, media_type="text/event-stream",
                                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await _whole(answer, request), headers=headers)
        finally:
            answer.close()

    def tokenize(gen: protocol.Generation) -> list[int]:
        if gen.prompt_ids is not None:
            return list(gen.prompt_ids)
        if gen.kind == "completion":
            return tokenizer.encode(gen.prompt).ids
        try:
            text = chat_template.render(list(gen.messages))
        except TemplateError as e:
            raise ApiError(400, f"messages: {e}", "messages", "invalid_value") from None
        # The template writes the special tokens it wants (a BOS among them); add none.
        return tokenizer.encode(text, add_special_tokens=False).ids

    return app


@dataclass(eq=False)
class _Answer:
    """One request being answered."""

    gen: protocol.Generation
    request_id: str
    prompt_tokens: int
    output: TextOutput
    events: asyncio.Queue
    orch: Orchestrator
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.gen.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"

    @property
    def usage(self) -> dict:
        done = self.output.token_count
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def close(self) -> None:
        """The client is gone or the answer is over: a request still generating is cancelled."""
        if not self.output.finished:
            self.output.finished = True
            self.orch.cancel(self.request_id)

    async def pieces(self, request: Request):
        """The output's pieces as they come; ends early if the client goes away."""
        loop = asyncio.get_running_loop()
        look = loop.time() + DISCONNECT_POLL_S
        while not self.output.finished:
            try:
                event = await asyncio.wait_for(self.events.get(), max(look - loop.time(), 0))
            except asyncio.TimeoutError:
                event = None
            if loop.time() >= look:  # tokens or not, look now and then
                if await request.is_disconnected():
                    return
                look = loop.time() + DISCONNECT_POLL_S
            if event is not None and (piece := self.output.feed(event)) is not None:
                yield piece

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        if self.gen.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.gen.model, "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.gen.model,
                   "choices": [choice]}
        if self.gen.include_usage:
            out["usage"] = None
        return out

    def whole(self, text: str, finish: str) -> dict:
        if self.gen.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.gen.model,
                "choices": [choice], "usage": self.usage}


def _failure(piece: Piece) -> ApiError | None:
    """An answer that ended without finishing: an engine error, or cancelled (by an operator,
    or a server shutting down)."""
    if piece.finish_reason == "error":
        return ApiError(500, f"generation failed: {piece.error}", None, "engine_error", "server_error")
    if piece.finish_reason == "cancelled":
        return ApiError(503, "the request was cancelled on the server (an operator cancelled it, or the server "
                        "is shutting down)", None, "cancelled", "server_error")
    return None


async def _whole(answer: _Answer, request: Request) -> dict:
    text = []
    async for piece in answer.pieces(request):
        failure = _failure(piece)
        if failure is not None:
            raise failure
        text.append(piece.text)
        if piece.finish_reason is not None:
            return answer.whole("".join(text), piece.finish_reason)
    return {}  # the client went away; nobody reads this


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(answer: _Answer, request: Request, app: FastAPI):
    """Server-sent events as OpenAI streams them: chunks, then `data: [DONE]`."""
    app.state.open_streams += 1  # the event loop's thread only: no lock
    try:
        if answer.gen.kind == "chat":
            yield _data(answer.chunk(role=True))
        async for piece in answer.pieces(request):
            failure = _failure(piece)
            if failure is not None:
                yield _data(failure.body())
                break
            if piece.text:
                yield _data(answer.chunk(piece.text))
            if piece.finish_reason is not None:
                yield _data(answer.chunk(finish=piece.finish_reason))
                if answer.gen.include_usage:
                    yield _data({**answer.chunk(), "choices": [], "usage": answer.usage})
                break
        else:
            return  # the client went away
        yield "data: [DONE]\n\n"
    finally:
        app.state.open_streams -= 1


class _EventStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends: finished, or the client gone
    (the body iterator is then abandoned, not closed)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _read_json(request: Request, limit: int):
    """The body as JSON, refused with 413 past `limit` bytes before it is all read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, _too_big(f"{declared} bytes", limit), None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, _too_big(f"over {size} bytes", limit), None, "request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return json.loads(body)
    except RecursionError:  # arrays or objects nested thousands deep
        raise ApiError(400, "the body nests arrays or objects too deeply to parse; send a JSON object such as "
                       '{"model": "...", "messages": [{"role": "user", "content": "Hello"}]}', None,
                       "invalid_json") from None
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON ({e}); send a JSON object such as "
                       '{"model": "...", "messages": [{"role": "user", "content": "Hello"}]}', None,
                       "invalid_json") from None


def _too_big(what: str, limit: int) -> str:
    return (f"request body too large ({what}); this server accepts at most {limit} bytes, more than its "
            "longest prompt needs")

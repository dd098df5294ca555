"""What stands between a client and the operator actions: the bearer token, and a cap on the
size of request bodies."""
from __future__ import annotations

import json
import secrets
from typing import Callable

from fastapi import HTTPException, Request

MAX_BODY_BYTES = 16 * 1024
NO_TOKEN = "no admin token configured; set ALIGNED_ADMIN_TOKEN"


def bearer_guard(token: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency: 403 when no token is configured, 401 when the request does not
    carry it as `Authorization: Bearer <token>`."""
    expected = (token or "").encode()

    def check(request: Request) -> None:
        if not expected:
            raise HTTPException(403, NO_TOKEN)
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not header:
            raise HTTPException(401, "missing admin token: send the header 'Authorization: Bearer <token>'",
                                headers=challenge)
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise HTTPException(401, "malformed Authorization header: expected 'Bearer <token>'", headers=challenge)
        if not secrets.compare_digest(value.strip().encode(), expected):
            raise HTTPException(401, "wrong admin token", headers=challenge)

    return check


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app sees it, by its
    Content-Length or, for a streamed body, as soon as the bytes received pass the limit."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _problem(send, 400, f"Content-Length {length.decode(errors='replace')!r} is not a number")
            if declared > self.limit:
                return await _problem(send, 413, self._too_big(f"{declared} bytes declared"))
        # Read the whole body (it is small, or refused) and hand it on in one piece.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _problem(send, 413, self._too_big(f"over {size} bytes received"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_big(self, what: str) -> str:
        return (f"request body too large ({what}); the admin API accepts at most {self.limit} bytes "
                f"({self.limit // 1024} KiB)")


async def _problem(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

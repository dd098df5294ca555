"""OpenAI's error object, and the mapping from the orchestrator's refusals to it."""
from __future__ import annotations

from orchestrator.core import RequestRejected


class ApiError(Exception):
    """A request the API refuses: answered as `{"error": {"message", "type", "param", "code"}}`
    with `status`. The message names the field and the limit, and what to do."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        # A name or value echoed from the body may hold a lone surrogate (JSON's "\ud800"): escaped,
        # so the answer is still UTF-8.
        message, param = _sendable(message), None if param is None else _sendable(param)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.counted = False
        """The orchestrator refused it and counted the refusal already (`rejected`)."""

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def _sendable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def rejected(e: RequestRejected, prompt_param: str, max_tokens_param: str) -> ApiError:
    """An orchestrator refusal (limits it checks on submit) in OpenAI's terms."""
    if e.field == "queue":
        err = ApiError(429, f"the request queue is full: {e.message}", None, "queue_full", "rate_limit_error")
    elif e.field == "server":
        err = ApiError(503, f"the server is not accepting requests: {e.message}", None, "server_unavailable",
                       "server_error")
    else:
        param = {"prompt": prompt_param, "max_tokens": max_tokens_param}.get(e.field, e.field)
        err = ApiError(400, f"{param}: {e.message}", param, "invalid_value")
    err.counted = True
    return err

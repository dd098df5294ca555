"""Check an OpenAI request body (already parsed JSON) and turn it into a `Generation`.

Plain dicts in, so it is tested without a server. Every refusal is an `ApiError` (400) whose
message and `param` name the field and the limit. Fields OpenAI defines that change the answer
but that this server does not implement (logprobs, tools, response_format, penalties, ...) are
refused unless they carry their "off" value, so a client never gets an answer that silently
ignored what it asked for; fields that change nothing here (`user`, `metadata`, ...) are
accepted. Names OpenAI does not define are refused, as OpenAI refuses them.
"""
from __future__ import annotations

from dataclasses import dataclass

from engines.base import SamplingParams
from serving.openai_api.errors import ApiError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_BYTES_PER_TOKEN = 32
"""Bytes per token of `Limits.max_prompt_bytes` where none is given (the served app gives the
tokenizer's own: serving.tokenizer.max_prompt_bytes)."""
DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default: a request without `temperature` samples."""

_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed",
           "ignore_eos", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_tokens"}
FIELDS = {
    "chat": _COMMON | {"messages", "max_completion_tokens"},
    "completion": _COMMON | {"prompt"},
}
"""What each endpoint implements (top_k, ignore_eos, repetition_penalty and min_tokens as vLLM has
them; OpenAI has none of those)."""
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
            "prompt_cache_key"}
"""OpenAI fields accepted and ignored: they do not change the generated answer."""

_NO_LOGPROBS = "this server does not return log probabilities"
_NO_TOOLS = "this server does not call tools"
UNSUPPORTED = {
    "chat": {
        "logprobs": ((None, False), _NO_LOGPROBS),
        "top_logprobs": ((None, 0), _NO_LOGPROBS),
        "tools": ((None, []), _NO_TOOLS),
        "tool_choice": ((None, "none"), _NO_TOOLS),
        "functions": ((None, []), _NO_TOOLS),
        "function_call": ((None, "none"), _NO_TOOLS),
        "response_format": ((None, {"type": "text"}), "structured output (JSON mode, JSON schema) is not implemented"),
        "modalities": ((None, ["text"]), "this server answers with text only"),
        "audio": ((None,), "this server answers with text only"),
        "prediction": ((None,), "predicted outputs are not implemented"),
        "reasoning_effort": ((None,), "this server does not run reasoning models' effort settings"),
        "web_search_options": ((None,), "this server does not search the web"),
    },
    "completion": {
        "logprobs": ((None,), _NO_LOGPROBS),
        "echo": ((None, False), "echoing the prompt is not implemented"),
        "suffix": ((None, ""), "insertion (suffix) is not implemented"),
        "best_of": ((None, 1), "best_of other than 1 is not implemented"),
    },
}
for _kind in UNSUPPORTED:  # biases: both endpoints
    UNSUPPORTED[_kind].update({
        "logit_bias": ((None, {}), "logit_bias is not implemented"),
    })
CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_TOP_K = 2**31 - 1
"""Largest top_k (TensorRT-LLM's INT32): any top_k at or over the vocabulary's size keeps every token."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What the served engine allows, checked before any expensive work."""

    max_tokens: int
    """Largest max_tokens (the orchestrator's max_tokens_limit)."""
    max_seq_len: int
    max_prompt_bytes: int = 0
    """Longest prompt (or all messages' contents) in UTF-8 bytes, refused before tokenizing; 0:
    max_seq_len x MAX_BYTES_PER_TOKEN."""

    @property
    def prompt_bytes(self) -> int:
        return self.max_prompt_bytes or self.max_seq_len * MAX_BYTES_PER_TOKEN


@dataclass(frozen=True, slots=True)
class Generation:
    """One checked request, in the orchestrator's terms."""

    kind: str
    """"chat" or "completion"."""
    model: str
    sampling: SamplingParams
    max_tokens: int | None
    """None: the server's default_max_tokens, within what the prompt leaves of max_seq_len."""
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    prompt: str | None = None
    """completion: the prompt text (or None when given as token ids)."""
    prompt_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] = ()
    """chat: the messages as the template sees them ({"role", "content"[, "name"]})."""
    max_tokens_param: str = "max_tokens"
    """Which field set max_tokens: errors about it name that one."""
    ignore_eos: bool = False
    """Generate on past the model's EOS tokens, to max_tokens or a stop string (vLLM's extension;
    benchmark clients send it for a fixed output length)."""

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


def parse(body: object, kind: str, model: str, limits: Limits) -> Generation:
    """Check `body` for endpoint `kind` ("chat" or "completion") served as `model`."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_json_type(body)}")
    _check_fields(body, kind)
    name = body.get("model")
    if name is None:
        raise ApiError(400, f"model: required; this server serves {model!r}", "model", "missing_required_parameter")
    if not isinstance(name, str):
        raise ApiError(400, f"model: expected a string, got {_json_type(name)}", "model")
    if name != model:
        raise ApiError(404, f"model: {name!r} does not exist here; this server serves {model!r} (GET /v1/models)",
                       "model", "model_not_found")
    n = body.get("n")
    if n is not None and (_int(n, "n") != 1):
        raise ApiError(400, f"n: {n} choices asked for; this server generates one (n = 1); send several requests",
                       "n", "unsupported_value")

    param = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        param = "max_completion_tokens"
    max_tokens = body.get(param)
    if max_tokens is not None:
        max_tokens = _int(max_tokens, param)
        if not 1 <= max_tokens <= limits.max_tokens:
            raise ApiError(400, f"{param}: {max_tokens} is outside [1, {limits.max_tokens}]", param)

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream: expected true or false, got {_json_type(stream)}", "stream")
    include_usage = _stream_options(body.get("stream_options"), bool(stream))
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise ApiError(400, f"ignore_eos: expected true or false, got {_json_type(ignore_eos)}", "ignore_eos")
    common = dict(kind=kind, model=model, sampling=_sampling(body, limits), max_tokens=max_tokens,
                  stop=_stop(body.get("stop")), stream=bool(stream), include_usage=include_usage,
                  max_tokens_param=param, ignore_eos=bool(ignore_eos))
    if kind == "chat":
        return Generation(messages=_messages(body.get("messages"), limits), **common)
    prompt, prompt_ids = _prompt(body.get("prompt"), limits)
    return Generation(prompt=prompt, prompt_ids=prompt_ids, **common)


# ---- the parts ------------------------------------------------------------------------------------


def _check_fields(body: dict, kind: str) -> None:
    unsupported = UNSUPPORTED[kind]
    for key, value in body.items():
        if key in FIELDS[kind] or key in HARMLESS:
            continue
        if key in unsupported:
            neutral, why = unsupported[key]
            if any(_same(value, v) for v in neutral):
                continue
            raise ApiError(400, f"{key}: {why}; leave it out", key, "unsupported_parameter")
        name = key if key.isprintable() and key.strip() else repr(key)  # "", " " or a control character: quoted
        raise ApiError(400, f"{name}: unrecognized request argument; {_endpoint(kind)} accepts "
                       f"{', '.join(sorted(FIELDS[kind]))}", name, "unknown_parameter")


def _same(value, neutral) -> bool:
    """value is the neutral value (0 and 0.0 alike; false is not 0)."""
    if isinstance(neutral, (int, float)) and not isinstance(neutral, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral
    return type(value) is type(neutral) and value == neutral


def _sampling(body: dict, limits: Limits) -> SamplingParams:
    temperature = _number(body.get("temperature"), "temperature", 0.0, 2.0, DEFAULT_TEMPERATURE)
    top_p = _number(body.get("top_p"), "top_p", 0.0, 1.0, 1.0)
    top_k = body.get("top_k")
    top_k = 0 if top_k is None else _int(top_k, "top_k")
    if not -1 <= top_k <= MAX_TOP_K:
        raise ApiError(400, f"top_k: {top_k} is outside [-1, {MAX_TOP_K}] (0 or -1: no limit)", "top_k")
    seed = body.get("seed")
    if seed is not None:
        seed = _int(seed, "seed")
        if not 0 <= seed < 2**63:
            raise ApiError(400, f"seed: {seed} is outside [0, 2**63 - 1]", "seed")
    if top_p == 0.0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, 1.0
    # OpenAI's ranges for its penalties; vLLM's for repetition_penalty and min_tokens.
    frequency = _number(body.get("frequency_penalty"), "frequency_penalty", -2.0, 2.0, 0.0)
    presence = _number(body.get("presence_penalty"), "presence_penalty", -2.0, 2.0, 0.0)
    repetition = _number(body.get("repetition_penalty"), "repetition_penalty", 0.0, 100.0, 1.0)
    if repetition <= 0:
        raise ApiError(400, f"repetition_penalty: {repetition} must be > 0 (1: off)", "repetition_penalty")
    min_tokens = body.get("min_tokens")
    min_tokens = 0 if min_tokens is None else _int(min_tokens, "min_tokens")
    if min_tokens < 0:
        raise ApiError(400, f"min_tokens: {min_tokens} must be >= 0", "min_tokens")
    if min_tokens > limits.max_tokens:
        raise ApiError(400, f"min_tokens: {min_tokens} is over the largest max_tokens ({limits.max_tokens})",
                       "min_tokens")
    return SamplingParams(temperature=temperature, top_k=max(top_k, 0), top_p=top_p, seed=seed,
                          frequency_penalty=frequency, presence_penalty=presence, repetition_penalty=repetition,
                          min_tokens=min_tokens)


def _stream_options(options, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options: only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options: expected an object, got {_json_type(options)}", "stream_options")
    for key in options:
        if key != "include_usage":
            raise ApiError(400, f"stream_options.{key}: not supported; this server knows include_usage",
                           f"stream_options.{key}", "unknown_parameter")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, f"stream_options.include_usage: expected true or false, got {_json_type(usage)}",
                       "stream_options.include_usage")
    return usage


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    words = [stop] if isinstance(stop, str) else stop
    if not isinstance(words, list):
        raise ApiError(400, f"stop: expected a string or a list of strings, got {_json_type(stop)}", "stop")
    if len(words) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: {len(words)} strings; the limit is {MAX_STOP_STRINGS}", "stop")
    for i, w in enumerate(words):
        where = "stop" if isinstance(stop, str) else f"stop[{i}]"
        if not isinstance(w, str):
            raise ApiError(400, f"{where}: expected a string, got {_json_type(w)}", where)
        if not w:
            raise ApiError(400, f"{where}: an empty stop string would stop at once; leave it out", where)
        _unicode(w, where)
        if len(w) > MAX_STOP_CHARS:
            raise ApiError(400, f"{where}: {len(w)} characters; the limit is {MAX_STOP_CHARS}", where)
    return tuple(words)


def _prompt(prompt, limits: Limits) -> tuple[str | None, tuple[int, ...] | None]:
    if prompt is None:
        raise ApiError(400, "prompt: required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise ApiError(400, f"prompt: a batch of {len(prompt)} prompts; this server takes one prompt per "
                           "request; send several requests", "prompt", "unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt: empty; send at least one character", "prompt")
        _check_size(len(prompt.encode("utf-8", "surrogatepass")), "prompt", limits)
        _unicode(prompt, "prompt")
        return prompt, None
    if isinstance(prompt, list) and prompt:  # token ids
        if len(prompt) >= limits.max_seq_len:
            raise ApiError(400, f"prompt: {len(prompt)} tokens; the limit is {limits.max_seq_len - 1}", "prompt")
        for i, t in enumerate(prompt):
            if not isinstance(t, int) or isinstance(t, bool):
                raise ApiError(400, f"prompt[{i}]: a token id must be an integer, got {_json_type(t)}", "prompt")
        return None, tuple(prompt)
    raise ApiError(400, f"prompt: expected a string, a list of token ids, or a list of one of those; got "
                   f"{_json_type(prompt) if prompt != [] else 'an empty list'}", "prompt")


def _messages(messages, limits: Limits) -> tuple[dict, ...]:
    if messages is None:
        raise ApiError(400, "messages: required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise ApiError(400, f"messages: expected a list of messages, got {_json_type(messages)}", "messages")
    if not messages:
        raise ApiError(400, "messages: empty; send at least one message", "messages")
    out, size = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where}: expected an object with role and content, got {_json_type(m)}", where)
        role = m.get("role")
        if role in ("tool", "function"):
            raise ApiError(400, f"{where}.role: {role!r} messages answer tool calls; {_NO_TOOLS}", f"{where}.role",
                           "unsupported_value")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"{where}.role: {role!r} is not one of {', '.join(CHAT_ROLES)}", f"{where}.role")
        for key in m:
            if key not in ("role", "content", "name"):
                raise ApiError(400, f"{where}.{key}: not supported (this server takes role, content and name)",
                               f"{where}.{key}", "unsupported_parameter")
        content = _content(m.get("content"), role, where)
        size += len(content.encode("utf-8", "surrogatepass"))
        _check_size(size, "messages", limits)
        _unicode(content, f"{where}.content")
        message = {"role": "system" if role == "developer" else role, "content": content}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise ApiError(400, f"{where}.name: expected a string, got {_json_type(m['name'])}", f"{where}.name")
            message["name"] = _unicode(m["name"], f"{where}.name")
        out.append(message)
    return tuple(out)


def _content(content, role: str, where: str) -> str:
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only, joined as vLLM joins them
        texts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ApiError(400, f"{at}.type: {kind!r} parts are not supported; this server takes text only",
                               f"{at}.type", "unsupported_value")
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{at}.text: expected a string", f"{at}.text")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where}.content: expected a string or a list of text parts, got {_json_type(content)}",
                   f"{where}.content")


def _check_size(size: int, param: str, limits: Limits) -> None:
    if size > limits.prompt_bytes:
        raise ApiError(400, f"{param}: {size} bytes is over max_prompt_bytes ({limits.prompt_bytes}), more than "
                       f"the model's {limits.max_seq_len} tokens (max_seq_len) can hold; shorten it", param,
                       "context_length_exceeded")


def _unicode(text: str, param: str) -> str:
    """text, refused where it holds a lone surrogate: JSON's "\\ud800" escapes can carry one, and
    neither the tokenizer nor UTF-8 takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param}: not valid Unicode (a lone surrogate {text[e.start]!r} at character "
                       f"{e.start}); send text whose \\u escapes pair up", param) from None
    return text


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name}: expected an integer, got {_json_type(value)}", name)
    return value


def _number(value, name: str, lo: float, hi: float, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name}: expected a number, got {_json_type(value)}", name)
    if not lo <= value <= hi:  # NaN and the infinities fail it; an int past float's range compares exactly
        raise ApiError(400, f"{name}: {value} is outside [{lo:g}, {hi:g}]", name)
    return float(value)


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    return {"list": "a list", "dict": "an object"}.get(type(value).__name__, type(value).__name__)


def _endpoint(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"

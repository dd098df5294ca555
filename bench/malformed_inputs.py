"""Malformed requests against a real server, over every protocol it speaks (issue 18): how each
is answered, and whether the answer names the field.

    python -m bench.malformed_inputs --engine-dir /tmp/demo-eng [--out bench/results/malformed-inputs]

Starts `tritonserver` on model_repo/ (aligned_llm, the TensorRT-LLM-shaped ensemble,
tensorrt_llm_bls and tensorrt_llm) with the OpenAI API beside it, on free loopback ports; sends
each case of CASES over Triton HTTP generate / generate_stream, Triton gRPC (the stream for the
decoupled models, a unary call for tensorrt_llm) or the OpenAI API; stops the server by process
group. Per case it records the protocol, the status (HTTP code, or the gRPC error), whether the
answer names the field, who answered (the project's own message "<field>: ..." or Triton's front
end) and the message, and sorts it into one class:

- `4xx-named`: refused with a 4xx (gRPC: an error) whose message names the field;
- `4xx-unnamed`: refused so, the field not named;
- `triton-500-named` / `triton-500-unnamed`: Triton's HTTP front end refused it with 500 before
  the model saw it (a JSON value it cannot convert to the declared type);
- `accepted`: answered normally (cases that are valid: the top half of the UINT64 seed range);
- `other`: anything else (a 200 with an error inside, an unknown field silently ignored, gRPC's
  INTERNAL for a refusal, ...).

Each case carries the class it is documented to get (`expect`); tests/serving/test_malformed_sweep.py
runs a subset and checks it. Writes results.json and report.md under --out.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import requests

from serving.triton_server import TritonServer, free_port, wait_for_http

TIMEOUT_S = 60
BIG = 2_000_000
"""Characters of the oversize prompt: over any engine's max_prompt_bytes here (the demo's is
256 tokens x its longest token)."""
OK_TRITON = {"text_input": "hello", "max_tokens": 2, "end_id": 0}
OK_COMPLETION = {"prompt": "hello", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
DROP = object()
"""A value in a case's `change`: leave that field out of the valid body."""


@dataclass
class Case:
    """One malformed (or edge) request and the class of answer it is documented to get."""

    protocol: str
    """http-generate, http-generate_stream, grpc-stream, grpc-unary, openai-completions, openai-chat."""
    name: str
    field: str
    """The field the answer should name ("body" for a body that is not a JSON object)."""
    expect: str
    send: Callable[["Target"], tuple[str, str]] = field(repr=False, default=None)
    """Sends the request: (status, message). status is the HTTP code as text, or "grpc <code>"."""
    model: str = "aligned_llm"


@dataclass
class Target:
    http: str
    grpc: str
    openai: str
    openai_model: str


@dataclass
class Result:
    protocol: str
    model: str
    case: str
    field: str
    status: str
    named: bool
    source: str
    cls: str
    expect: str
    message: str

    @property
    def as_expected(self) -> bool:
        return self.cls == self.expect


# ---- senders ----------------------------------------------------------------------------------


def _body(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        if v is DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def _error_text(text: str) -> str:
    """The error message of a JSON answer (Triton's {"error": "..."}, OpenAI's {"error": {...}}), or
    of the first event of a server-sent-events answer ("data: {...}")."""
    if text.startswith("data: "):
        text = text.splitlines()[0][len("data: "):]
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        return str(err.get("message"))
    return "" if err is None else str(err)


def triton_http(endpoint: str, change: dict | bytes, model: str = "aligned_llm", base: dict = OK_TRITON):
    def send(t: Target) -> tuple[str, str]:
        body = change if isinstance(change, bytes) else _body(base, change)
        r = requests.post(f"{t.http}/v2/models/{model}/{endpoint}", data=_encode(body),
                          headers={"Content-Type": "application/json"}, timeout=TIMEOUT_S)
        if endpoint == "generate_stream" and r.status_code == 200:
            for line in r.text.splitlines():  # an error may come as an event of a 200 stream
                if line.startswith("data: ") and '"error"' in line:
                    return "200", "ERROR EVENT: " + _error_text(line[len("data: "):])
            return "200", ""
        return str(r.status_code), _error_text(r.text) if r.status_code != 200 else _answer_error(r.text)
    return send


def _answer_error(text: str) -> str:
    """A 200 answer that carries an error anyway (/generate of a streamed request)."""
    return "ERROR IN 200: " + _error_text(text) if '"error"' in text else ""


def openai(kind: str, change: dict | bytes, base: dict | None = None):
    def send(t: Target) -> tuple[str, str]:
        start = {"model": t.openai_model, **(base or (OK_CHAT if kind == "chat" else OK_COMPLETION))}
        body = change.replace(b"@MODEL@", t.openai_model.encode()) if isinstance(change, bytes) else _body(start, change)
        path = {"chat": "chat/completions", "completion": "completions"}.get(kind, kind)
        r = requests.post(f"{t.openai}/v1/{path}", data=_encode(body), headers={"Content-Type": "application/json"},
                          timeout=TIMEOUT_S)
        return str(r.status_code), _error_text(r.text) if r.status_code != 200 else ""
    return send


def grpc(change: dict, model: str = "aligned_llm", stream: bool = True, base: dict | None = None):
    """change: input name -> numpy array (DROP: leave it out)."""
    def send(t: Target) -> tuple[str, str]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        start = base or {"text_input": np.array([[b"hello"]], dtype=object), "max_tokens": np.array([[2]], dtype=np.int32),
                         "end_id": np.array([[0]], dtype=np.int32)}
        inputs = []
        for name, arr in _body(start, change).items():
            tensor = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            tensor.set_data_from_numpy(arr)
            inputs.append(tensor)
        client = grpcclient.InferenceServerClient(t.grpc)
        try:
            if not stream:
                try:
                    client.infer(model, inputs, client_timeout=TIMEOUT_S)
                    return "grpc OK", ""
                except InferenceServerException as e:
                    return f"grpc {e.status()}", e.message()
            answers: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            try:
                client.async_stream_infer(model, inputs, request_id="1", enable_empty_final_response=True)
                while True:
                    result, error = answers.get(timeout=TIMEOUT_S)
                    if error is not None:
                        return f"grpc {error.status() or 'stream error'}", error.message()
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        return "grpc OK", ""
            finally:
                client.stop_stream()
        finally:
            client.close()
    return send


def _a(value, dtype) -> np.ndarray:
    return np.array([[value]], dtype=dtype)


# ---- the cases --------------------------------------------------------------------------------

NAMED, UNNAMED, T500, T500U, OK, OTHER = "4xx-named", "4xx-unnamed", "triton-500-named", "triton-500-unnamed", \
    "accepted", "other"


def cases() -> list[Case]:
    gen = lambda change: triton_http("generate", change)  # noqa: E731
    stream = lambda change: triton_http("generate_stream", change)  # noqa: E731
    out = [
        # Triton HTTP generate: JSON values Triton's front end converts to the declared types first.
        Case("http-generate", "max_tokens: \"abc\"", "max_tokens", T500U, gen({"max_tokens": "abc"})),
        Case("http-generate", "max_tokens: 1.5", "max_tokens", T500U, gen({"max_tokens": 1.5})),
        Case("http-generate", "text_input: 123", "text_input", T500U, gen({"text_input": 123})),
        Case("http-generate", "seed: -1", "seed", T500U, gen({"seed": -1})),
        Case("http-generate", "seed: 1.5", "seed", T500U, gen({"seed": 1.5})),
        Case("http-generate", "seed: 2**64 (over UINT64)", "seed", T500U, gen({"seed": 2**64})),
        Case("http-generate", "seed: 2**63 (UINT64, accepted)", "seed", OK, gen({"seed": 2**63})),
        Case("http-generate", "seed: 2**64-1 (UINT64, accepted)", "seed", OK, gen({"seed": 2**64 - 1})),
        Case("http-generate", "stream: \"yes\"", "stream", T500U, gen({"stream": "yes"})),
        Case("http-generate", "temperature: \"hot\"", "temperature", T500U, gen({"temperature": "hot"})),
        Case("http-generate", "stop_words: 5", "stop_words", T500U, gen({"stop_words": 5})),
        Case("http-generate", "body not JSON", "body", T500U, gen(b"this is not json")),
        Case("http-generate", "body empty", "body", T500U, gen(b"")),
        Case("http-generate", "body a JSON list", "body", T500U, gen(b"[1, 2]")),
        Case("http-generate", "text_input bad UTF-8 bytes", "text_input", NAMED,
             gen(b'{"text_input": "\xff\xfe", "max_tokens": 2, "end_id": 0}')),
        Case("http-generate", "max_tokens: 2147483648 (wraps to INT32 min)", "max_tokens", NAMED,
             gen({"max_tokens": 2**31})),
        Case("http-generate", "max_tokens: 4294967297 (wraps to 1)", "max_tokens", OTHER, gen({"max_tokens": 2**32 + 1})),
        Case("http-generate", "max_tokens: 0", "max_tokens", NAMED, gen({"max_tokens": 0})),
        Case("http-generate", "max_tokens: -1", "max_tokens", NAMED, gen({"max_tokens": -1})),
        Case("http-generate", "max_tokens: 100000 (over the limit)", "max_tokens", NAMED, gen({"max_tokens": 100_000})),
        Case("http-generate", "max_tokens missing", "max_tokens", NAMED, gen({"max_tokens": DROP})),
        Case("http-generate", "text_input missing", "text_input", NAMED, gen({"text_input": DROP})),
        Case("http-generate", "text_input empty", "text_input", NAMED, gen({"text_input": ""})),
        Case("http-generate", "text_input a lone surrogate (\\ud800)", "text_input", T500U, gen({"text_input": "\ud800"})),
        Case("http-generate", "text_input oversize (2 MB)", "text_input", NAMED, gen({"text_input": "a" * BIG})),
        Case("http-generate", "text_input two values", "text_input", NAMED, gen({"text_input": ["a", "b"]})),
        Case("http-generate", "max_tokens: [2, 3] (wrong shape)", "max_tokens", NAMED, gen({"max_tokens": [2, 3]})),
        Case("http-generate", "temperature: -1", "temperature", NAMED, gen({"temperature": -1})),
        Case("http-generate", "top_p: 0", "top_p", NAMED, gen({"top_p": 0})),
        Case("http-generate", "top_p: 2", "top_p", NAMED, gen({"top_p": 2})),
        Case("http-generate", "top_k: -1", "top_k", NAMED, gen({"top_k": -1})),
        Case("http-generate", "top_k: 2147483648 (wraps)", "top_k", NAMED, gen({"top_k": 2**31})),
        Case("http-generate", "min_tokens: 100000", "min_tokens", NAMED, gen({"min_tokens": 100_000})),
        Case("http-generate", "end_id: -2", "end_id", NAMED, gen({"end_id": -2})),
        Case("http-generate", "repetition_penalty: 0", "repetition_penalty", NAMED, gen({"repetition_penalty": 0})),
        Case("http-generate", "input_ids: [-1] (no text_input)", "input_ids", NAMED,
             gen({"text_input": DROP, "input_ids": [-1]})),
        Case("http-generate", "input_ids: [10**6] (outside the vocabulary)", "input_ids", NAMED,
             gen({"text_input": DROP, "input_ids": [1_000_000]})),
        Case("http-generate", "unknown field \"foo\"", "foo", OTHER, gen({"foo": 1})),
        Case("http-generate", "stream: true on /generate", "stream", OTHER, gen({"stream": True})),
        Case("http-generate", "wrong model name", "model", NAMED, triton_http("generate", {}, model="nope")),
        # generate_stream: the same front end, errors as an event or a status.
        Case("http-generate_stream", "max_tokens: \"abc\"", "max_tokens", T500U, stream({"max_tokens": "abc"})),
        Case("http-generate_stream", "max_tokens: 0", "max_tokens", NAMED, stream({"max_tokens": 0, "stream": True})),
        Case("http-generate_stream", "text_input empty", "text_input", NAMED, stream({"text_input": "", "stream": True})),
        Case("http-generate_stream", "temperature: -1", "temperature", NAMED, stream({"temperature": -1, "stream": True})),
        Case("http-generate_stream", "seed: 2**63 (accepted)", "seed", OK, stream({"seed": 2**63, "stream": True})),
        Case("http-generate_stream", "seed: -1", "seed", T500U, stream({"seed": -1, "stream": True})),
        Case("http-generate_stream", "unknown field \"foo\"", "foo", OTHER, stream({"foo": 1, "stream": True})),
        # gRPC stream: typed tensors, so what JSON cannot say wrong, a dtype can.
        Case("grpc-stream", "max_tokens as FP32", "max_tokens", NAMED, grpc({"max_tokens": _a(2.0, np.float32)})),
        Case("grpc-stream", "text_input as INT32", "text_input", NAMED, grpc({"text_input": _a(123, np.int32)})),
        Case("grpc-stream", "seed as INT64 -1", "seed", NAMED, grpc({"seed": _a(-1, np.int64)})),
        Case("grpc-stream", "seed: 2**64-1 (UINT64, accepted)", "seed", OK, grpc({"seed": _a(2**64 - 1, np.uint64)})),
        Case("grpc-stream", "seed: 2**63 (UINT64, accepted)", "seed", OK, grpc({"seed": _a(2**63, np.uint64)})),
        Case("grpc-stream", "unknown input \"foo\"", "foo", NAMED, grpc({"foo": _a(1, np.int32)})),
        Case("grpc-stream", "max_tokens: 0", "max_tokens", NAMED, grpc({"max_tokens": _a(0, np.int32)})),
        Case("grpc-stream", "max_tokens: INT32 min", "max_tokens", NAMED, grpc({"max_tokens": _a(-2**31, np.int32)})),
        Case("grpc-stream", "text_input empty", "text_input", NAMED, grpc({"text_input": _a(b"", object)})),
        Case("grpc-stream", "text_input bad UTF-8", "text_input", NAMED, grpc({"text_input": _a(b"\xff\xfe", object)})),
        Case("grpc-stream", "text_input oversize (2 MB)", "text_input", NAMED,
             grpc({"text_input": _a(b"a" * BIG, object)})),
        Case("grpc-stream", "text_input two values [1, 2]", "text_input", NAMED,
             grpc({"text_input": np.array([[b"a", b"b"]], dtype=object)})),
        Case("grpc-stream", "temperature: NaN", "temperature", NAMED, grpc({"temperature": _a(np.nan, np.float32)})),
        Case("grpc-stream", "top_p: 0", "top_p", NAMED, grpc({"top_p": _a(0, np.float32)})),
        Case("grpc-stream", "top_p: 2", "top_p", NAMED, grpc({"top_p": _a(2, np.float32)})),
        Case("grpc-stream", "top_k: -1", "top_k", NAMED, grpc({"top_k": _a(-1, np.int32)})),
        Case("grpc-stream", "stop_words_list [1, 3, 2] (wrong shape)", "stop_words_list", NAMED,
             grpc({"stop_words_list": np.zeros((1, 3, 2), dtype=np.int32)})),
        Case("grpc-stream", "text_input missing", "text_input", NAMED, grpc({"text_input": DROP})),
        Case("grpc-stream", "max_tokens missing", "max_tokens", NAMED, grpc({"max_tokens": DROP})),
        Case("grpc-stream", "wrong model name", "nope", NAMED, grpc({}, model="nope")),
        # The TensorRT-LLM-shaped models, which forward to aligned_llm.
        Case("http-generate", "max_tokens: 0", "max_tokens", NAMED, triton_http("generate", {"max_tokens": 0}, "ensemble"),
             model="ensemble"),
        Case("http-generate", "text_input empty", "text_input", NAMED,
             triton_http("generate", {"text_input": ""}, "ensemble"), model="ensemble"),
        Case("http-generate", "beam_width: 2", "beam_width", NAMED,
             triton_http("generate", {"beam_width": 2}, "tensorrt_llm_bls"), model="tensorrt_llm_bls"),
        Case("http-generate", "temperature: -1", "temperature", NAMED,
             triton_http("generate", {"temperature": -1}, "tensorrt_llm_bls"), model="tensorrt_llm_bls"),
        Case("http-generate", "random_seed: 2**64-1 (accepted)", "random_seed", OK,
             triton_http("generate", {"random_seed": 2**64 - 1}, "ensemble"), model="ensemble"),
        Case("grpc-unary", "request_output_len: 0", "request_output_len", OTHER,
             grpc({"request_output_len": _a(0, np.int32)}, "tensorrt_llm", False, TOKENS), model="tensorrt_llm"),
        Case("grpc-unary", "input_lengths: 0", "input_lengths", NAMED,
             grpc({"input_lengths": _a(0, np.int32)}, "tensorrt_llm", False, TOKENS), model="tensorrt_llm"),
        Case("grpc-unary", "input_ids: [-1]", "input_ids", OTHER,
             grpc({"input_ids": np.array([[-1, 5, 6]], dtype=np.int32)}, "tensorrt_llm", False, TOKENS), model="tensorrt_llm"),
        Case("grpc-unary", "runtime_top_k: -1", "runtime_top_k", OTHER,
             grpc({"runtime_top_k": _a(-1, np.int32)}, "tensorrt_llm", False, TOKENS), model="tensorrt_llm"),
    ]
    for kind, proto in (("completion", "openai-completions"), ("chat", "openai-chat")):
        prompt = "prompt" if kind == "completion" else "messages"
        o = lambda change, kind=kind: openai(kind, change)  # noqa: E731
        out += [
            Case(proto, "max_tokens: \"abc\"", "max_tokens", NAMED, o({"max_tokens": "abc"})),
            Case(proto, "max_tokens: 0", "max_tokens", NAMED, o({"max_tokens": 0})),
            Case(proto, "max_tokens: 2147483648", "max_tokens", NAMED, o({"max_tokens": 2**31})),
            Case(proto, "seed: -1", "seed", NAMED, o({"seed": -1})),
            Case(proto, "seed: 2**64-1", "seed", NAMED, o({"seed": 2**64 - 1})),
            Case(proto, "stream: \"yes\"", "stream", NAMED, o({"stream": "yes"})),
            Case(proto, "temperature: -1", "temperature", NAMED, o({"temperature": -1})),
            Case(proto, "temperature: NaN", "temperature", NAMED, o(_raw_body(kind, b'"temperature": NaN'))),
            Case(proto, "temperature: 1e400 (a 400-digit integer)", "temperature", NAMED, o({"temperature": 10**400})),
            Case(proto, "top_p: 2", "top_p", NAMED, o({"top_p": 2})),
            Case(proto, "top_k: -2", "top_k", NAMED, o({"top_k": -2})),
            Case(proto, "top_k: 2**64", "top_k", NAMED, o({"top_k": 2**64})),
            Case(proto, "min_tokens: 10**30", "min_tokens", NAMED, o({"min_tokens": 10**30})),
            Case(proto, "n: 2", "n", NAMED, o({"n": 2})),
            Case(proto, "logprobs", "logprobs", NAMED, o({"logprobs": 1 if kind == "completion" else True})),
            Case(proto, "stop: 17 strings", "stop", NAMED, o({"stop": [f"s{i}" for i in range(17)]})),
            Case(proto, "stop: [\"\"]", "stop[0]", NAMED, o({"stop": [""]})),
            Case(proto, "stream_options without stream", "stream_options", NAMED,
                 o({"stream_options": {"include_usage": True}})),
            Case(proto, "unknown field \"foo\"", "foo", NAMED, o({"foo": 1})),
            Case(proto, "wrong model name", "model", NAMED, o({"model": "nope"})),
            Case(proto, "model missing", "model", NAMED, o({"model": DROP})),
            Case(proto, "body not JSON", "body", NAMED, o(b"this is not json")),
            Case(proto, "body a JSON list", "body", NAMED, o(b"[1, 2]")),
            Case(proto, "body nested 20000 deep", "body", NAMED, o(b"[" * 20_000)),
            Case(proto, "bad UTF-8 in the body", "body", NAMED, o(_raw_body(kind, b'"user": "\xff"'))),
            Case(proto, f"{prompt} missing", prompt, NAMED, o({prompt: DROP})),
            Case(proto, f"{prompt} over max_prompt_bytes (3 kB)", prompt, NAMED, o(_long(kind, 3000))),
            Case(proto, f"{prompt} oversize (2 MB: the body is over its limit)", "body", NAMED, o(_long(kind, BIG))),
        ]
        surrogate = {"prompt": "a\ud800"} if kind == "completion" else {"messages": [{"role": "user", "content": "a\ud800"}]}
        out.append(Case(proto, "a lone surrogate (\\ud800) in the prompt",
                        "prompt" if kind == "completion" else "messages[0].content", NAMED, o(surrogate)))
    out.append(Case("openai-completions", "prompt: 123", "prompt", NAMED, openai("completion", {"prompt": 123})))
    out.append(Case("openai-completions", "prompt: \"\"", "prompt", NAMED, openai("completion", {"prompt": ""})))
    out.append(Case("openai-completions", "prompt: [-1] (token ids)", "prompt", NAMED, openai("completion", {"prompt": [-1]})))
    out.append(Case("openai-completions", "echo: true", "echo", NAMED, openai("completion", {"echo": True})))
    out.append(Case("openai-completions", "best_of: 2", "best_of", NAMED, openai("completion", {"best_of": 2})))
    chat = lambda messages: openai("chat", {"messages": messages})  # noqa: E731
    out += [
        Case("openai-chat", "messages: \"hi\"", "messages", NAMED, chat("hi")),
        Case("openai-chat", "messages: []", "messages", NAMED, chat([])),
        Case("openai-chat", "messages: [5]", "messages[0]", NAMED, chat([5])),
        Case("openai-chat", "role: \"wizard\"", "messages[0].role", NAMED, chat([{"role": "wizard", "content": "hi"}])),
        Case("openai-chat", "role missing", "messages[0].role", NAMED, chat([{"content": "hi"}])),
        Case("openai-chat", "role: \"tool\"", "messages[0].role", NAMED, chat([{"role": "tool", "content": "hi"}])),
        Case("openai-chat", "content: 5", "messages[0].content", NAMED, chat([{"role": "user", "content": 5}])),
        Case("openai-chat", "content: an image part", "messages[0].content[0].type", NAMED,
             chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])),
        Case("openai-chat", "message with an unknown key", "messages[0].foo", NAMED,
             chat([{"role": "user", "content": "hi", "foo": 1}])),
        Case("openai-chat", "name: 5", "messages[0].name", NAMED, chat([{"role": "user", "content": "hi", "name": 5}])),
        Case("openai-chat", "tools", "tools", NAMED, openai("chat", {"tools": [{"type": "function"}]})),
        Case("openai-chat", "max_completion_tokens: \"x\"", "max_completion_tokens", NAMED,
             openai("chat", {"max_completion_tokens": "x"})),
    ]
    return out


TOKENS = {"input_ids": np.array([[5, 6, 7]], dtype=np.int32), "input_lengths": np.array([[3]], dtype=np.int32),
          "request_output_len": np.array([[2]], dtype=np.int32), "end_id": np.array([[0]], dtype=np.int32)}
"""A valid `tensorrt_llm` request (token ids)."""


def _long(kind: str, chars: int) -> dict:
    text = "a" * chars
    return {"prompt": text} if kind == "completion" else {"messages": [{"role": "user", "content": text}]}


def _raw_body(kind: str, extra: bytes) -> bytes:
    """A body json.dumps would not write (NaN, raw bytes); the model's name is filled in at send."""
    base = OK_CHAT if kind == "chat" else OK_COMPLETION
    return b"{" + json.dumps(base)[1:-1].encode() + b", " + extra + b', "model": "@MODEL@"}'


# ---- running ----------------------------------------------------------------------------------


def classify(case: Case, status: str, message: str) -> Result:
    named = case.field.lower() in message.lower()
    grpc_error = status.startswith("grpc") and status != "grpc OK"
    code = int(status) if status.isdigit() else None
    if status in ("200", "grpc OK") and not message:
        cls = OK
    elif code == 500 and case.protocol.startswith("http"):
        cls = T500 if named else T500U
    elif status == "grpc StatusCode.INTERNAL":  # gRPC's 500: not a refusal the client can act on by its code
        cls = OTHER
    elif grpc_error or (code is not None and 400 <= code < 500):
        cls = NAMED if named else UNNAMED
    else:
        cls = OTHER
    if cls == OK and case.expect != OK:
        cls = OTHER  # accepted what should have been refused
    source = "project" if case.protocol.startswith("openai") or _project_message(message) else "triton"
    return Result(case.protocol, case.model, case.name, case.field, status, named, source, cls, case.expect,
                  message[:400])


def _project_message(message: str) -> bool:
    """aligned_llm's and the front models' refusals start "<input>: " (a name in lower case)."""
    head, sep, _ = message.partition(": ")
    return bool(sep) and head.replace("_", "").isalpha() and head.islower() and " " not in head


def run(target: Target, selected: list[Case]) -> list[Result]:
    out = []
    for case in selected:
        try:
            status, message = case.send(target)
        except Exception as e:  # the client itself failed: a closed connection, a timeout
            status, message = "client error", f"{type(e).__name__}: {e}"
        out.append(classify(case, status, message))
    return out


def start_server(engine_dir: Path, log: Path | None = None, models: tuple[str, ...] = ()) -> tuple[TritonServer, Target]:
    """tritonserver with the OpenAI API beside it; models: load only these (default: all of model_repo/)."""
    port, oai = free_port(3), free_port()
    extra = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)] if models else []
    srv = TritonServer(Path(engine_dir), port, port + 1, port + 2, log_path=log, extra_args=extra,
                       env={"ALIGNED_OPENAI_PORT": str(oai), "ALIGNED_ADMIN_PORT": "0"})
    srv.start(timeout=300)
    try:
        wait_for_http(f"http://127.0.0.1:{oai}/v1/models", 120, srv.proc)
        name = requests.get(f"http://127.0.0.1:{oai}/v1/models", timeout=10).json()["data"][0]["id"]
    except BaseException:
        srv.stop()
        raise
    return srv, Target(srv.http_url, f"127.0.0.1:{port + 1}", f"http://127.0.0.1:{oai}", name)


def report(results: list[Result], command: str) -> str:
    counts = Counter(r.cls for r in results)
    lines = [
        "# Malformed inputs against a real server", "",
        f"`{command}`", "",
        f"{len(results)} cases; " + ", ".join(f"{counts[c]} {c}" for c in (NAMED, UNNAMED, T500, T500U, OK, OTHER)) + ".",
        f"{sum(r.as_expected for r in results)} of {len(results)} answered as documented (`expect`).", "",
        "| protocol | model | case | status | names the field | answered by | class | message |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        named = "-" if r.cls == OK else ("yes" if r.named else "no")
        cls = r.cls if r.as_expected else f"**{r.cls}** (expected {r.expect})"
        msg = r.message.replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {r.protocol} | {r.model} | {r.case} | {r.status} | {named} | {r.source} | {cls} | {msg} |")
    by_proto = Counter((r.protocol, r.cls) for r in results)
    lines += ["", "| protocol | " + " | ".join((NAMED, UNNAMED, T500, T500U, OK, OTHER)) + " |",
              "|---|" + "---|" * 6]
    for proto in dict.fromkeys(r.protocol for r in results):
        lines.append(f"| {proto} | " + " | ".join(str(by_proto[(proto, c)]) for c in (NAMED, UNNAMED, T500, T500U, OK, OTHER))
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--out", type=Path, default=Path("bench/results/malformed-inputs"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    selected = cases()
    log = Path(tempfile.mkdtemp(prefix="malformed-")) / "server.log"
    srv, target = start_server(Path(a.engine_dir), log)
    print(f"server log: {log}", file=sys.stderr)
    try:
        results = run(target, selected)
    finally:
        srv.stop()
    command = "python -m bench.malformed_inputs " + " ".join(argv if argv is not None else sys.argv[1:])
    (a.out / "results.json").write_text(json.dumps({
        "command": command, "counts": Counter(r.cls for r in results),
        "cases": [asdict(r) | {"as_expected": r.as_expected} for r in results]}, indent=2, ensure_ascii=False) + "\n")
    text = report(results, command)
    (a.out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

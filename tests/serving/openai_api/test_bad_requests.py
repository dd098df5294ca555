"""Malformed requests over real HTTP: each gets a 4xx with OpenAI's error object naming the field
and the limit, before any generation, and the server goes on serving."""
from __future__ import annotations

import httpx
import pytest

MODEL = "demo"
CHAT = [{"role": "user", "content": "Hi"}]
OK_CHAT = {"model": MODEL, "messages": CHAT, "max_tokens": 4}
OK_COMPLETION = {"model": MODEL, "prompt": "Sampling", "max_tokens": 4}

CASES = [
    # (endpoint, body, status, param, words in the message)
    ("chat", {**OK_CHAT, "temperature": "hot"}, 400, "temperature", "expected a number"),
    ("chat", {**OK_CHAT, "temperature": 2.5}, 400, "temperature", "2.5 is outside [0, 2]"),
    ("chat", {**OK_CHAT, "top_p": 1.5}, 400, "top_p", "1.5 is outside [0, 1]"),
    ("chat", {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens", "0 is outside [1, 256]"),
    ("chat", {**OK_CHAT, "max_tokens": 10_000}, 400, "max_tokens", "10000 is outside [1, 256]"),
    ("chat", {**OK_CHAT, "max_completion_tokens": 2.5}, 400, "max_completion_tokens", "expected an integer"),
    ("chat", {**OK_CHAT, "max_tokens": 250}, 400, "max_tokens", "exceeds max_seq_len (256)"),
    ("chat", {**OK_CHAT, "n": 2}, 400, "n", "n = 1"),
    ("chat", {**OK_CHAT, "model": "gpt-4o"}, 404, "model", "'gpt-4o' does not exist here; this server serves 'demo'"),
    ("chat", {"messages": CHAT}, 400, "model", "required"),
    ("chat", {**OK_CHAT, "messages": []}, 400, "messages", "empty"),
    ("chat", {**OK_CHAT, "messages": "Hi"}, 400, "messages", "expected a list"),
    ("chat", {**OK_CHAT, "messages": [{"role": "bot", "content": "Hi"}]}, 400, "messages[0].role",
     "'bot' is not one of system, developer, user, assistant"),
    ("chat", {**OK_CHAT, "messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content",
     "expected a string or a list of text parts"),
    ("chat", {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0].type", "text only"),
    ("chat", {**OK_CHAT, "messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, 400,
     "messages[0].role", "does not call tools"),
    ("chat", {**OK_CHAT, "stream": "yes"}, 400, "stream", "expected true or false"),
    ("chat", {**OK_CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", "stream: true"),
    ("chat", {**OK_CHAT, "stop": ["a", 3]}, 400, "stop[1]", "expected a string"),
    ("chat", {**OK_CHAT, "stop": [""]}, 400, "stop[0]", "empty stop string"),
    ("chat", {**OK_CHAT, "seed": -1}, 400, "seed", "outside [0, 2**63 - 1]"),
    ("chat", {**OK_CHAT, "logprobs": True}, 400, "logprobs", "does not return log probabilities"),
    ("chat", {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "does not call tools"),
    ("chat", {**OK_CHAT, "response_format": {"type": "json_object"}}, 400, "response_format", "JSON mode"),
    ("chat", {**OK_CHAT, "frequency_penalty": 2.5}, 400, "frequency_penalty", "outside"),
    ("chat", {**OK_CHAT, "repetition_penalty": 0}, 400, "repetition_penalty", "must be > 0"),
    ("chat", {**OK_CHAT, "min_tokens": -1}, 400, "min_tokens", ">= 0"),
    ("chat", {**OK_CHAT, "temprature": 0.5}, 400, "temprature", "unrecognized request argument"),
    ("chat", [OK_CHAT], 400, None, "must be a JSON object"),
    ("completion", {**OK_COMPLETION, "prompt": ""}, 400, "prompt", "empty"),
    ("completion", {**OK_COMPLETION, "prompt": ["one", "two"]}, 400, "prompt", "one prompt per request"),
    ("completion", {**OK_COMPLETION, "prompt": [1, 2, 9999]}, 400, "prompt", "outside the vocabulary"),
    ("completion", {**OK_COMPLETION, "prompt": "x" * 300}, 400, "prompt", "301 tokens; the limit is 255"),
    ("completion", {**OK_COMPLETION, "prompt": "x" * 20_000}, 400, "prompt", "20000 bytes is over max_prompt_bytes"),
    ("completion", {**OK_COMPLETION, "echo": True}, 400, "echo", "echoing the prompt is not implemented"),
    ("completion", {**OK_COMPLETION, "messages": CHAT}, 400, "messages", "unrecognized request argument"),
]


@pytest.fixture(scope="module")
def http(engine, demo_engine_dir):
    """One server for every case: each bad request must leave it serving."""
    from orchestrator.config import ServeConfig
    from orchestrator.service import Orchestrator
    from serving.openai_api import OpenAIServer
    from serving.tokenizer import load_tokenizer

    orch = Orchestrator(engine, ServeConfig()).start()
    with OpenAIServer(orch, load_tokenizer(demo_engine_dir), demo_engine_dir, port=0) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            client.orch = orch
            yield client
    orch.stop()


def path(endpoint: str) -> str:
    return "/chat/completions" if endpoint == "chat" else "/completions"


@pytest.mark.parametrize("endpoint, body, status, param, words", CASES,
                         ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_a_bad_field_is_named_with_its_limit(http, endpoint, body, status, param, words):
    r = http.post(path(endpoint), json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error
    assert http.post(path(endpoint), json=OK_CHAT if endpoint == "chat" else OK_COMPLETION).status_code == 200


def test_neutral_values_of_unimplemented_fields_and_harmless_fields_are_accepted(http):
    body = {**OK_CHAT, "logprobs": False, "frequency_penalty": 0, "presence_penalty": 0.0, "tools": [],
            "tool_choice": "none", "response_format": {"type": "text"}, "n": 1, "user": "someone",
            "metadata": {"k": "v"}, "parallel_tool_calls": True}
    assert http.post("/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("content, status, code, words", [
    (b"{not json", 400, "invalid_json", "not valid JSON"),
    (b"", 400, "invalid_json", "not valid JSON"),
    (b'{"model": "demo", "prompt": "' + b"x" * 200_000 + b'"}', 413, "request_too_large", "at most"),
])
def test_bodies_that_are_not_json_or_too_large(http, content, status, code, words):
    r = http.post("/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"]
    assert http.post("/completions", json=OK_COMPLETION).status_code == 200


def test_unknown_paths_and_methods_get_the_error_object(http):
    r = http.post("/engines/demo/completions", json=OK_COMPLETION)
    assert r.status_code == 404 and "POST /v1/chat/completions" in r.json()["error"]["message"]
    r = http.get("/chat/completions")
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]["message"]
    r = http.get("/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_template_that_refuses_the_conversation_is_a_400(engine, demo_engine_dir, tmp_path):
    import shutil

    from orchestrator.config import ServeConfig
    from orchestrator.service import Orchestrator
    from serving.openai_api import OpenAIServer
    from serving.tokenizer import load_tokenizer

    strict = tmp_path / "strict"
    shutil.copytree(demo_engine_dir, strict)
    (strict / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must come from the user') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    orch = Orchestrator(engine, ServeConfig()).start()
    with OpenAIServer(orch, load_tokenizer(strict), strict, port=0) as server:
        r = httpx.post(server.base_url + "/chat/completions", timeout=30, json={
            "model": "strict", "messages": [{"role": "assistant", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "the first message must come from the user" in r.json()["error"]["message"]
    orch.stop()

"""The OpenAI-compatible API over HTTP, as the wire format reads: completions and chat, streamed
and whole, usage, stop strings, max_completion_tokens, seeds, and that every request goes
through the one orchestrator."""
from __future__ import annotations

import json

import httpx
import pytest

from orchestrator.config import ServeConfig
from orchestrator.service import Orchestrator
from serving.openai_api import OpenAIServer
from serving.tokenizer import load_tokenizer

MODEL = "demo"  # the engine directory's name
PROMPT = "Sampling"
"""The demo model (random weights) runs to max_tokens on this prompt greedily, with printable
ASCII in its output; on some prompts it says EOS at once."""
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def http(served):
    _, server = served
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def post(http, path, **body):
    r = http.post(path, json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(http, path, **body) -> list[dict]:
    """The data of each server-sent event, [DONE] last (as the string)."""
    events = []
    with http.stream("POST", path, json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]"
    return events[:-1]


def test_models_lists_the_engine_by_its_directory_name(http):
    models = http.get("/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert http.get(f"/models/{MODEL}").json()["id"] == MODEL


def test_completion_whole_and_streamed_give_the_same_greedy_text(http):
    whole = post(http, "/completions", prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    (choice,) = whole["choices"]
    assert choice["finish_reason"] == "length" and choice["index"] == 0 and choice["text"]
    assert whole["usage"] == {"prompt_tokens": len(PROMPT) + 1, "completion_tokens": 12,  # bytes + <s>
                              "total_tokens": len(PROMPT) + 13}
    chunks = stream(http, "/completions", prompt=PROMPT, max_tokens=12, temperature=0)
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage


def test_chat_whole_and_streamed(http):
    whole = post(http, "/chat/completions", messages=CHAT, max_tokens=10, temperature=0)
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    (choice,) = whole["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    # ChatML from the engine's template, no <s> added: "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert whole["usage"]["prompt_tokens"] == 52 and whole["usage"]["completion_tokens"] == 10
    chunks = stream(http, "/chat/completions", messages=CHAT, max_tokens=10, temperature=0)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_include_usage_adds_a_final_usage_chunk(http):
    chunks = stream(http, "/chat/completions", messages=CHAT, max_tokens=6, temperature=0,
                    stream_options={"include_usage": True})
    *body, last = chunks
    assert all(c["usage"] is None for c in body)
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 52, "completion_tokens": 6,
                                                       "total_tokens": 58}


def ascii_run(text: str, size: int = 3) -> str:
    """The first run of `size` printable ASCII characters after the first character."""
    for i in range(1, len(text) - size + 1):
        if all(33 <= ord(ch) <= 126 for ch in text[i:i + size]):
            return text[i:i + size]
    pytest.fail(f"no printable ASCII run of {size} in {text!r}")


def test_stop_strings_match_across_token_boundaries_and_the_text_stops_before_them(http):
    full = post(http, "/completions", prompt=PROMPT, max_tokens=40, temperature=0)["choices"][0]["text"]
    stop = ascii_run(full)  # three bytes: three tokens of the byte tokenizer
    expected = full[:full.index(stop)]
    whole = post(http, "/completions", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop)
    assert whole["choices"][0]["text"] == expected and whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] < 40
    chunks = stream(http, "/completions", prompt=PROMPT, max_tokens=40, temperature=0,
                    stop=["never appears", stop])
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_max_completion_tokens_wins_over_max_tokens(http):
    whole = post(http, "/chat/completions", messages=CHAT, max_completion_tokens=3, max_tokens=9, temperature=0)
    assert whole["usage"]["completion_tokens"] == 3 and whole["choices"][0]["finish_reason"] == "length"


def test_without_max_tokens_the_answer_fits_what_the_prompt_leaves(http):
    whole = post(http, "/completions", prompt="x" * 240, temperature=0)  # 241 of 256 tokens
    assert whole["usage"]["prompt_tokens"] == 241 and 0 < whole["usage"]["completion_tokens"] <= 15


def test_seeded_sampling_is_reproducible(http):
    def sample(seed):
        return post(http, "/completions", prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.95,
                    seed=seed)["choices"][0]["text"]

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and a != c


def test_requests_go_through_the_one_orchestrator(served, http, wait_for):
    orch, _ = served
    before = orch.snapshot().totals["finished"].get("length", 0)
    r = http.post("/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    request_id = r.headers["x-request-id"]
    view = wait_for(lambda: orch.snapshot().find(request_id), what="the request in the snapshot")
    assert view.finish_reason == "length" and view.prompt_len == len(PROMPT) + 1
    assert orch.snapshot().totals["finished"]["length"] == before + 1


def test_a_client_that_drops_a_whole_request_has_it_cancelled(slow_served, wait_for, kv_idle):
    orch, server = slow_served
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.base_url + "/chat/completions", timeout=0.5,
                   json={"model": MODEL, "messages": CHAT, "max_tokens": 150, "temperature": 0})
    view = wait_for(lambda: (fin := orch.snapshot().finished) and fin[-1], what="the request to end")
    assert view.finish_reason == "cancelled" and view.tokens < 150
    wait_for(lambda: kv_idle(orch), what="every KV block free")


def test_a_draining_server_answers_503(served, http):
    orch, _ = served
    orch.drain()
    r = http.post("/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_unavailable"
    assert "draining" in r.json()["error"]["message"]
    orch.resume()
    assert http.post("/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4}).status_code == 200


def test_a_full_queue_answers_429_naming_the_limit(engine, demo_engine_dir):
    # No run loop: the first request stays queued, so the second finds the queue (max_queue=1) full.
    orch = Orchestrator(engine, ServeConfig(max_queue=1))
    with OpenAIServer(orch, load_tokenizer(demo_engine_dir), demo_engine_dir, port=0) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as http:
        with http.stream("POST", "/chat/completions", json={"model": MODEL, "messages": CHAT, "stream": True}) as r:
            assert r.status_code == 200
            r = http.post("/completions", json={"model": MODEL, "prompt": PROMPT})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert "max_queue=1" in r.json()["error"]["message"]
    orch.stop()


def test_an_engine_without_a_chat_template_refuses_chat_clearly(engine, demo_engine_dir, tmp_path):
    orch = Orchestrator(engine, ServeConfig()).start()
    bare = tmp_path / "bare"
    bare.mkdir()  # the template is read from here: it has none
    server = OpenAIServer(orch, load_tokenizer(demo_engine_dir), bare, port=0, model_name=MODEL).start()
    try:
        r = httpx.post(server.base_url + "/chat/completions", json={"model": MODEL, "messages": CHAT}, timeout=30)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "chat_template_missing" and error["param"] == "messages"
        assert "no chat template" in error["message"] and "chat_template.jinja" in error["message"]
        r = httpx.post(server.base_url + "/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200
    finally:
        server.stop()
        orch.stop()

"""The official `openai` Python client against the server on a real port: chat and completions,
streamed and whole, its error classes, and a stream it closes early (the request is cancelled in
the orchestrator and no KV block stays held)."""
from __future__ import annotations

import openai
import pytest

MODEL = "demo"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]


def test_chat_whole_and_streamed(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8
    pieces = []
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason
        else:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content and reason == "length"
    assert usage.completion_tokens == 8 and usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_whole_and_streamed(client):
    whole = client.completions.create(model=MODEL, prompt="Sampling", max_tokens=10, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt="Sampling", max_tokens=10, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == [MODEL]


def test_the_client_raises_its_own_error_classes(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=3)
    assert e.value.body["param"] == "temperature" and "outside [0, 2]" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"


def test_closing_a_stream_early_cancels_the_request_and_frees_its_kv(slow_served, wait_for, kv_idle):
    orch, server = slow_served
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=150, temperature=0, stream=True)
    request_id = stream.response.headers["x-request-id"]
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    view = wait_for(lambda: (v := orch.snapshot().find(request_id)) and v.finished and v, what="the cancel")
    assert view.finish_reason == "cancelled" and view.tokens < 150
    wait_for(lambda: kv_idle(orch), what="every KV block free")
    # The server goes on serving.
    assert client.completions.create(model=MODEL, prompt="Sampling", max_tokens=3).usage.completion_tokens == 3
    client.close()

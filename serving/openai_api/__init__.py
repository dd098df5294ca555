"""An OpenAI-compatible API in front of the orchestrator (DESIGN.md §5), for everyone who is not a
Triton user: GET /v1/models, POST /v1/completions and POST /v1/chat/completions, streaming as
server-sent events or not, with usage, stop strings, seeds and OpenAI's error objects.

    server = OpenAIServer(orch, tokenizer, engine_dir, port=8080).start()
    client = openai.OpenAI(base_url=server.base_url, api_key="unused")
    client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi"}])
    server.stop()

It runs in the process that holds the orchestrator (Triton's model.py when `openai_port` is
set), on its own thread and port: one model, one queue, one dashboard for both APIs.
"""
from serving.openai_api.app import create_app
from serving.openai_api.chat_template import ChatTemplate
from serving.openai_api.server import OpenAIServer

__all__ = ["create_app", "ChatTemplate", "OpenAIServer"]

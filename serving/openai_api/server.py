"""The OpenAI-compatible API on its own port and thread, beside Triton in the model's process."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from orchestrator.service import Orchestrator
from serving.http_thread import HttpThread
from serving.openai_api.app import create_app
from serving.openai_api.chat_template import TEMPLATE_FILE, TOKENIZER_CONFIG, ChatTemplate


class OpenAIServer(HttpThread):
    """`OpenAIServer(orch, tokenizer, engine_dir, port=8080).start()`: serves `orch` as
    `model_name` (default: the engine directory's name), with the engine's chat template.
    There is no API key: keep host on loopback unless something in front controls access."""

    def __init__(self, orch: Orchestrator, tokenizer: Tokenizer, engine_dir: str | Path, host: str = "127.0.0.1",
                 port: int = 0, model_name: str | None = None):
        engine_dir = Path(engine_dir)
        self.orch = orch
        self.model_name = model_name or engine_dir.resolve().name
        template = ChatTemplate.from_engine_dir(engine_dir)
        why = f"neither {TEMPLATE_FILE} nor chat_template in {TOKENIZER_CONFIG} in {engine_dir}"
        super().__init__(create_app(orch, tokenizer, self.model_name, template, no_template_reason=why), host, port,
                         name="OpenAI API server", port_setting="openai_port (ALIGNED_OPENAI_PORT)")

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as base_url."""
        return self.url + "v1"

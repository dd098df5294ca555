"""The engine's chat template: messages -> the prompt text the model was trained on.

Read from the engine directory (`chat_template.jinja`, else `chat_template` in
`tokenizer_config.json`, as `make build-engine` copies them from the checkpoint) and rendered as
transformers' `apply_chat_template` renders it: a jinja2 ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, `raise_exception`, a `tojson` that does not escape HTML,
`strftime_now`, the tokenizer's special tokens (`bos_token`, `eos_token`, ...) and
`add_generation_prompt=True`. Templates come from model repositories: the sandbox is why they
may not reach Python internals.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed on it."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant tokens with it):
    renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """One compiled chat template with the special tokens it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not parse: {e.message} (line {e.lineno})") from e
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path) -> "ChatTemplate | None":
        """The engine's template, or None when it has none."""
        engine_dir = Path(engine_dir)
        config_path = engine_dir / TOKENIZER_CONFIG
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except ValueError as e:
                raise ValueError(f"{config_path} is not valid JSON ({e}); rebuild the engine") from e
        special = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        if (engine_dir / TEMPLATE_FILE).is_file():
            return cls((engine_dir / TEMPLATE_FILE).read_text(), special)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        return cls(source, special) if isinstance(source, str) and source else None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages`; TemplateError with the template's own words if it refuses."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:  # undefined variables, sandbox refusals
            raise TemplateError(f"the chat template failed on these messages: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise TemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e

"""Chat templates render as transformers' apply_chat_template renders them (checked against
transformers itself), are read from the engine directory, and refuse clearly."""
from __future__ import annotations

import json
import shutil

import pytest

from serving.openai_api.chat_template import ChatTemplate, TemplateError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>\"there\"</b>"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Ünïcode?"}]

TEMPLATES = {
    "llama-like": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] | trim }}\n<</SYS>>\n\n"
        "{% else %}[{{ message['role'] | upper }}] {{ message['content'] }}"
        "{{ eos_token if message['role'] == 'assistant' }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"),
    "tojson and loop controls": (
        "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
        "{{ m | tojson }}\n{% if m.content.startswith('Hello') %}{% break %}{% endif %}{% endfor %}"),
    "whitespace control": (
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n<u>{{ m.content }}</u>\n    {% endif %}\n"
        "{% endfor %}\n{% generation %}{% if add_generation_prompt %}<a>{% endif %}{% endgeneration %}"),
}


@pytest.fixture(scope="module")
def hf_tokenizer(demo_engine_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(demo_engine_dir))


def test_the_demo_engines_chatml_template_renders_as_transformers_does(demo_engine_dir, hf_tokenizer):
    ours = ChatTemplate.from_engine_dir(demo_engine_dir).render(MESSAGES)
    assert ours == hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>user\nÜnïcode?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_features_render_as_transformers_does(demo_engine_dir, hf_tokenizer, name):
    source = TEMPLATES[name]
    ours = ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"}).render(MESSAGES)
    theirs = hf_tokenizer.apply_chat_template(MESSAGES, chat_template=source, tokenize=False,
                                              add_generation_prompt=True)
    assert ours == theirs


def test_chat_template_jinja_wins_over_tokenizer_config(demo_engine_dir, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(demo_engine_dir, engine)
    (engine / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[-1]['content'] }}")
    assert ChatTemplate.from_engine_dir(engine).render([{"role": "user", "content": "x"}]) == "<s>x"


def test_named_templates_and_added_token_dicts_in_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<|begin|>"},
        "chat_template": [{"name": "tool_use", "template": "tools"},
                          {"name": "default", "template": "{{ bos_token }}"}],
    }))
    assert ChatTemplate.from_engine_dir(tmp_path).render([]) == "<|begin|>"


def test_no_template_is_none(tmp_path):
    assert ChatTemplate.from_engine_dir(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.from_engine_dir(tmp_path) is None


def test_refusals_and_sandbox_escapes_are_template_errors():
    strict = ChatTemplate("{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}ok")
    with pytest.raises(TemplateError, match="one message only"):
        strict.render(MESSAGES)
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError, match="failed on these messages"):
        escape.render(MESSAGES)
    with pytest.raises(TemplateError, match="failed on these messages"):
        ChatTemplate("{{ messages.append(1) }}").render(MESSAGES)  # immutable sandbox
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for %}")

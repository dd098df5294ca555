"""ServeConfig layers: defaults < file < ALIGNED_* environment < explicit overrides, and every
bad value is refused with the field's name."""
from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, ServeConfig


def test_layers_override_in_order(tmp_path):
    f = tmp_path / "serve.toml"
    f.write_text('max_batch_size = 8\nmax_queue = 10\npolicy = "fcfs"\n')
    cfg = ServeConfig.load(file=f, env={"ALIGNED_MAX_QUEUE": "20", "ALIGNED_DEVICE": "cpu", "HOME": "/x"},
                           max_prefill_tokens=512)
    assert (cfg.max_batch_size, cfg.max_queue, cfg.device, cfg.max_prefill_tokens) == (8, 20, "cpu", 512)


def test_string_overrides_from_a_triton_model_config_are_converted():
    cfg = ServeConfig.load(env={}, max_batch_size="16", idle_wait_s="0.01", engine_dir="/e")
    assert (cfg.max_batch_size, cfg.idle_wait_s, cfg.engine_dir) == (16, 0.01, "/e")
    with pytest.raises(ConfigError, match="override: max_queue must be int, got 'many'"):
        ServeConfig.load(env={}, max_queue="many")


def test_json_file(tmp_path):
    f = tmp_path / "serve.json"
    f.write_text('{"max_batch_size": 3}')
    assert ServeConfig.load(file=f, env={}).max_batch_size == 3


def test_manifest_fills_the_model_limits():
    cfg = ServeConfig(max_tokens_limit=0).with_manifest(max_seq_len=512)
    assert cfg.max_seq_len == 512 and cfg.max_tokens_limit == 512
    assert ServeConfig(max_seq_len=128).with_manifest(512).max_tokens_limit == 128
    with pytest.raises(ConfigError, match="max_seq_len: 1024 exceeds the engine's 512"):
        ServeConfig(max_seq_len=1024).with_manifest(512)


@pytest.mark.parametrize("env, words", [
    ({"ALIGNED_MAX_BATCH_SIZE": "lots"}, "ALIGNED_MAX_BATCH_SIZE: max_batch_size must be int, got 'lots'"),
    ({"ALIGNED_MAX_BATCH_SIZE": "0"}, "max_batch_size: must be >= 1, got 0"),
    ({"ALIGNED_POLICY": "random"}, "policy: 'random' is not one of adaptive, aligned, fcfs, fcfs-offload"),
    ({"ALIGNED_DTYPE": "int4"}, "dtype: 'int4' is not float32 or bfloat16"),
    ({"ALIGNED_NO_SUCH_THING": "1"}, "unknown setting 'no_such_thing'"),
])
def test_bad_values_name_the_field(env, words):
    with pytest.raises(ConfigError) as e:
        ServeConfig.load(env=env)
    assert words in str(e.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ServeConfig.load(file=tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("max_batch_size = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        ServeConfig.load(file=bad, env={})


def test_every_field_is_documented():
    import inspect

    import orchestrator.config as mod

    src = inspect.getsource(mod.ServeConfig)
    for name in ServeConfig.__dataclass_fields__:
        after = src.split(f"    {name}:", 1)[1].split("\n", 2)[1]
        assert after.strip().startswith('"""'), f"field {name} has no docstring"

"""`make build-engine` and the demo checkpoint: reproducible output, one clear error per bad input."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from build_scripts.build_engine import main
from build_scripts.dtype_choice import default_dtype
from build_scripts.kv_budget import CPU_SEQUENCES
from build_scripts.torch_build import DTYPE_BYTES
from build_scripts.demo_checkpoint import BOS_ID, EOS_ID, make_demo_checkpoint
from engines.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory) -> Path:
    return make_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", seed=0)


@pytest.fixture
def ckpt(demo_ckpt, tmp_path) -> Path:
    """A private copy of the demo checkpoint for a test to break."""
    return Path(shutil.copytree(demo_ckpt, tmp_path / "ckpt"))


def build(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process; return (exit status, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], f"temporary directories left behind: {leftovers}"


# --- the demo checkpoint ---------------------------------------------------------------------


def test_demo_checkpoint_is_reproducible_per_seed(demo_ckpt, tmp_path):
    again = make_demo_checkpoint(tmp_path / "again", seed=0)
    other = make_demo_checkpoint(tmp_path / "other", seed=1)
    assert dir_bytes(again) == dir_bytes(demo_ckpt)
    assert dir_bytes(other)["model.safetensors"] != dir_bytes(demo_ckpt)["model.safetensors"]
    assert dir_bytes(other)["tokenizer.json"] == dir_bytes(demo_ckpt)["tokenizer.json"]


def test_demo_tokenizer_round_trips_any_utf8(demo_ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_ckpt / "tokenizer.json"))
    for text in ["hello world", " two  spaces\n\ttab", "héllo wörld 日本語 🤖", ""]:
        ids = tok.encode(text).ids
        assert ids[0] == BOS_ID  # like Llama's tokenizer, encode() adds <s>
        assert ids[1:] == list(text.encode("utf-8"))  # one token per byte
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.token_to_id("</s>") == EOS_ID


def test_transformers_loads_the_demo_checkpoint(demo_ckpt):
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file

    model = transformers.LlamaForCausalLM.from_pretrained(demo_ckpt)
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 259
    stored = load_file(demo_ckpt / "model.safetensors")
    loaded = model.state_dict()
    assert set(stored) == set(loaded)
    assert all(torch.equal(stored[k], loaded[k]) for k in stored)


# --- building an engine ----------------------------------------------------------------------


def test_demo_build_is_byte_identical_and_readable(tmp_path, capsys):
    a, b = tmp_path / "a" / "demo", tmp_path / "b" / "demo"
    assert build(["--model", "demo", "--out", str(a)], capsys)[0] == 0
    assert build(["--model", "demo", "--out", str(b)], capsys)[0] == 0
    files = dir_bytes(a)
    assert files == dir_bytes(b)
    assert set(files) == {
        "config.json", "generation_config.json", "manifest.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    }
    m = read_manifest(a)
    dtype = default_dtype()[0]  # no --dtype: this machine's choice (tests/build/test_dtype_choice.py)
    assert (m.backend, m.architecture, m.dtype, m.source) == ("torch", "LlamaForCausalLM", dtype, "demo")
    assert m.max_seq_len == 2048 and m.kv_block_size == 16
    # 2 (K,V) * 4 layers * 2 kv heads * 32 head_dim * 16 tokens * 4 or 2 bytes; without --kv-memory-gb
    # the pool holds CPU_SEQUENCES requests of max_seq_len on a CPU (build_scripts/kv_budget.py:
    # the machine's memory bound does not bite for this model, so rebuilds stay byte-identical),
    # and the host pool twice that (HOST_KV_FACTOR).
    assert m.bytes_per_block == 8192 * DTYPE_BYTES[dtype] and m.kv_blocks_device == CPU_SEQUENCES * 2048 // 16
    assert m.kv_blocks_host == 2 * m.kv_blocks_device
    assert m.extra["kv_budget"].startswith(f"device pool: {CPU_SEQUENCES} requests of 2048 tokens on a CPU")
    assert m.eos_token_ids == (EOS_ID,) and m.bos_token_id == BOS_ID
    assert m.num_params == 804_736


def test_build_options_shape_the_kv_pool(ckpt, tmp_path, capsys):
    out = tmp_path / "engine"
    args = ["--model", str(ckpt), "--out", str(out), "--dtype", "bfloat16", "--block-size", "32",
            "--max-seq-len", "1024", "--kv-memory-gb", "0.5"]
    assert build(args, capsys)[0] == 0
    m = read_manifest(out)
    assert m.dtype == "bfloat16" and m.max_seq_len == 1024 and m.kv_block_size == 32
    assert m.bytes_per_block == 32768 and m.kv_blocks_device == 2**29 // 32768
    assert m.source == str(ckpt.resolve())


def test_host_kv_pool_option(ckpt, tmp_path, capsys):
    out = tmp_path / "engine"
    assert build(["--model", str(ckpt), "--out", str(out), "--host-kv-memory-gb", "0.25", "--dtype", "float32"],
                 capsys)[0] == 0
    m = read_manifest(out)
    assert m.kv_blocks_host == 2**28 // 32768 and m.kv_blocks_device == CPU_SEQUENCES * m.max_seq_len // 16
    from engines.loader import load_engine

    info = load_engine(out, device="cpu", kv_blocks=64).describe()  # the engine takes the manifest's pool
    assert info.host_blocks == m.kv_blocks_host and info.capabilities.can_offload
    code, err = build(["--model", str(ckpt), "--out", str(tmp_path / "e2"), "--host-kv-memory-gb", "-1"], capsys)
    assert code == 2 and "--host-kv-memory-gb must be a number >= 0" in err
    assert_nothing_written(tmp_path / "e2")


def test_kv_budget_too_small_for_one_request(ckpt, tmp_path, capsys):
    out = tmp_path / "engine"
    code, err = build(["--model", str(ckpt), "--out", str(out), "--kv-memory-gb", "0.001"], capsys)
    assert code == 2 and "--kv-memory-gb" in err and "--max-seq-len 2048" in err
    assert_nothing_written(out)


def test_existing_directories(ckpt, tmp_path, capsys):
    out = tmp_path / "engine"
    assert build(["--model", str(ckpt), "--out", str(out)], capsys)[0] == 0
    # An earlier engine is simply rebuilt.
    assert build(["--model", str(ckpt), "--out", str(out), "--block-size", "32"], capsys)[0] == 0
    assert read_manifest(out).kv_block_size == 32
    # Anything else is kept unless --force.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, err = build(["--model", str(ckpt), "--out", str(other)], capsys)
    assert code == 2 and "not an engine directory" in err and "--force" in err
    assert (other / "keep.txt").read_text() == "mine"
    assert build(["--model", str(ckpt), "--out", str(other), "--force"], capsys)[0] == 0
    assert read_manifest(other) and not (other / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "engine", "notes"]


# --- bad checkpoints: one message naming the file and the problem, nothing written -------------


def _rewrite_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _reshard(ckpt: Path) -> None:
    """Split model.safetensors into two shards with an index, as save_pretrained does."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, part in shards.items():
        save_file({n: tensors[n] for n in part}, ckpt / f, metadata={"format": "pt"})
    weight_map = {n: f for f, part in shards.items() for n in part}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (ckpt / "model.safetensors").unlink()


def _rewrite_tensor(ckpt: Path, name: str, how: str) -> None:
    """Change tensor `name` of model.safetensors: "grow" its first dimension by one, "drop" it,
    store it as "int8", or "add" it as a copy of the embeddings."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    if how == "drop":
        del tensors[name]
    elif how == "grow":
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    elif how == "int8":
        tensors[name] = tensors[name].to(torch.int8)
    else:
        tensors[name] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, ckpt / "model.safetensors")


def _rewrite_index(ckpt: Path, edit) -> None:
    """Reshard, then let `edit` change the index's weight_map in place."""
    _reshard(ckpt)
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"\xde\xad\xbe\xef" * (n // 4) + b" " * (n % 4)
    path.write_bytes(bytes(data))


BAD_CHECKPOINTS = {
    # case: (how to break the checkpoint, substrings the error must contain)
    "missing_dir": (lambda c: shutil.rmtree(c), ["ckpt", "does not exist"]),
    "missing_config": (lambda c: (c / "config.json").unlink(), ["config.json is missing"]),
    "corrupt_config": (lambda c: (c / "config.json").write_text('{"architectures": ['),
                       ["config.json is not valid JSON"]),
    "unsupported_architecture": (lambda c: _rewrite_json(c / "config.json", architectures=["GPT2LMHeadModel"]),
                                 ["config.json", "'GPT2LMHeadModel' is not supported", "LlamaForCausalLM"]),
    "missing_weights": (lambda c: (c / "model.safetensors").unlink(), ["holds no weights", "model.safetensors"]),
    "truncated_safetensors": (lambda c: _truncate(c / "model.safetensors"), ["model.safetensors", "truncated"]),
    "garbage_header": (lambda c: _garble_header(c / "model.safetensors"),
                       ["model.safetensors", "header is not valid JSON"]),
    "missing_shard": (lambda c: (_reshard(c), (c / "model-00002-of-00002.safetensors").unlink()),
                      ["model-00002-of-00002.safetensors is missing", "model.safetensors.index.json"]),
    "index_without_weight_map": (lambda c: (_reshard(c), (c / "model.safetensors.index.json").write_text("{}")),
                                 ["model.safetensors.index.json has no 'weight_map' object"]),
    "shard_outside_the_checkpoint": (
        lambda c: _rewrite_index(c, lambda m: m.update({"lm_head.weight": "../x.safetensors"})),
        ["model.safetensors.index.json names shard '../x.safetensors'"]),
    "tensor_not_in_its_shard": (  # lm_head.weight sorts first, so _reshard put it in shard 1
        lambda c: _rewrite_index(c, lambda m: m.update({"lm_head.weight": "model-00002-of-00002.safetensors"})),
        ["model-00002-of-00002.safetensors: tensor lm_head.weight is missing although "
         "model.safetensors.index.json places it there"]),
    "wrong_tensor_shape": (lambda c: _rewrite_tensor(c, "model.layers.1.self_attn.k_proj.weight", "grow"),
                           ["model.safetensors", "model.layers.1.self_attn.k_proj.weight", "shape [65, 128]",
                            "config.json implies [64, 128]"]),
    "missing_tensor": (lambda c: _rewrite_tensor(c, "model.layers.3.mlp.up_proj.weight", "drop"),
                       ["model.safetensors: the weights lack tensor(s) model.layers.3.mlp.up_proj.weight"]),
    "extra_tensor": (lambda c: _rewrite_tensor(c, "model.layers.4.mlp.up_proj.weight", "add"),
                     ["model.safetensors: tensor(s) model.layers.4.mlp.up_proj.weight are not accounted for by "
                      "config.json", "num_hidden_layers"]),
    "non_float_dtype": (lambda c: _rewrite_tensor(c, "model.layers.0.self_attn.q_proj.weight", "int8"),
                        ["model.safetensors: tensor model.layers.0.self_attn.q_proj.weight has dtype I8",
                         "F32, F16, BF16", "no quantized checkpoints"]),
    "config_disagrees_with_weights": (lambda c: _rewrite_json(c / "config.json", intermediate_size=320),
                                      ["model.layers.0.mlp.gate_proj.weight", "shape [352, 128]",
                                       "config.json implies [320, 128]"]),
    "missing_tokenizer": (lambda c: (c / "tokenizer.json").unlink(), ["tokenizer.json is missing"]),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_refused_cleanly(case, ckpt, tmp_path, capsys):
    breaker, expected = BAD_CHECKPOINTS[case]
    breaker(ckpt)
    out = tmp_path / "engine"
    code, err = build(["--model", str(ckpt), "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for s in expected:
        assert s in err, f"{s!r} not in {err!r}"
    assert_nothing_written(out)


def test_cli_exit_status_in_a_real_process(tmp_path):
    out = tmp_path / "engine"
    r = subprocess.run(
        [sys.executable, "-m", "build_scripts.build_engine", "--model", str(tmp_path / "nope"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: model directory {tmp_path / 'nope'} does not exist; " \
                               "pass --model <Hugging Face checkpoint dir>"
    assert_nothing_written(out)

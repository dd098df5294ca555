"""`make build-engine BACKEND=trtllm` and `load_engine` of its directory: with the fake, and without
TensorRT-LLM (one clear line, exit code 2, nothing half-written)."""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from build_scripts.build_engine import main
from build_scripts.demo_checkpoint import make_demo_checkpoint
from engines.base import HOST, PrefillRequest
from engines.loader import backend_unavailable, load_engine
from engines.manifest import read_manifest
from engines.tensorrt_llm.lazy_import import TensorRTLLMUnavailable

REPO = Path(__file__).resolve().parents[3]
INSTALLED = importlib.util.find_spec("tensorrt_llm") is not None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The demo checkpoint (it has the tokenizer.json a build needs)."""
    return make_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", seed=0)


def build(args, capsys) -> tuple[int, str]:
    try:
        main(args)
        return 0, capsys.readouterr().err
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1), capsys.readouterr().err


@pytest.fixture
def no_trtllm(monkeypatch):
    """TensorRT-LLM cannot be imported, even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_build_without_tensorrt_llm_fails_clearly_and_writes_nothing(model_dir, tmp_path, capsys, no_trtllm):
    out = tmp_path / "built" / "eng"
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "not installed" in err and "https://pypi.nvidia.com" in err and "trtllm-python-py3" in err
    assert not out.exists() and (not out.parent.exists() or _leftovers(out.parent) == [])


@pytest.mark.skipif(INSTALLED, reason="TensorRT-LLM is installed here")
def test_make_build_engine_backend_trtllm_exits_2(model_dir, tmp_path):
    out = tmp_path / "eng"
    r = subprocess.run([sys.executable, "-m", "build_scripts.build_engine", "--backend", "trtllm", "--model",
                        str(model_dir), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "TensorRT-LLM" in r.stderr
    assert "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com" in r.stderr
    assert not out.exists() and _leftovers(tmp_path) == []


def test_makefile_passes_the_backend():
    r = subprocess.run(["make", "-n", "build-engine", "BACKEND=trtllm", "MODEL=/m", "VENV=.venv"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if "build_scripts.build_engine" in ln][0]
    assert "--backend trtllm" in line and '--model "/m"' in line
    r = subprocess.run(["make", "-n", "build-engine", "VENV=.venv"], cwd=REPO, capture_output=True, text=True)
    assert "--backend" not in r.stdout  # torch build unchanged


def test_trtllm_options_are_refused_for_torch(model_dir, tmp_path, capsys):
    code, err = build(["--model", str(model_dir), "--out", str(tmp_path / "e"), "--max-batch-size", "4"], capsys)
    assert code == 2 and "only apply to --backend trtllm" in err


def test_llm_api_build_has_the_torch_layout_plus_settings(model_dir, tmp_path, capsys, trtllm, monkeypatch):
    monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", "1.3.0")
    out = tmp_path / "eng"
    sizes = ["--max-seq-len", "128", "--block-size", "8", "--kv-memory-gb", "0.001", "--host-kv-memory-gb", "0.002"]
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out), "--max-batch-size", "8",
                       *sizes], capsys)
    assert code == 0, err
    m = read_manifest(out)
    assert m.backend == "tensorrt_llm" and m.kv_block_size == 8
    s = m.extra["llm_settings"]
    assert s == json.loads((out / "llm_settings.json").read_text())
    assert (s["flavour"], s["max_batch_size"], s["tokens_per_block"], s["max_seq_len"]) == ("llm_api", 8, 8,
                                                                                           m.max_seq_len)
    assert s["kv_max_tokens"] == m.kv_blocks_device * 8 and s["host_pool_blocks"] == m.kv_blocks_host > 0
    assert not (out / "engine").exists() and (out / "config.json").is_file() and (out / m.tokenizer).is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    # the same checkpoint through the torch backend: same weights, same geometry
    code, _ = build(["--model", str(model_dir), "--out", str(tmp_path / "torch"), *sizes], capsys)
    t = read_manifest(tmp_path / "torch")
    assert (t.weights, t.kv_blocks_device, t.bytes_per_block) == (m.weights, m.kv_blocks_device, m.bytes_per_block)

    # served through the loader: the manifest's backend picks TrtllmEngine
    e = load_engine(out)
    try:
        assert os.environ.get("TLLM_WORKER_USE_SINGLE_PROCESS") == "1"
        info = e.describe()
        assert info.backend == "tensorrt_llm" and info.host_blocks == m.kv_blocks_host
        assert info.capabilities.can_offload and e.llm.kwargs["kv_cache_config"].max_tokens == s["kv_max_tokens"]
        e.prefill([PrefillRequest("a", [1, 5, 9])])
        e.decode(["a"])
        e.wait(e.move(["a"], "cuda:0", HOST))
        e.wait(e.move(["a"], HOST, "cuda:0"))
        e.decode(["a"])
        e.free(["a"])
    finally:
        e.close()


def _fake_trtllm_build(tmp_path: Path, monkeypatch) -> Path:
    """Put a fake `trtllm-build` on PATH; returns the file its arguments are written to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "trtllm-build.args"
    script = bin_dir / "trtllm-build"
    # Writes rank0.engine and a config.json whose build_config the fake Executor reads (its own layout).
    script.write_text(f"#!/bin/sh\necho \"$@\" > {log}\n" + r"""
while [ $# -gt 0 ]; do
  case "$1" in
    --output_dir) out="$2";; --max_batch_size) mbs="$2";; --max_seq_len) msl="$2";; --tokens_per_block) tpb="$2";;
    --max_input_len) mil="$2";; --max_num_tokens) mnt="$2";;
  esac; shift
done
mkdir -p "$out" && echo fake > "$out/rank0.engine"
# trtllm-build's defaults where a flag is not given (tensorrt_llm/commands/build.py)
printf '{"build_config": {"max_batch_size": %s, "max_seq_len": %s, "tokens_per_block": %s, "max_input_len": %s, "max_num_tokens": %s}}' \
  $mbs $msl $tpb ${mil:-1024} ${mnt:-8192} > "$out/config.json"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_engine_flavour_runs_conversion_and_trtllm_build(model_dir, tmp_path, capsys, trtllm, monkeypatch):
    log = _fake_trtllm_build(tmp_path, monkeypatch)
    out = tmp_path / "eng"
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out), "--max-batch-size", "16",
                       "--block-size", "32", "--max-seq-len", "128", "--kv-memory-gb", "0.01"], capsys)
    assert code == 0, err
    args = log.read_text().split()
    for flag, value in (("--max_batch_size", "16"), ("--max_seq_len", "128"), ("--kv_cache_type", "paged"),
                        ("--tokens_per_block", "32"), ("--max_input_len", "128"), ("--max_num_tokens", "8192")):
        assert args[args.index(flag) + 1] == value
    m = read_manifest(out)
    assert m.extra["llm_settings"]["flavour"] == "engine" and (out / "engine" / "rank0.engine").is_file()
    s = m.extra["llm_settings"]
    # no KV connector on TensorRT engines: the host tier is TensorRT-LLM's own host cache
    assert m.kv_blocks_host > 0 and s["host_pool_blocks"] == 0
    assert s["host_cache_bytes"] == m.kv_blocks_host * m.bytes_per_block
    e = load_engine(out)  # served by the C++ Executor (fake), parked requests in its host cache
    try:
        assert e.llm.model == str(out / "engine") and e.describe().capabilities.can_offload
        assert e.describe().host_blocks == m.kv_blocks_host
        cfg = e.llm.executor.config
        assert cfg.kv_cache_config.host_cache_size == s["host_cache_bytes"] and cfg.max_batch_size == 16
        assert cfg.parallel_config.device_ids == [0] and not cfg.enable_chunked_context
        e.prefill([PrefillRequest("a", [1, 5, 9])])
        e.decode(["a"])
        e.wait(e.move(["a"], "cuda:0", HOST))
        assert e.kv_blocks_used(HOST) == 1
        e.wait(e.move(["a"], HOST, "cuda:0"))
        e.decode(["a"])
        e.free(["a"])
    finally:
        e.close()
    e = load_engine(out, host_kv_blocks=5)  # the override sizes TensorRT-LLM's host cache on this flavour
    try:
        assert e.describe().host_blocks == 5 and e.llm.config.kv_cache_config.host_cache_size == 5 * m.bytes_per_block
    finally:
        e.close()


def test_an_engine_built_for_long_sequences_takes_a_prompt_over_1024_tokens(model_dir, tmp_path, capsys, trtllm,
                                                                            monkeypatch):
    # trtllm-build's default --max_input_len is 1,024: without the flag a 1,500-token prompt (or
    # a parked request resubmitted with prompt + generated tokens) is refused by the executor.
    _fake_trtllm_build(tmp_path, monkeypatch)
    out = tmp_path / "eng"
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out), "--max-batch-size", "4",
                       "--block-size", "32", "--max-seq-len", "2048", "--kv-memory-gb", "0.01"], capsys)
    assert code == 0, err
    e = load_engine(out)
    try:
        e.prefill([PrefillRequest("long", [1] + [5] * 1499)])
        e.decode(["long"])
        e.free(["long"])
    finally:
        e.close()


def test_failed_trtllm_build_leaves_nothing(model_dir, tmp_path, capsys, trtllm, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtllm-build").write_text("#!/bin/sh\necho 'out of memory' >&2\nexit 3\n")
    (bin_dir / "trtllm-build").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "built" / "eng"
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out)], capsys)
    assert code == 2 and "out of memory" in err and "exit code 3" in err
    assert not out.exists() and _leftovers(out.parent) == []


def test_load_without_tensorrt_llm_fails_clearly(model_dir, tmp_path, capsys, trtllm, monkeypatch):
    monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", "1.3.0")
    out = tmp_path / "eng"
    args = ["--backend", "trtllm", "--model", str(model_dir), "--out", str(out), "--max-seq-len", "128"]
    assert build(args, capsys)[0] == 0
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(TensorRTLLMUnavailable, match="not installed.*pypi.nvidia.com.*trtllm-python-py3"):
        load_engine(out)
    assert backend_unavailable(out).startswith(f"serving the TensorRT-LLM engine {out} needs TensorRT-LLM")
    # `make serve` on it refuses before starting tritonserver: one error line, exit code 2.
    r = subprocess.run([sys.executable, "-m", "serving.triton_server", "--engine-dir", str(out), "--admin-port", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    if not INSTALLED:
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith("error: serving the TensorRT-LLM engine") and "pypi.nvidia.com" in r.stderr
        assert "starting tritonserver" not in r.stdout


def test_too_old_tensorrt_llm_is_refused(model_dir, tmp_path, capsys, trtllm, monkeypatch):
    monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", "0.21.0")
    out = tmp_path / "eng"
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out)], capsys)
    assert code == 2 and "older than 1.0" in err and not out.exists()


def test_zero_batch_size_is_refused(model_dir, tmp_path, capsys, trtllm):
    out = tmp_path / "eng"
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out), "--max-batch-size", "0"],
                      capsys)
    assert code == 2 and "--max-batch-size must be > 0" in err and not out.exists()


def test_llm_api_with_a_helper_parks_in_tensorrt_llms_host_cache(model_dir, tmp_path, capsys, trtllm, monkeypatch):
    """The connector refuses generation-only requests: with a helper device the same host memory
    becomes TensorRT-LLM's own host cache, and both parking and the hand-off work.

    And the context instance runs on the helper GPU. TensorRT-LLM's worker takes visible device
    `rank % count` (the fake copies base_worker.py), so an `LLM` made in the engine's process after
    `torch.cuda.set_device(helper)` landed on the decode GPU; it now runs in its own process that
    sees only the helper GPU (here physical GPU 6: cuda:1 of CUDA_VISIBLE_DEVICES=4,6)."""
    from engines.tensorrt_llm.context_process import PRELOAD_ENV, ContextProcessLLM
    from engines.tensorrt_llm.host_cache import HostCacheBooks

    monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", "1.3.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setenv(PRELOAD_ENV, f"{trtllm.__file__}:install_in_child")  # the fake, in the child too
    out = tmp_path / "eng"
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out), "--max-seq-len", "128",
                       "--block-size", "8", "--kv-memory-gb", "0.001", "--host-kv-memory-gb", "0.002",
                       "--cache-transceiver", "NIXL"], capsys)
    assert code == 0, err
    m = read_manifest(out)
    e = load_engine(out, helper_devices=("cuda:1",))
    try:
        assert isinstance(e.pool, HostCacheBooks) and e.describe().host_blocks == m.kv_blocks_host
        kw = e.llm.kwargs
        assert kw["kv_connector_config"] is None
        assert kw["kv_cache_config"].host_cache_size == m.kv_blocks_host * m.bytes_per_block
        caps = e.describe().capabilities
        assert caps.can_offload and caps.can_peer_copy
        assert isinstance(e.ctx_llm, ContextProcessLLM) and e.ctx_llm.cuda_visible_devices == "6"
        prompt = [1, 5, 9]
        h = e.start_prefill([PrefillRequest("a", prompt)], "cuda:1")
        e.wait_any([h])
        got = [e.prefill_result(h).tokens["a"]]
        e.wait(e.move(["a"], "cuda:1", "cuda:0"))
        assert e.llm.gpu == "4" and e.llm.submitted[0].disagg.ctx_info_endpoint.startswith("fake-ctx://gpu6/")
        got.append(e.decode(["a"]).tokens["a"])
        assert got == trtllm.reference_tokens(prompt, 2)
        e.wait(e.move(["a"], "cuda:0", HOST))
        e.wait(e.move(["a"], HOST, "cuda:0"))
        e.decode(["a"])
        e.free(["a"])
        assert e.kv_blocks_used(HOST) == 0
    finally:
        e.close()


@pytest.mark.parametrize("version", ["1.3.0", "1.2.1"])
def test_verify_engine_passes_on_both_flavours_and_catches_a_bad_load(version, model_dir, tmp_path, capsys, trtllm,
                                                                     monkeypatch):
    """`make verify-engine` (engines/verify.py) over the fake: the step a GPU host runs after building."""
    from engines.tensorrt_llm import kv_connector
    from engines.verify import main as verify_main

    monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", version)
    _fake_trtllm_build(tmp_path, monkeypatch)
    out = tmp_path / "eng"
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out), "--max-seq-len", "128",
                       "--block-size", "8", "--kv-memory-gb", "0.001", "--host-kv-memory-gb", "0.002"], capsys)
    assert code == 0, err
    args = [str(out), "--tokens", "12", "--prompt", "abc abc abc abc"]  # ids inside the fake's vocabulary
    assert verify_main(args) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.count("PASS") == 3  # uninterrupted, park-resume, no-leak (hand-off: SKIP)
    if version == "1.3.0":  # the connector's load is what park-resume checks on the LLM-API flavour
        real = kv_connector.HostPoolMover.load

        def bad_load(self, plan):
            if self.host_kv is not None:
                self.host_kv += 1
            real(self, plan)

        monkeypatch.setattr(kv_connector.HostPoolMover, "load", bad_load)
        assert verify_main(args) == 1
        assert "FAIL  park-resume" in capsys.readouterr().out


def test_llm_api_refuses_a_decode_device_its_worker_would_not_use(model_dir, tmp_path, capsys, trtllm, monkeypatch):
    """TensorRT-LLM's in-process worker decodes on visible device 0 whatever it is told: another
    decode device is refused with the way to get it (CUDA_VISIBLE_DEVICES)."""
    from engines.base import EngineError

    monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", "1.3.0")
    out = tmp_path / "eng"
    code, err = build(["--backend", "trtllm", "--model", str(model_dir), "--out", str(out), "--max-seq-len", "128",
                       "--block-size", "8", "--kv-memory-gb", "0.001"], capsys)
    assert code == 0, err
    with pytest.raises(EngineError, match="CUDA_VISIBLE_DEVICES"):
        load_engine(out, device="cuda:1")

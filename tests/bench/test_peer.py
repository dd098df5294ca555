"""The peer benchmark's quick parts (the whole run takes half an hour: `make bench-peer`, by
hand): its argument checks, the client's command line, the prompts, reading a recorded
`vllm bench serve` result, the ratios and the table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.peer import machine
from bench.peer.__main__ import bench_command, loads, parse_args
from bench.peer.prompts import make_prompts, write_jsonl
from bench.peer.results import Load, Row, figures, markdown, ratios
from orchestrator.config import ServeConfig
from serving.tokenizer import load_tokenizer

RECORDED = Path(__file__).parent / "data" / "vllm_bench_serve_result.json"
"""A real `vllm bench serve` result (vLLM 0.32.0 CPU serving SmolLM2-135M: 4 requests of 64 and 512
prompt tokens, 8 output tokens, concurrency 2)."""


@pytest.fixture
def engine(tmp_path) -> Path:
    """What the argument checks read of an engine directory."""
    (tmp_path / "manifest.json").write_text(json.dumps({"max_seq_len": 2048, "bytes_per_block": 737280}))
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.fixture
def vllm_venv(tmp_path) -> Path:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "vllm").write_text("")
    return tmp_path / "venv"


def args(engine, vllm_venv, *extra):
    return parse_args(["--engine-dir", str(engine), "--vllm-venv", str(vllm_venv), *extra])


def test_defaults_are_the_issues_workload(engine, vllm_venv):
    a = args(engine, vllm_venv)
    assert (a.concurrency, a.requests, a.prompt_lengths, a.output_len) == ([1, 8, 32], 32, [64, 512, 1500], 128)
    assert a.aligned_policy == "adaptive" == ServeConfig().policy and a.servers == ["vllm", "aligned"] and a.floor
    assert [x.label for x in loads(args(engine, vllm_venv, "--concurrency", "4", "--rate", "0.5"))] == [
        "concurrency 4", "Poisson 0.5 req/s"]


@pytest.mark.parametrize("extra, words", [
    (["--concurrency", "0"], "--concurrency: 0; each must be >= 1"),
    (["--concurrency", "--rate"], "no load"),
    (["--rate", "-1"], "--rate: -1.0; each must be > 0"),
    (["--requests", "0"], "--requests: 0"),
    (["--output-len", "1"], "TPOT needs a second token"),
    (["--kv-gib", "0"], "whole GiB"),
    (["--prompt-lengths", "64", "2000"], "2000 + 128 tokens exceed the engine's max_seq_len 2048"),
    (["--aligned-policy", "fastest"], "invalid choice: 'fastest'"),
])
def test_bad_arguments_are_refused_naming_the_option(engine, vllm_venv, capsys, extra, words):
    with pytest.raises(SystemExit):
        args(engine, vllm_venv, *extra)
    assert words in capsys.readouterr().err


def test_a_missing_engine_or_vllm_venv_says_what_to_run(engine, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--engine-dir", str(tmp_path / "none"), "--vllm-venv", str(tmp_path)])
    assert "make build-engine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--engine-dir", str(engine), "--vllm-venv", str(tmp_path / "none")])
    assert "bench/peer/setup_vllm.sh" in capsys.readouterr().err
    parse_args(["--engine-dir", str(engine), "--vllm-venv", str(tmp_path / "none"), "--servers", "aligned"])


def test_the_client_command_asks_for_what_the_comparison_reads(engine, vllm_venv, tmp_path):
    a = args(engine, vllm_venv)
    cmd = bench_command(a, Load(concurrency=8), "http://127.0.0.1:9", "smollm2", tmp_path / "p.jsonl", tmp_path,
                        "r.json")
    line = " ".join(cmd)
    assert cmd[:3] == [str(vllm_venv / "bin" / "vllm"), "bench", "serve"]
    for part in ("--backend openai", "--endpoint /v1/completions", "--dataset-name custom", "--ignore-eos",
                 "--temperature 0", "--custom-output-len 128", "--num-prompts 32", "--max-concurrency 8",
                 "--percentile-metrics ttft,tpot,itl,e2el", "--metric-percentiles 50,99", "--save-result",
                 "--disable-shuffle", "--skip-chat-template"):
        assert part in line
    poisson = " ".join(bench_command(a, Load(rate=0.5), "u", "m", tmp_path, tmp_path, "r"))
    assert "--request-rate 0.5" in poisson and "--max-concurrency" not in poisson


def test_prompts_are_real_text_of_exact_lengths_fixed_by_the_seed(demo_engine_dir, tmp_path):
    tok = load_tokenizer(demo_engine_dir)
    prompts = make_prompts(tok, [16, 100, 300], 10, seed=3)
    assert sorted(p.tokens for p in prompts) == [16] * 4 + [100] * 3 + [300] * 3
    assert all(len(tok.encode(p.text).ids) == p.tokens for p in prompts)
    assert prompts == make_prompts(tok, [16, 100, 300], 10, seed=3)
    assert prompts != make_prompts(tok, [16, 100, 300], 10, seed=4)
    digest = write_jsonl(prompts, tmp_path / "p.jsonl", 128)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p.text for p in prompts] and {r["output_tokens"] for r in rows} == {128}
    assert digest == write_jsonl(prompts, tmp_path / "q.jsonl", 128)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        make_prompts(tok, [1], 3, seed=0)


def test_the_recorded_result_is_read():
    f = figures(json.loads(RECORDED.read_text()), requests=4)
    assert f["completed"] == 4 and f["failed"] == 0 and f["output_tokens"] == 32 and f["input_tokens"] == 1152
    assert f["output_tok_s"] == pytest.approx(17.01, abs=0.01)
    assert f["ttft_p50_ms"] == pytest.approx(553.7, abs=0.1) and f["tpot_p99_ms"] == pytest.approx(111.7, abs=0.1)
    assert "incomplete" not in f
    assert figures(json.loads(RECORDED.read_text()), requests=5)["incomplete"] == "4 of 5 requests completed, 0 failed"


def test_a_result_without_the_percentiles_is_refused_naming_them():
    raw = json.loads(RECORDED.read_text())
    del raw["p99_tpot_ms"], raw["p50_ttft_ms"]
    with pytest.raises(ValueError, match="p50_ttft_ms, p99_tpot_ms .*--metric-percentiles 50,99"):
        figures(raw)
    with pytest.raises(ValueError, match="JSON object"):
        figures([])


def test_ratios_and_the_table():
    vllm = figures(json.loads(RECORDED.read_text()))
    aligned = {**vllm, "output_tok_s": vllm["output_tok_s"] / 4, "ttft_p50_ms": vllm["ttft_p50_ms"] * 3}
    r = ratios(aligned, vllm)
    assert r["output_tok_s"] == pytest.approx(0.25) and r["ttft_p50_ms"] == pytest.approx(3.0)
    assert r["tpot_p99_ms"] == pytest.approx(1.0)
    assert ratios(aligned, {**vllm, "output_tok_s": 0})["output_tok_s"] is None
    table = markdown([Row(Load(concurrency=2), aligned, vllm, floor_tok_s=5.0), Row(Load(rate=0.5), None, vllm)])
    lines = table.splitlines()
    assert lines[0].startswith("| load | server | output tok/s | TTFT p50 ms")
    assert "| concurrency 2 | vLLM | 17.0 | 554 |" in table
    assert "| concurrency 2 | AlignedServe | 4.3 | 1,661 |" in table
    assert "| concurrency 2 | **AlignedServe / vLLM** | 0.25× | 3.00× |" in table
    assert "| concurrency 2 | transformers `generate` (static batches) | 5.0 |" in table
    assert "| Poisson 0.5 req/s | vLLM |" in table and "Poisson 0.5 req/s | AlignedServe" not in table
    assert Row(Load(concurrency=2), aligned, vllm).to_json()["aligned_over_vllm"]["output_tok_s"] == pytest.approx(0.25)


@pytest.mark.parametrize("kw", [{}, {"concurrency": 1, "rate": 1.0}, {"concurrency": 0}, {"rate": float("inf")}])
def test_a_load_is_one_positive_concurrency_or_rate(kw):
    with pytest.raises(ValueError):
        Load(**kw)


def test_cpu_watch_splits_the_machines_cpu():
    watch = machine.CpuWatch([]).start()
    sum(i * i for i in range(200_000))  # this process's own work
    cpu = watch.stop([])
    assert set(cpu) == {"wall_s", "busy_cores", "server_cores", "client_cores", "foreign_cores", "steal_cores"}
    assert all(v >= 0 for v in cpu.values()) and cpu["client_cores"] > 0
    assert len(machine.loadavg()) == 3 and machine.describe()["cpus"] >= 1


def test_ttft_by_prompt_length_from_a_detailed_result():
    from bench.peer.results import ttft_by_prompt_len

    detailed = {"input_lens": [64, 512, 64, 512, 64], "ttfts": [0.1, 0.5, 0.3, 0.7, 0.2]}
    assert ttft_by_prompt_len(detailed) == {64: 200.0, 512: 600.0}
    assert ttft_by_prompt_len(json.loads(RECORDED.read_text())) == {}  # not a detailed result

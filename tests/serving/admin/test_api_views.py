"""The admin API's read-only views on a real orchestrator (torch engine, demo model, host KV pool):
state, request table and history, time series, Prometheus /metrics, config, policies and GPUs."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import ast
from pathlib import Path

from engines.base import HOST
from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, RequestState
from orchestrator.policies import REGISTRY, unavailable
from orchestrator.service import Orchestrator
from orchestrator.stream import TokenStream
from serving.admin import create_app

# Two clusters of prompt lengths, interleaved, so the aligned policy parks and reloads requests.
PROMPTS = [[256] + [40 + (i * 7 + j) % 180 for j in range(n - 1)]
           for i, n in enumerate([6, 70, 9, 66, 5, 72, 8, 68, 7, 64])]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def engine(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=48, host_kv_blocks=200)
    yield eng
    eng.close()


def submit_all(orch: Orchestrator) -> list[TokenStream]:
    streams = [TokenStream() for _ in PROMPTS]
    for p, s in zip(PROMPTS, streams):
        orch.submit(p, max_tokens=MAX_TOKENS, end_id=0, on_event=s)
    return streams


def run_until_idle(orch: Orchestrator, max_steps: int = 20_000) -> None:
    for _ in range(max_steps):
        if not orch.step():
            return
    raise AssertionError("the run loop never went idle")


def test_state_shows_the_pool_as_it_is(engine):
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=3, kmin=2))
    submit_all(orch)
    pool = orch.loop.pool
    # Step until the running batch decodes and the host pool holds requests.
    for _ in range(500):
        orch.step()
        if len(pool.running) >= 2 and len(pool.parked) >= 2 and all(r.output_ids for r in pool.running):
            break
    else:
        raise AssertionError("no running batch beside a filled host pool")
    with TestClient(create_app(orch, token=None)) as client:
        s = client.get("/api/state").json()
    assert s["policy"] == "aligned" and s["draining"] is False
    assert s["time"] == pytest.approx(time.monotonic(), abs=60)
    running = list(pool.running)
    parked = [r for r in pool if r.state is RequestState.PARKED]
    assert s["counts"] == {"waiting": len(pool.waiting), "prefilling": len(pool.prefilling), "running": len(running),
                           "staged": len(pool.staged), "candidates": len(pool.candidates), "parked": len(parked)}
    assert [(m["id"], m["kv_len"], m["tokens"]) for m in s["running"]] == \
        [(r.id, r.kv_len, len(r.output_ids)) for r in running]
    for m in s["running"]:
        assert m["state"] == "running" and m["kv_len"] == m["prompt_len"] + m["tokens"] - 1
        assert m["max_kv_len"] == m["prompt_len"] + MAX_TOKENS - 1 and m["max_tokens"] == MAX_TOKENS
    assert s["running_span"] == [min(r.kv_len for r in running), max(r.kv_len for r in running)]
    assert s["staged_span"] == ([min(r.kv_len for r in pool.staged), max(r.kv_len for r in pool.staged)]
                                if pool.staged else None)
    # Every request holding KV is in the histogram, in the bin of its KV length.
    hist = s["kv_histogram"]
    width, bins = hist["bin_width"], hist["bins"]
    assert width * len(bins) >= orch.config.max_seq_len == 256 and 20 <= len(bins) <= 40
    assert sum(b["running"] for b in bins) == len(running)
    assert sum(b["parked"] for b in bins) == len(parked)
    assert sum(b["staged"] + b["other"] for b in bins) == len(pool.staged) + len(pool.candidates)
    for r in running:
        assert bins[r.kv_len // width]["running"] >= 1
    for r in parked:
        assert bins[r.kv_len // width]["parked"] >= 1
    assert set(s["kv_blocks"]) == {"cpu", HOST}
    for tier, b in s["kv_blocks"].items():
        assert b == {"used": engine.kv_blocks_used(tier), "reserved": orch.ledger.used(tier),
                     "capacity": orch.ledger.capacity(tier)}
    assert s["kv_blocks"]["cpu"]["used"] > 0 and s["kv_blocks"][HOST]["used"] > 0
    assert s["totals"]["submitted"] == len(PROMPTS) and s["totals"]["iterations"] > 0
    run_until_idle(orch)


def test_request_table_and_history(engine):
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=3, kmin=2))
    streams = submit_all(orch)
    run_until_idle(orch)
    with TestClient(create_app(orch, token=None)) as client:
        rows = client.get("/api/requests", params={"limit": 100}).json()["requests"]
        assert [r["id"] for r in rows] == [f"req-{i}" for i in range(len(PROMPTS), 0, -1)]  # newest first
        for row, prompt, stream in zip(reversed(rows), PROMPTS, streams):
            assert row["state"] == "finished" and row["finish_reason"] == "length" and row["error"] is None
            assert row["prompt_len"] == len(prompt) and row["tokens"] == MAX_TOKENS == len(stream.result(1))
            assert row["tier"] is None and row["age_s"] >= 0
        assert len(client.get("/api/requests", params={"limit": 3}).json()["requests"]) == 3
        details = [client.get(f"/api/requests/req-{i}").json() for i in range(1, len(PROMPTS) + 1)]
        missing = client.get("/api/requests/req-999")
    for d in details:
        events = [h["event"] for h in d["history"]]
        times = [h["t"] for h in d["history"]]
        assert times == sorted(times), f"{d['id']}: history out of order"
        assert events[:2] == ["submitted", "waiting"] and events[-1] == "finished"
        assert d["history"][-1]["detail"] == f"length after {MAX_TOKENS} tokens"
        assert "prefilled" in events
    # With batches of three, some requests went to the host pool and came back to decode.
    travelled = [[h["event"] for h in d["history"]] for d in details if "parked" in [h["event"] for h in d["history"]]]
    assert travelled
    for events in travelled:
        i = events.index("offloading")
        assert events[i + 1] == "parked" and "loading" in events[i + 2:] and "running" in events[i + 2:]
    assert missing.status_code == 404 and "req-999" in missing.json()["detail"]


def test_timeseries_after_traffic(engine, wait_for):
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=3, kmin=2))
    with orch, TestClient(create_app(orch, token=None)) as client:
        streams = submit_all(orch)
        for s in streams:
            assert s.result(timeout=60) and s.finish_reason is FinishReason.LENGTH
        # The points cover whole seconds: wait for the second of the last iteration to end.
        last = orch.iterations()[-1].end
        body = wait_for(lambda: (lambda b: b if b["points"] and b["points"][-1]["t"] + 1 > last else None)(
            client.get("/api/timeseries", params={"minutes": 5}).json()), what="points up to the last iteration")
    assert body["interval_s"] == 1.0
    points = body["points"]
    ts = [p["t"] for p in points]
    assert ts == sorted(ts) and all(b - a == 1.0 for a, b in zip(ts, ts[1:]))
    # Decode throughput adds up to the tokens the iterations decoded, second by second.
    decoded = sum(r.batch_size for r in orch.iterations())
    assert sum(p["decode_tok_s"] for p in points) == pytest.approx(decoded) and decoded > 0
    assert sum(p["transfer_bytes_s"] for p in points) == pytest.approx(orch.loop.metrics.transfer_bytes)
    tpots = [p for p in points if p["tpot_p50_s"] is not None]
    assert tpots and all(0 < p["tpot_p50_s"] <= p["tpot_p99_s"] < 5 for p in tpots)
    assert any(p["alignment"] is not None and 0 < p["alignment"] <= 1 for p in points)
    for p in points:
        assert set(p["kv_usage"]) == {"cpu", HOST} and all(0 <= v <= 1 for v in p["kv_usage"].values())
        assert 0 <= p["bubble_share"] <= 1
    assert points[-1]["kv_usage"] == {"cpu": 0.0, HOST: 0.0}  # all finished: every block is free


def test_prometheus_metrics_after_requests(engine):
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=3, kmin=2))
    submit_all(orch)
    run_until_idle(orch)
    with TestClient(create_app(orch, token=None)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    m = orch.loop.metrics
    n = len(PROMPTS)
    assert value("alignedserve_num_requests_running") == 0
    assert value("alignedserve_num_requests_waiting") == 0
    assert value("alignedserve_num_requests_parked") == 0
    assert value("alignedserve_kv_cache_usage_ratio", tier="cpu") == 0
    assert value("alignedserve_kv_cache_usage_ratio", tier=HOST) == 0
    assert 0 < value("alignedserve_alignment_efficiency") <= 1
    assert value("alignedserve_batch_switches_total") == m.switches
    assert value("alignedserve_kv_transfer_bytes_total") == m.transfer_bytes > 0
    assert value("alignedserve_generation_tokens_total") == m.tokens == n * MAX_TOKENS
    assert value("alignedserve_requests_finished_total", reason="length") == n
    assert value("alignedserve_requests_finished_total", reason="cancelled") == 0
    assert value("alignedserve_time_to_first_token_seconds_count") == n
    assert value("alignedserve_time_per_output_token_seconds_count") == n
    assert value("alignedserve_inter_token_latency_seconds_count") == n * (MAX_TOKENS - 1)
    assert value("alignedserve_time_to_first_token_seconds_bucket", le="+Inf") == n
    assert value("alignedserve_time_to_first_token_seconds_bucket", le="2560.0") == n  # vLLM's edges
    assert value("alignedserve_inter_token_latency_seconds_bucket", le="80.0") == n * (MAX_TOKENS - 1)
    assert 0 < value("alignedserve_time_per_output_token_seconds_sum") < n * 5


def test_metrics_registry_is_per_app(engine):
    # Two apps in one process (two orchestrators, or a restart) must not collide on names.
    orch = Orchestrator(engine, ServeConfig())
    first, second = create_app(orch, token=None), create_app(orch, token=None)
    with TestClient(first) as a, TestClient(second) as b:
        assert a.get("/metrics").status_code == b.get("/metrics").status_code == 200


def test_config_is_effective_and_the_token_redacted(engine):
    orch = Orchestrator(engine, ServeConfig(policy="fcfs-offload", admin_token="s3cret"))
    with TestClient(create_app(orch, token="s3cret")) as client:
        config = client.get("/api/config").json()
    assert config["policy"] == "fcfs-offload" and config["max_seq_len"] == 256  # resolved from the manifest
    assert config["admin_token"] == "<redacted>" and "s3cret" not in str(config)
    assert set(config) == set(ServeConfig.__dataclass_fields__)


def test_policies_list_the_registry_and_what_this_engine_can_run(engine, demo_engine_dir):
    orch = Orchestrator(engine, ServeConfig(policy="fcfs-offload"))
    with TestClient(create_app(orch, token=None)) as client:
        body = client.get("/api/policies").json()
    assert body["current"] == "fcfs-offload"
    assert [p["name"] for p in body["policies"]] == list(REGISTRY)  # the default (adaptive) first
    for p in body["policies"]:
        assert p["summary"] == REGISTRY[p["name"]].summary
        assert p["reason"] == unavailable(p["name"], orch.info) and p["available"] is (p["reason"] is None)
    by_name = {p["name"]: p for p in body["policies"]}
    # One device with a host pool: everything but disaggregated prefill.
    assert [n for n, p in by_name.items() if not p["available"]] == ["disagg-fcfs"]
    assert "has only the decode device" in by_name["disagg-fcfs"]["reason"]
    # Without a host pool, fcfs-offload cannot run; aligned can, as its fallback fcfs.
    bare = load_engine(demo_engine_dir, device="cpu", kv_blocks=48, host_kv_blocks=0)
    try:
        with TestClient(create_app(Orchestrator(bare, ServeConfig(policy="aligned")), token=None)) as client:
            body = client.get("/api/policies").json()
    finally:
        bare.close()
    by_name = {p["name"]: p for p in body["policies"]}
    assert body["current"] == "fcfs" and by_name["aligned"]["available"]
    assert not by_name["fcfs-offload"]["available"] and "needs a host KV pool" in by_name["fcfs-offload"]["reason"]


def test_the_admin_reads_only_the_orchestrators_public_api():
    """DESIGN.md §5: the admin reads one snapshot, never the orchestrator's parts."""
    admin = Path(__file__).resolve().parents[3] / "serving" / "admin"
    reached = []
    for path in sorted(admin.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("loop", "engine", "ledger", "lifecycle"):
                reached.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert reached == []


def test_gpus_answer_without_a_driver(engine):
    orch = Orchestrator(engine, ServeConfig())
    with TestClient(create_app(orch, token=None)) as client:
        response = client.get("/api/gpus")
    assert response.status_code == 200
    body = response.json()
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        has_driver = True
    except Exception:
        has_driver = False
    if has_driver:  # a GPU host: the real figures
        assert body["available"] is True and body["reason"] is None and body["gpus"]
        assert all(g["memory_total_bytes"] > 0 for g in body["gpus"])
    else:
        assert body == {"available": False, "reason": body["reason"], "gpus": []}
        assert body["reason"].startswith("no NVIDIA driver: NVML could not be loaded (")

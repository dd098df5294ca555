"""The admin API's operator actions on a real orchestrator (torch engine, demo model): the bearer
token, drain and resume, cancel, runtime policy switches, and bad request bodies."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from engines.loader import load_engine
from orchestrator.config import ServeConfig
from orchestrator.core import FinishReason, RequestRejected
from orchestrator.policies import POLICIES
from orchestrator.service import Orchestrator
from orchestrator.stream import TokenStream
from serving.admin import create_app
from serving.admin.guards import NO_TOKEN

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = [[256] + [40 + (i * 7 + j) % 180 for j in range(n - 1)]
           for i, n in enumerate([6, 70, 9, 66, 5, 72, 8, 68, 7, 64])]


@pytest.fixture(scope="module")
def engine(demo_engine_dir):
    eng = load_engine(demo_engine_dir, device="cpu", kv_blocks=48, host_kv_blocks=200)
    yield eng
    eng.close()


def run_until_idle(orch: Orchestrator, max_steps: int = 20_000) -> None:
    for _ in range(max_steps):
        if not orch.step():
            return
    raise AssertionError("the run loop never went idle")


def submit(orch: Orchestrator, prompt, max_tokens: int = 10) -> TokenStream:
    stream = TokenStream()
    orch.submit(prompt, max_tokens=max_tokens, end_id=0, on_event=stream)
    return stream


@pytest.fixture
def orch(engine):
    o = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=3, kmin=2))
    yield o
    run_until_idle(o)  # a step-driven orchestrator: finish everything so the engine is clean
    assert engine.kv_blocks_used("cpu") == 0 and o.ledger.holders == 0


@pytest.mark.parametrize("headers, words", [
    ({}, "missing admin token: send the header 'Authorization: Bearer <token>'"),
    ({"Authorization": "Bearer not-it"}, "wrong admin token"),
    ({"Authorization": f"Basic {TOKEN}"}, "malformed Authorization header"),
    ({"Authorization": "Bearer"}, "malformed Authorization header"),
])
def test_actions_refuse_a_missing_or_wrong_token(orch, headers, words):
    with TestClient(create_app(orch, token=TOKEN)) as client:
        for path in ("/api/drain", "/api/resume", "/api/requests/req-1/cancel"):
            r = client.post(path, headers=headers)
            assert r.status_code == 401 and words in r.json()["detail"], path
            assert r.headers["www-authenticate"] == "Bearer"
        r = client.post("/api/policy", json={"policy": "fcfs-offload"}, headers=headers)
        assert r.status_code == 401 and words in r.json()["detail"]
        assert client.get("/api/state").status_code == 200  # read-only needs no token
    assert not orch.draining and orch.policy.name == "aligned"


@pytest.mark.parametrize("token", [None, ""])
def test_actions_are_forbidden_without_a_configured_token(orch, token):
    with TestClient(create_app(orch, token=token)) as client:
        r = client.post("/api/drain", headers=AUTH)
        assert r.status_code == 403 and r.json() == {"detail": NO_TOKEN}
        assert client.post("/api/policy", json={"policy": "fcfs"}, headers=AUTH).status_code == 403
    assert not orch.draining


def test_drain_refuses_new_requests_and_finishes_those_in_flight(orch):
    before = [submit(orch, p) for p in PROMPTS[:4]]
    orch.step()
    with TestClient(create_app(orch, token=TOKEN)) as client:
        r = client.post("/api/drain", headers=AUTH)
        assert r.status_code == 200 and r.json()["ok"] and r.json()["draining"] is True
        assert orch.draining and client.get("/api/state").json()["draining"] is True
        with pytest.raises(RequestRejected) as refused:
            orch.submit(PROMPTS[5], max_tokens=4)
        assert refused.value.field == "server" and refused.value.message.startswith("draining")
        run_until_idle(orch)
        assert [len(s.result(1)) for s in before] == [10] * 4
        assert [s.finish_reason for s in before] == [FinishReason.LENGTH] * 4
        r = client.post("/api/resume", headers=AUTH)
        assert r.status_code == 200 and r.json()["draining"] is False
        assert client.get("/api/state").json()["draining"] is False
    after = submit(orch, PROMPTS[6], max_tokens=3)
    run_until_idle(orch)
    assert after.result(1) and after.finish_reason is FinishReason.LENGTH


def test_cancel_ends_the_request_as_cancelled(orch):
    streams = [submit(orch, p, max_tokens=30) for p in PROMPTS[:3]]
    for _ in range(3):
        orch.step()
    with TestClient(create_app(orch, token=TOKEN)) as client:
        r = client.post("/api/requests/req-2/cancel", headers=AUTH)
        assert r.status_code == 200 and r.json()["id"] == "req-2" and r.json()["ok"]
        run_until_idle(orch)
        assert [len(s.result(1)) for s in streams] == [30, len(streams[1].token_ids), 30]
        assert len(streams[1].token_ids) < 30 and streams[1].finish_reason is FinishReason.CANCELLED
        assert [streams[0].finish_reason, streams[2].finish_reason] == [FinishReason.LENGTH] * 2
        d = client.get("/api/requests/req-2").json()
        assert d["finish_reason"] == "cancelled" and d["state"] == "finished"
        assert d["history"][-1]["event"] == "finished" and d["history"][-1]["detail"].startswith("cancelled")
        again = client.post("/api/requests/req-2/cancel", headers=AUTH)
        assert again.status_code == 409 and "already finished (cancelled)" in again.json()["detail"]
        unknown = client.post("/api/requests/req-77/cancel", headers=AUTH)
        assert unknown.status_code == 404 and "req-77" in unknown.json()["detail"]


def test_policy_switch_at_runtime_on_the_run_loop_thread(engine):
    orch = Orchestrator(engine, ServeConfig(policy="aligned", max_batch_size=3, kmin=2))
    with orch, TestClient(create_app(orch, token=TOKEN)) as client:
        first = [submit(orch, p, max_tokens=16) for p in PROMPTS]
        r = client.post("/api/policy", json={"policy": "fcfs-offload"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json() == {"ok": True, "policy": "fcfs-offload", "previous": "aligned",
                            "detail": "scheduling with fcfs-offload from the next iteration"}
        assert client.get("/api/state").json()["policy"] == "fcfs-offload"
        assert client.get("/api/config").json()["policy"] == "fcfs-offload"
        second = [submit(orch, p, max_tokens=8) for p in PROMPTS[:4]]
        for s in first + second:
            assert s.result(timeout=60) and s.finish_reason is FinishReason.LENGTH
        same = client.post("/api/policy", json={"policy": "fcfs-offload"}, headers=AUTH)
        assert same.status_code == 200 and same.json()["detail"] == "already scheduling with fcfs-offload"
        back = client.post("/api/policy", json={"policy": "aligned"}, headers=AUTH)
        assert back.status_code == 200 and orch.policy.name == "aligned"
    assert engine.kv_blocks_used("cpu") == 0 and orch.ledger.holders == 0


def test_policy_switch_refused_when_it_would_strand_requests(orch, engine):
    for p in PROMPTS:
        submit(orch, p, max_tokens=12)
    for _ in range(500):
        orch.step()
        if orch.snapshot().parked:
            break
    else:
        raise AssertionError("nothing went to the host pool")
    with TestClient(create_app(orch, token=TOKEN)) as client:
        for name in ("fcfs", "chunked-prefill"):
            r = client.post("/api/policy", json={"policy": name}, headers=AUTH)
            assert r.status_code == 409, r.text
            detail = r.json()["detail"]
            assert f"switching from aligned to {name} would strand" in detail and "in the host pool" in detail
        assert orch.policy.name == "aligned"
        # One device, no helper: disaggregated prefill cannot run here at all.
        r = client.post("/api/policy", json={"policy": "disagg-fcfs"}, headers=AUTH)
        assert r.status_code == 409 and "has only the decode device" in r.json()["detail"]
        run_until_idle(orch)
        # Once the host pool is empty the same switch goes through, and fcfs serves requests.
        r = client.post("/api/policy", json={"policy": "fcfs"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["policy"] == "fcfs"
        s = submit(orch, PROMPTS[1], max_tokens=5)
        run_until_idle(orch)
        assert len(s.result(1)) == 5
        assert client.get("/api/state").json()["policy"] == "fcfs"


def test_unknown_policy_is_422_naming_the_allowed_ones(orch):
    with TestClient(create_app(orch, token=TOKEN)) as client:
        r = client.post("/api/policy", json={"policy": "fastest"}, headers=AUTH)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("body.policy: ") and all(f"'{p}'" in detail for p in POLICIES)
    assert orch.policy.name == "aligned"


@pytest.mark.parametrize("body, headers, status, words", [
    (b"{", {"content-type": "application/json"}, 422, "body: not valid JSON"),
    (b"policy=fcfs", {"content-type": "application/json"}, 422, "body: not valid JSON"),
    (b'{"policy": 5}', {"content-type": "application/json"}, 422, "body.policy: Input should be"),
    (b'{}', {"content-type": "application/json"}, 422, "body.policy: Field required"),
    (b'{"policy": "fcfs", "force": true}', {"content-type": "application/json"}, 422,
     "body.force: Extra inputs are not permitted"),
    (b'{"policy": "' + b"x" * 20_000 + b'"}', {"content-type": "application/json"}, 413,
     "request body too large"),
])
def test_bad_bodies_get_a_4xx_with_a_reason(orch, body, headers, status, words):
    with TestClient(create_app(orch, token=TOKEN)) as client:
        r = client.post("/api/policy", content=body, headers={**AUTH, **headers})
        assert r.status_code == status and words in r.json()["detail"], r.text
        assert client.get("/api/state").status_code == 200  # and the server goes on serving
    assert orch.policy.name == "aligned"


def test_a_streamed_body_over_the_limit_is_cut_off(orch):
    chunks = [b'{"policy": "' + b"y" * 6000] + [b"y" * 6000] * 3 + [b'"}']
    with TestClient(create_app(orch, token=TOKEN)) as client:
        r = client.post("/api/policy", content=iter(chunks), headers={**AUTH, "content-type": "application/json"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 413 and "at most 16384 bytes" in r.json()["detail"]
        assert client.post("/api/policy", json={"policy": "aligned"}, headers=AUTH).status_code == 200


def test_bad_query_parameters_name_the_field(orch):
    with TestClient(create_app(orch, token=None)) as client:
        r = client.get("/api/requests", params={"limit": 0})
        assert r.status_code == 422 and r.json()["detail"].startswith("query.limit: ")
        r = client.get("/api/timeseries", params={"minutes": "soon"})
        assert r.status_code == 422 and r.json()["detail"].startswith("query.minutes: ")
        assert client.get("/api/requests", params={"limit": 5}).status_code == 200


def test_switch_away_from_chunked_prefill_waits_for_the_chunks(engine):
    orch = Orchestrator(engine, ServeConfig(policy="chunked-prefill", chunk_tokens=16))
    stream = submit(orch, PROMPTS[1], max_tokens=4)  # 70 prompt tokens: five steps of chunks
    orch.step()
    assert orch.snapshot().prefilling
    with TestClient(create_app(orch, token=TOKEN)) as client:
        r = client.post("/api/policy", json={"policy": "aligned"}, headers=AUTH)
        assert r.status_code == 409 and "would strand 1 request prefilling in chunks" in r.json()["detail"]
        r = client.post("/api/policy", json={"policy": "chunked-prefill"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["detail"] == "already scheduling with chunked-prefill"
        run_until_idle(orch)
        assert len(stream.result(1)) == 4
        assert client.post("/api/policy", json={"policy": "aligned"}, headers=AUTH).json()["policy"] == "aligned"


def test_fault_injection_is_refused_unless_the_server_was_started_with_it(orch):
    with TestClient(create_app(orch, token=TOKEN)) as client:
        assert client.get("/api/faults").json() == {"enabled": False, "kinds": [], "armed": {}, "fired": {}}
        r = client.post("/api/faults", json={"kind": "decode_error"}, headers=AUTH)
        assert r.status_code == 403 and "ALIGNED_FAULT_INJECTION=1" in r.json()["detail"]


def test_an_armed_fault_fails_the_next_decode_step_and_is_counted(engine):
    from engines.faults import FaultInjectingEngine
    faulty = FaultInjectingEngine(engine)
    o = Orchestrator(faulty, ServeConfig(policy="fcfs", max_batch_size=4))
    with TestClient(create_app(o, token=TOKEN)) as client:
        assert client.post("/api/faults", json={"kind": "decode_error"}).status_code == 401  # token first
        for body, words in [({"kind": "nope"}, "unknown fault 'nope'"), ({"kind": "decode_error", "count": 0}, "count"),
                            ({"kind": "decode_error", "extra": 1}, "extra")]:
            r = client.post("/api/faults", json=body, headers=AUTH)
            assert r.status_code == 422 and words in r.text, r.text
        streams = [submit(o, p) for p in PROMPTS[:3]]
        o.step()  # prefilled: the three decode together from the next step
        r = client.post("/api/faults", json={"kind": "decode_error"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["armed"] == {"decode_error": 1}
        run_until_idle(o)
        for s in streams:
            s.result(timeout=1)
            assert s.finish_reason is FinishReason.ERROR and "injected decode step failure" in s.error
        assert client.get("/api/faults").json()["fired"] == {"decode_error": 1}
        after = submit(o, PROMPTS[0])
        run_until_idle(o)
        after.result(timeout=1)
        assert after.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert engine.kv_blocks_used("cpu") == 0 and o.ledger.holders == 0

"""Dynamo's real frontend and two AlignedServe workers on loopback (issue 19's Done-when).

One worker behind Dynamo's KV router gives the reference answers, each request sent alone; then
two workers behind the length-aware router answer the same requests at once, streaming and not,
over the official `openai` client: the greedy texts must be the same (float32 SmolLM2: batching
does not change its greedy tokens), both workers must have served, a dropped stream must be
cancelled on its worker with its KV freed, and no process may outlive the cluster.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from serving.cluster.launch import Cluster
from serving.lifecycle import alive, process_tree
from serving.triton_server import free_port

PROMPTS = [
    ("chat", "What is the capital of France?", 24),
    ("chat", "Write a haiku about the sea.", 40),
    ("completion", "The three primary colors are", 20),
    ("completion", "def fibonacci(n):\n    " * 12, 48),  # a longer prompt
    ("chat", "List five fruits.", 32),
    ("completion", "Once upon a time, in a small village,", 56),
]


def _client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url, api_key="unused", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, model: str, kind: str, prompt: str, max_tokens: int, stream: bool) -> str:
    if kind == "chat":
        args = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0)
        if not stream:
            return client.chat.completions.create(**args).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    args = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    if not stream:
        return client.completions.create(**args).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)


def _state(url: str) -> dict:
    with urllib.request.urlopen(url + "api/state", timeout=5) as r:
        return json.load(r)


def _listening(pids: list[int]) -> list[str]:
    """host:port of every TCP socket listening in `pids` (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[9]) in inodes:  # LISTEN
                host, port = f[1].split(":")
                found.append(f"{host}:{int(port, 16)}")
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc writes them


@pytest.fixture(scope="module")
def reference(smollm2_engine_dir, tmp_path_factory):
    """Each prompt's greedy answer from one worker, sent one at a time (Dynamo's KV router)."""
    logs = tmp_path_factory.mktemp("cluster-1")
    with Cluster(smollm2_engine_dir, workers=1, router="kv", http_port=free_port(), admin_port=free_port(),
                 log_dir=logs) as one:
        client = _client(one)
        answers = {(k, p): _ask(client, one.model_name, k, p, n, stream=False) for k, p, n in PROMPTS}
    return answers


@pytest.fixture(scope="module")
def cluster(smollm2_engine_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster-2")
    c = Cluster(smollm2_engine_dir, workers=2, router="length", http_port=free_port(),
                admin_port=free_port(2), log_dir=logs).start()
    yield c
    c.stop()


def test_two_workers_answer_as_one_and_both_serve(cluster, reference):
    client = _client(cluster)
    jobs = [(k, p, n, stream) for k, p, n in PROMPTS for stream in (False, True)]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: _ask(client, cluster.model_name, j[0], j[1], j[2], j[3]), jobs))
    for (kind, prompt, _, stream), text in zip(jobs, answers):
        assert text == reference[(kind, prompt)], f"{kind} {'stream' if stream else 'whole'}: {prompt[:30]!r}"
    served = [_state(url)["totals"]["submitted"] for url in cluster.dashboards()]
    assert all(n > 0 for n in served), f"requests per worker: {served}"
    assert sum(served) >= len(jobs)


def test_a_dropped_stream_is_cancelled_on_its_worker(cluster):
    client = _client(cluster)
    before = [_state(u)["totals"]["finished"].get("cancelled", 0) for u in cluster.dashboards()]
    stream = client.completions.create(model=cluster.model_name, prompt="Count from one to a thousand:",
                                       max_tokens=400, temperature=0, stream=True)
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while True:
        states = [_state(u) for u in cluster.dashboards()]
        cancelled = sum(s["totals"]["finished"].get("cancelled", 0) for s in states) - sum(before)
        live = sum(sum(s["counts"].values()) for s in states)
        used = sum(t["used"] + t["reserved"] for s in states for t in s["kv_blocks"].values())
        if cancelled == 1 and used == 0 and live == 0:
            break
        assert time.monotonic() < deadline, f"cancelled {cancelled}, KV blocks still used {used}, live {live}"
        time.sleep(0.2)


def _dynamo_overlap(cluster: Cluster, token_ids: list[int]) -> dict[str, int]:
    """Worker -> device blocks of `token_ids`, as a fresh Dynamo KvRouter sees the workers' caches."""
    probe = subprocess.run([sys.executable, "-m", "serving.cluster.kv_probe", json.dumps(token_ids)],
                           env=cluster.environment(), capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    return json.loads(probe.stdout.strip().splitlines()[-1])


def test_dynamos_kv_index_sees_the_blocks_a_request_holds(cluster):
    """KV events: while a request decodes, Dynamo's own index finds its full prompt blocks on
    exactly one worker; once it ends, on none."""
    client = _client(cluster)
    ids = list(range(1000, 1200))  # 200 tokens: 12 full blocks of 16
    stream = client.completions.create(model=cluster.model_name, prompt=ids, max_tokens=300, temperature=0,
                                       stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    during = _dynamo_overlap(cluster, ids)
    assert sorted(during.values()) == [0, 12], during
    assert sorted(_dynamo_overlap(cluster, ids[:64]).values()) == [0, 4]
    stream.close()
    deadline = time.monotonic() + 30
    while any(_dynamo_overlap(cluster, ids).values()):
        assert time.monotonic() < deadline, "the blocks were not removed from Dynamo's index"
        time.sleep(0.5)


def test_bad_request_names_the_field(cluster):
    client = _client(cluster)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=cluster.model_name, prompt="Hello", max_tokens=100_000)
    # and the cluster keeps serving
    assert _ask(client, cluster.model_name, "completion", "Hello", 4, stream=False)


def test_every_socket_is_on_loopback(cluster):
    pids = [p for pid in cluster.pids() for p in process_tree(pid)]
    sockets = _listening(pids)
    assert sockets, "no listening socket found"
    outside = [s for s in sockets if s.split(":")[0] not in LOOPBACK]
    assert not outside, f"listening beyond loopback: {outside}"


def test_no_process_outlives_the_cluster(smollm2_engine_dir, tmp_path):
    c = Cluster(smollm2_engine_dir, workers=2, router="round-robin", http_port=free_port(), admin_port=0,
                log_dir=tmp_path).start()
    pids = [p for pid in c.pids() for p in process_tree(pid)]
    assert len(pids) >= 4  # broker, two workers, frontend
    c.stop()
    left = [p for p in pids if alive(p)]
    assert not left, f"still running after stop: {left}"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_stopped_or_killed_launcher_takes_every_process_with_it(smollm2_engine_dir, tmp_path, how):
    """`make serve-cluster`'s launcher: SIGTERM (what `make stop-cluster` sends) stops every process
    and removes its pid file; SIGKILL leaves it to the parent-death signal, which ends them too."""
    port = free_port()
    launcher = subprocess.Popen([sys.executable, "-m", "serving.cluster.launch", "--engine-dir", str(smollm2_engine_dir),
                                 "--workers", "1", "--router", "round-robin", "--http-port", str(port),
                                 "--admin-port", "0", "--log-dir", str(tmp_path),
                                 "--pid-file", str(tmp_path / "cluster.pid")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in launcher.stdout:
            if "cluster is ready" in line:
                break
        else:
            pytest.fail(f"the launcher exited ({launcher.wait()}) before it was ready")
        tree = process_tree(launcher.pid)
        assert len(tree) >= 4  # launcher, broker, worker, frontend
        assert (tmp_path / "cluster.pid").read_text() == str(launcher.pid)
        if how == "SIGTERM":
            launcher.terminate()
            assert launcher.wait(60) == 0
            assert not (tmp_path / "cluster.pid").exists()
        else:
            launcher.kill()
            launcher.wait()
        deadline = time.monotonic() + 15
        while [p for p in tree if alive(p)]:
            assert time.monotonic() < deadline, f"still running: {[p for p in tree if alive(p)]}"
            time.sleep(0.2)
    finally:
        launcher.kill()

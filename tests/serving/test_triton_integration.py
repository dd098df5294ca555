"""A real tritonserver (from nvidia-pytriton) serving model_repo/ with the demo engine, driven
by real clients: gRPC streaming, HTTP generate_stream, concurrency, cancellation, bad input and
broken engine directories. The server is started on free loopback ports and stopped by PID."""
from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from serving.triton_server import MODEL_NAME, TritonServer, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(demo_engine_dir, tmp_path_factory):
    port = free_port(3)
    log = tmp_path_factory.mktemp("triton") / "server.log"
    srv = TritonServer(
        demo_engine_dir, port, port + 1, port + 2, log_path=log,
        # KV for 40 blocks of 16 tokens: two long requests fill it, so leaked blocks would show.
        env={"ALIGNED_KV_BLOCKS": "40"},
        extra_args=["--model-control-mode=explicit", f"--load-model={MODEL_NAME}"],
    )
    srv.start(timeout=180)
    yield srv
    rc = srv.stop()
    assert srv.proc.poll() is not None, "tritonserver still running after stop()"
    assert rc is not None


def _inputs(text: str | bytes, max_tokens, stream=True, max_tokens_dtype=np.int32, **extra):
    """end_id defaults to byte 0, which the demo model does not produce for these prompts, so
    requests run to max_tokens whatever its random weights say about EOS."""
    data = text.encode() if isinstance(text, str) else text
    arrays = {"text_input": np.array([[data]], dtype=object),
              "max_tokens": np.array([[max_tokens]], dtype=max_tokens_dtype),
              "stream": np.array([[stream]], dtype=bool)}
    extra.setdefault("end_id", (0, np.int32))
    for name, (value, dtype) in extra.items():
        arrays[name] = np.array([[value]], dtype=dtype)
    out = []
    for name, arr in arrays.items():
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


class GrpcStream:
    """One gRPC client with its bidirectional stream and the responses it received."""

    def __init__(self, server):
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, text, max_tokens, request_id="1", **kw):
        self.client.async_stream_infer(MODEL_NAME, _inputs(text, max_tokens, **kw), request_id=request_id,
                                       enable_empty_final_response=False)

    def collect(self, timeout=60.0):
        """(text, ids, finish_reason, n_responses) of one request, or raises its error."""
        text, ids, n = [], [], 0
        while True:
            result, error = self.responses.get(timeout=timeout)
            if error is not None:
                raise error
            n += 1
            text.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            ids.extend(result.as_numpy("output_ids").reshape(-1).tolist())
            reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
            if reason:
                return "".join(text), ids, reason, n

    def close(self, cancel=False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def generate(server, text, max_tokens, **kw):
    s = GrpcStream(server)
    try:
        s.send(text, max_tokens, **kw)
        return s.collect()
    finally:
        s.close()


def test_grpc_streaming_sends_token_by_token(server):
    text, ids, reason, n = generate(server, "The quick brown fox", 16, stream=True)
    assert reason == "length" and len(ids) == 16
    assert n == 16  # one response per generated token
    # Non-streaming gives one response with the same greedy text.
    text2, ids2, reason2, n2 = generate(server, "The quick brown fox", 16, stream=False)
    assert n2 == 1 and ids2 == ids and text2 == text and reason2 == "length"


def test_http_generate_stream(server):
    body = {"text_input": "The quick brown fox", "max_tokens": 16, "stream": True, "end_id": 0}
    with requests.post(f"{server.http_url}/v2/models/{MODEL_NAME}/generate_stream", json=body,
                       stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        events = [json.loads(line[len(b"data: "):]) for line in r.iter_lines() if line.startswith(b"data: ")]
    assert len(events) == 16
    assert [e["finish_reason"] for e in events[:-1]] == [""] * 15 and events[-1]["finish_reason"] == "length"
    text = "".join(e["text_output"] for e in events)
    expected, *_ = generate(server, "The quick brown fox", 16, stream=False)
    assert text == expected


def test_eight_concurrent_clients(server):
    prompts = [f"Request number {i}: tell me about {w}" for i, w in
               enumerate(["cats", "dogs", "rust", "tea", "jazz", "rain", "maps", "ice"])]
    solo = {p: generate(server, p, 24, stream=False)[1] for p in prompts[:3]}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: generate(server, p, 24, stream=True), prompts))
    for p, (text, ids, reason, n) in zip(prompts, results):
        assert reason == "length" and len(ids) == 24 and n == 24
        if p in solo:  # batching with 7 others does not change greedy output
            assert ids == solo[p]


def test_client_cancellation_frees_the_request(server):
    s = GrpcStream(server)
    s.send("cancel me", 240, stream=True)
    for _ in range(3):
        result, error = s.responses.get(timeout=60)
        assert error is None
    s.close(cancel=True)
    # The server logs the cancellation; its KV must be free again: two requests that each need
    # 16 of the 40 blocks complete (with a leaked request holding 16, one of them could not start).
    deadline = time.monotonic() + 30
    while "cancelled" not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "cancelled" in server.log_path.read_text()
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda p: generate(server, p, 240, stream=False), ["first long", "second long"]))
    assert [len(o[1]) for o in outs] == [240, 240]


@pytest.mark.parametrize("kwargs, words", [
    (dict(text="", max_tokens=8), "text_input: the prompt is empty"),
    (dict(text="hi", max_tokens=0), "max_tokens: 0 is outside [1, 256]"),
    (dict(text="hi", max_tokens=-4), "max_tokens: -4 is outside [1, 256]"),
    (dict(text="hi", max_tokens=100_000), "max_tokens: 100000 is outside [1, 256]"),
    (dict(text="x" * 250, max_tokens=100), "exceeds max_seq_len (256)"),
    (dict(text="x" * 400, max_tokens=4), "text_input: 401 tokens"),
    (dict(text=b"\xff\xfe", max_tokens=4), "text_input: not valid UTF-8"),
    (dict(text="hi", max_tokens=4, max_tokens_dtype=np.float32), "max_tokens"),
    (dict(text="hi", max_tokens=4, top_p=(1.5, np.float32)), "top_p: 1.5 is outside (0, 1]"),
])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, kwargs, words):
    extra = {k: v for k, v in kwargs.items() if k not in ("text", "max_tokens", "max_tokens_dtype")}
    s = GrpcStream(server)
    try:
        s.send(kwargs["text"], kwargs["max_tokens"], max_tokens_dtype=kwargs.get("max_tokens_dtype", np.int32),
               **extra)
        with pytest.raises(InferenceServerException) as e:
            s.collect(timeout=30)
        assert words in str(e.value)
    finally:
        s.close()
    assert generate(server, "still alive?", 4)[2] == "length"


def _load_with_engine_dir(server, engine_dir):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    config = client.get_model_config(MODEL_NAME, as_json=True)["config"]
    config["parameters"] = {"engine_dir": {"string_value": str(engine_dir)}}
    try:
        client.load_model(MODEL_NAME, config=json.dumps(config))
    finally:
        client.close()


def test_missing_engine_dir_fails_the_load_clearly_and_serving_continues(server, tmp_path):
    with pytest.raises(InferenceServerException) as e:
        _load_with_engine_dir(server, tmp_path / "no-such-engine")
    assert "no-such-engine does not exist" in str(e.value)
    assert generate(server, "still alive?", 4)[2] == "length"


def test_corrupt_engine_dir_fails_the_load_clearly_and_serving_continues(server, demo_engine_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo_engine_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(InferenceServerException) as e:
        _load_with_engine_dir(server, broken)
    assert weights.name in str(e.value) and "truncated" in str(e.value)
    assert generate(server, "still alive?", 4)[2] == "length"


def test_stop_words_end_the_output_where_they_occur(server):
    # The demo model emits arbitrary bytes; take a printable ASCII token it does produce (one
    # byte = one token in the byte tokenizer) as the stop word.
    for prompt in ("Stop words:", "Hello", "The quick brown fox", "Sampling"):
        _, ids, _, _ = generate(server, prompt, 24, stream=False)
        printable = [i for i, t in enumerate(ids) if 33 <= t <= 126]
        if printable:
            break
    else:
        pytest.fail("the demo model produced no printable ASCII token for any prompt")
    first = printable[0]
    stop = chr(ids[first])
    s = GrpcStream(server)
    try:
        data = np.array([[stop.encode()]], dtype=object)
        s.client.async_stream_infer(MODEL_NAME, _inputs(prompt, 24, stream=False) + [_bytes_input("stop_words", data)])
        text, got, reason, _ = s.collect()
    finally:
        s.close()
    first = ids.index(ids[first])  # its first occurrence ends the output
    assert reason == "stop" and got == ids[:first + 1] and text.endswith(stop)


def test_a_stop_word_of_several_tokens_is_matched_on_the_streamed_text(server):
    # Three printable ASCII bytes in a row of the greedy output: three tokens of the byte tokenizer.
    prompt = "Sampling"
    full, ids, _, _ = generate(server, prompt, 40, stream=False)
    k = next((i for i in range(1, len(ids) - 2) if all(33 <= t <= 126 for t in ids[i:i + 3])), None)
    if k is None:
        pytest.fail(f"no run of three printable ASCII tokens in {ids}")
    stop = bytes(ids[k:k + 3]).decode()
    end = full.index(stop) + 3
    s = GrpcStream(server)
    try:
        data = np.array([[b"never", stop.encode()]], dtype=object)
        s.client.async_stream_infer(MODEL_NAME, _inputs(prompt, 40, stream=True) + [_bytes_input("stop_words", data)])
        text, got, reason, n = s.collect()
    finally:
        s.close()
    # The stop word stays in the text (TensorRT-LLM's format); one response per token up to it.
    assert reason == "stop" and text == full[:end] and text.endswith(stop)
    assert got == ids[:len(got)] and n == len(got) < 40


def test_seeded_sampling_is_reproducible(server):
    def sample(seed):
        return generate(server, "Sampling", 16, stream=True, temperature=(1.0, np.float32),
                        top_p=(0.95, np.float32), seed=(seed, np.uint64))[1]

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b and len(a) == 16
    assert a != c  # 16 tokens at temperature 1 from a 259-token vocabulary: a clash is ~impossible


def _bytes_input(name, arr):
    t = grpcclient.InferInput(name, list(arr.shape), "BYTES")
    t.set_data_from_numpy(arr)
    return t

"""NVIDIA's TensorRT-LLM clients against a real tritonserver serving model_repo/ (demo engine):
requests shaped exactly as upstream's `end_to_end_grpc_client.py` (models `ensemble` and
`tensorrt_llm_bls`, gRPC stream, streaming and not), `inflight_batcher_llm_client.py` (model
`tensorrt_llm`, token ids, unary call) and the README's HTTP generate call, all answered by the
one orchestrator behind `aligned_llm`; perf_analyzer on every model name. Greedy outputs equal
aligned_llm's own. Stop requests and cancelled streams are tested on the real model, whose
requests last long enough to be stopped (tests/serving/test_smollm2.py)."""
from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from serving.triton_server import TritonServer, free_port
from tests.serving.trtllm_clients import e2e_call, e2e_inputs, ifb_inputs, tensor

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MODELS = ("aligned_llm", "ensemble", "tensorrt_llm_bls", "tensorrt_llm")
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(demo_engine_dir, tmp_path_factory):
    port = free_port(3)
    log = tmp_path_factory.mktemp("triton-trtllm") / "server.log"
    srv = TritonServer(demo_engine_dir, port, port + 1, port + 2, log_path=log,
                       env={"ALIGNED_KV_BLOCKS": "40", "ALIGNED_OPENAI_PORT": "0", "ALIGNED_ADMIN_PORT": "0"},
                       extra_args=["--model-control-mode=explicit", *[f"--load-model={m}" for m in MODELS]])
    srv.start(timeout=240)
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None, "tritonserver still running after stop()"


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield c
    c.close()


def aligned_greedy(server, prompt: str | list[int], max_tokens: int) -> tuple[str, list[int]]:
    """The same request straight to aligned_llm (text, or token ids): its text and token ids."""
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    done: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: done.put((result, error)))
    first = (tensor("text_input", np.array([[prompt.encode()]], dtype=object)) if isinstance(prompt, str)
             else tensor("input_ids", np.array([prompt], dtype=np.int32)))
    try:
        c.async_stream_infer("aligned_llm", [first, tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32)),
                                             tensor("end_id", np.array([[0]], dtype=np.int32))],
                             enable_empty_final_response=False)
        result, error = done.get(timeout=60)
        assert error is None, error
        return result.as_numpy("text_output")[0][0].decode(), result.as_numpy("output_ids")[0].tolist()
    finally:
        c.stop_stream()
        c.close()


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_the_end_to_end_client_non_streaming_gets_the_prompt_and_the_greedy_text(server, model):
    expected, _ = aligned_greedy(server, PROMPT, 12)
    texts, error = e2e_call(server, model, e2e_inputs(PROMPT, 12, stream=False))
    assert error is None, error
    assert texts == [PROMPT + expected]  # echoed, as the client's --check-outputs expects


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_the_end_to_end_client_streaming_gets_the_text_piece_by_piece(server, model):
    expected, ids = aligned_greedy(server, PROMPT, 12)
    texts, error = e2e_call(server, model, e2e_inputs(PROMPT, 12, stream=True))
    assert error is None, error
    assert "".join(texts) == expected and len(texts) == len(ids) == 12  # no echo when streaming


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_beam_width_2_gets_an_error_naming_it_and_the_server_keeps_serving(server, model):
    inputs = e2e_inputs(PROMPT, 8, stream=False, beam_width=np.array([[2]], dtype=np.int32))
    texts, error = e2e_call(server, model, inputs)
    assert texts == [] and error is not None
    assert "beam_width" in str(error) and "beam search is not supported" in str(error)
    texts, error = e2e_call(server, model, e2e_inputs(PROMPT, 4, stream=False))
    assert error is None and len(texts) == 1


def test_the_in_flight_batcher_client_gets_prompt_and_greedy_ids_from_a_unary_call(server, client):
    prompt_ids = [5, 17, 23, 42]
    _, expected = aligned_greedy(server, prompt_ids, 10)
    result = client.infer("tensorrt_llm", ifb_inputs(prompt_ids, 10), request_id="1")
    out, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    # Read as the client reads them: output_ids[0][0] and sequence_length[0][0], prompt included.
    assert out.shape == (1, 1, 14) and lengths.tolist() == [[14]]
    assert out[0][0].tolist() == prompt_ids + expected  # runtime_top_k 1: aligned_llm's greedy ids
    excluded = client.infer("tensorrt_llm", ifb_inputs(prompt_ids, 10, exclude_input_in_output=np.array([[True]])))
    assert excluded.as_numpy("output_ids")[0][0].tolist() == out[0][0][4:].tolist()


def test_streaming_from_the_not_decoupled_tensorrt_llm_is_refused_by_name(server, client):
    # The client's --streaming uses the gRPC stream; the deployment answers one response a request.
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("tensorrt_llm", ifb_inputs([5, 17], 4, streaming=np.array([[True]])))
    result, error = got.get(timeout=60)
    client.stop_stream()
    assert result is None and "streaming: token streaming needs a decoupled model" in str(error)


def test_the_readmes_http_generate_call(server):
    body = {"text_input": PROMPT, "max_tokens": 8, "bad_words": "", "stop_words": "", "end_id": 0, "temperature": 0.0}
    r = requests.post(f"{server.http_url}/v2/models/ensemble/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    expected, _ = aligned_greedy(server, PROMPT, 8)
    assert r.json()["text_output"] == PROMPT + expected and r.json()["model_name"] == "ensemble"


def test_concurrent_clients_on_every_model_name(server):
    expected, _ = aligned_greedy(server, PROMPT, 6)
    errors = []

    def one(model):
        texts, error = e2e_call(server, model, e2e_inputs(PROMPT, 6, stream=False), request_id=model)
        if error is not None or texts != [PROMPT + expected]:
            errors.append((model, texts, error))

    threads = [threading.Thread(target=one, args=(m,)) for m in ("ensemble", "tensorrt_llm_bls") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors


def test_perf_analyzer_measures_every_model_name(server, tmp_path):
    # Triton's own load generator (`make perf-analyzer`; make test installs it in .cache/perf-analyzer).
    from bench import perf_analyzer
    # Many short requests at once: the front models' cancellation watcher once asked Triton about
    # a request whose final response had gone out, and tritonserver died (SIGSEGV).
    rc = perf_analyzer.main(["--url", f"127.0.0.1:{server.grpc_port}", "--concurrency", "8", "--request-count", "48",
                             "--max-tokens", "2", "--pa-venv", str(REPO / ".cache" / "perf-analyzer"),
                             "--out", str(tmp_path), "--timeout", "120"])
    assert rc == 0 and server.proc.poll() is None, "tritonserver died under perf_analyzer"
    rows = (tmp_path / "summary.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == list(MODELS)
    assert all(float(r.split(" | ")[2]) > 0 for r in rows)

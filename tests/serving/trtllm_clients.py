"""Requests shaped exactly as NVIDIA's TensorRT-LLM Triton clients send them, for the tests:
`end_to_end_grpc_client.py` (models ensemble / tensorrt_llm_bls, text, always the gRPC stream)
and `inflight_batcher_llm_client.py` (model tensorrt_llm, token ids, a unary call), from
NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/client/."""
from __future__ import annotations

import queue

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype


def tensor(name: str, value) -> grpcclient.InferInput:
    arr = np.asarray(value)
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


def e2e_inputs(prompt: str, max_tokens: int, stream: bool, end_id: int | None = 0, **extra) -> list:
    """end_to_end_grpc_client.py's prepare_inputs: text_input, max_tokens, stream, beam_width,
    temperature and exclude_input_in_output always, each [1, 1]; temperature 0 (its --temperature)
    for a greedy answer; end_id (its --end-id) unless None: 0 by default, which the demo model
    does not produce, so the answer runs to max_tokens."""
    arrays = {"text_input": np.array([[prompt.encode()]], dtype=object), "max_tokens": np.array([[max_tokens]], dtype=np.int32),
              "stream": np.array([[stream]]), "beam_width": np.array([[1]], dtype=np.int32),
              "temperature": np.array([[0.0]], dtype=np.float32), "exclude_input_in_output": np.array([[False]])}
    if end_id is not None:
        arrays["end_id"] = np.array([[end_id]], dtype=np.int32)
    arrays.update(extra)
    return [tensor(k, v) for k, v in arrays.items()]


def e2e_call(server, model: str, inputs: list, request_id: str = "1") -> tuple[list[str], Exception | None]:
    """As the client does it: start_stream, async_stream_infer asking for text_output, read each
    response's text_output[0] until the final one; (texts, error)."""
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    done: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: done.put((result, error)))
    try:
        c.async_stream_infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("text_output")],
                             request_id=request_id, enable_empty_final_response=True)
        texts = []
        while True:
            result, error = done.get(timeout=60)
            if error is not None:
                return texts, error
            if result.as_numpy("text_output") is not None:
                out = result.as_numpy("text_output")
                assert out.shape == (1, 1)  # one string per beam, with the batch dimension
                texts.append(out[0][0].decode())
            if result.get_response(as_json=True).get("parameters", {}).get("triton_final_response", {}).get("bool_param"):
                return texts, None
    finally:
        c.stop_stream()
        c.close()


def ifb_inputs(ids: list[int], output_len: int, end_id: int = 0, **extra) -> list:
    """inflight_batcher_llm_client.py's prepare_inputs: these ten always, each [1, ...]; its
    default --top-k 1 (greedy) and --top-p 0.0 (not set); end_id and pad_id (the tokenizer's end
    token there; 0 by default here, which the demo model does not produce)."""
    arrays = {"input_ids": np.array([ids], dtype=np.int32), "input_lengths": np.array([[len(ids)]], dtype=np.int32),
              "request_output_len": np.array([[output_len]], dtype=np.int32), "beam_width": np.array([[1]], dtype=np.int32),
              "temperature": np.array([[1.0]], dtype=np.float32), "streaming": np.array([[False]]),
              "end_id": np.array([[end_id]], dtype=np.int32), "pad_id": np.array([[end_id]], dtype=np.int32),
              "runtime_top_k": np.array([[1]], dtype=np.int32), "runtime_top_p": np.array([[0.0]], dtype=np.float32),
              **extra}
    return [tensor(k, v) for k, v in arrays.items()]


def stop_inputs() -> list:
    """inflight_batcher_llm_client.py's prepare_stop_signals: sent with the request id of the
    request to end (its --stop-after-ms)."""
    return [tensor("input_ids", np.empty([1, 1], dtype=np.int32)), tensor("input_lengths", np.array([[0]], dtype=np.int32)),
            tensor("request_output_len", np.array([[0]], dtype=np.int32)), tensor("stop", np.array([[True]]))]

"""The Triton Python model behind `ensemble`, `tensorrt_llm_bls` and `tensorrt_llm`: each request
is translated (serving/trtllm_front.py) and forwarded to `aligned_llm` with a decoupled BLS call,
on a thread of its own, and the answers are sent back shaped as upstream's. Runs inside Triton's
Python backend only (it imports triton_python_backend_utils).

Cancellation: a client that cancels its request (gRPC stream cancel, a closed HTTP stream), or a
`tensorrt_llm` request with `stop` true naming it by request id, ends the request inside
`aligned_llm` through that model's own `stop` input, so its KV is freed at once.
"""
from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from orchestrator.core import RequestRejected
from serving.trtllm_front import (INNER_MODEL, FrontRequest, count_outputs, logprob_outputs, text_outputs,
                                  text_request, token_outputs, token_request, upstream_error)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.1
MAX_IN_FLIGHT = 1024
"""Requests forwarded at once (threads waiting on aligned_llm's answers); aligned_llm's own
queue bounds what it accepts beyond its batch."""


@dataclass(eq=False)
class _Forward:
    """One client request under way in aligned_llm."""

    sender: object
    client_id: str
    inner_id: str
    cum_log_prob: float = 0.0
    """Sum of the log probabilities of the tokens generated so far (cum_log_probs)."""
    num_input_tokens: int = 0
    """The prompt's token count, from aligned_llm (num_input_tokens)."""
    live: bool = False
    """aligned_llm answered once: it has the request, so a stop by id reaches it."""
    stop_wanted: bool = False
    stopped: bool = False
    finished: bool = False
    """Its final response went out: its sender must not be touched again."""


class FrontModel:
    tokens = False
    """True for `tensorrt_llm` (token ids); False for the text models."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.inputs = [i["name"] for i in config["input"]]
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
        self._live: set[_Forward] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix=f"{self.name}-forward")
        self._watcher = threading.Thread(target=self._watch, name=f"{self.name}-cancel", daemon=True)
        self._watcher.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for name in self.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                if self.tokens and _true(inputs.get("stop")):
                    self._stop_named(request.request_id(), sender)
                    continue
                front = token_request(inputs) if self.tokens else text_request(inputs)
                if front.stream and not self.decoupled:
                    raise RequestRejected("streaming" if self.tokens else "stream", (
                        f"token streaming needs a decoupled model; this {self.name} is not (one answer per request): "
                        "stream from ensemble, tensorrt_llm_bls or aligned_llm"))
            except RequestRejected as e:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"{e.field}: {e.message}", pb_utils.TritonError.INVALID_ARG)),
                            flags=FINAL)
                continue
            except Exception as e:  # never let one request crash the model
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"internal error: {type(e).__name__}: {e}")), flags=FINAL)
                continue
            fwd = _Forward(sender, request.request_id(), uuid.uuid4().hex)
            with self._lock:
                self._live.add(fwd)
            self._pool.submit(self._forward, fwd, front)
        return None

    # ---- forwarding ---------------------------------------------------------------------------

    def _forward(self, fwd: _Forward, front: FrontRequest) -> None:
        try:
            inner = pb_utils.InferenceRequest(
                model_name=INNER_MODEL, requested_output_names=front.inner_outputs, request_id=fwd.inner_id,
                inputs=[pb_utils.Tensor(name, value) for name, value in front.inner.items()])
            text, ids, logprobs = [], [], []
            for response in inner.exec(decoupled=True):
                if response.has_error():
                    error = response.error()  # its code kept: UNAVAILABLE (503) for overload, INVALID_ARG (400)
                    self._send_error(fwd, upstream_error(error.message(), self.tokens), error.code())
                    return
                if not response.output_tensors():
                    continue  # the empty final response of a decoupled model
                if not fwd.live:
                    with self._lock:
                        fwd.live = True
                    if fwd.stop_wanted:  # stopped before aligned_llm had it
                        self._stop_inner(fwd)
                piece = _as_str(response, "text_output")
                piece_ids = pb_utils.get_output_tensor_by_name(response, "output_ids").as_numpy().reshape(-1).tolist()
                piece_lps = _floats(response, "output_log_probs") if front.logprobs else []
                if any(front.counts):
                    fwd.num_input_tokens = int(_floats(response, "num_input_tokens")[0])
                done = _as_str(response, "finish_reason") != ""
                fwd.cum_log_prob += sum(piece_lps)
                if front.stream:
                    self._send(fwd, front, piece, piece_ids, done, piece_lps)
                else:
                    text.append(piece)
                    ids.extend(piece_ids)
                    logprobs.extend(piece_lps)
                    if done:
                        self._send(fwd, front, "".join(text), ids, True, logprobs)
                if done:
                    return
            self._send_error(fwd, f"{INNER_MODEL} ended the request without a final answer")
        except Exception as e:
            self._send_error(fwd, f"internal error: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._live.discard(fwd)

    def _send(self, fwd: _Forward, front: FrontRequest, text: str, ids: list[int], final: bool,
              logprobs: list[float]) -> None:
        if fwd.sender.is_cancelled():
            if final:
                self._final(fwd, pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "request cancelled", pb_utils.TritonError.CANCELLED)))
            return
        outputs = token_outputs(front, ids) if self.tokens else text_outputs(front, text)
        if front.logprobs:
            outputs.update(logprob_outputs(logprobs, fwd.cum_log_prob))
        outputs.update(count_outputs(front, fwd.num_input_tokens, len(ids)))
        response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
        if final:
            self._final(fwd, response)
        else:
            fwd.sender.send(response, flags=0)

    def _send_error(self, fwd: _Forward, message: str, code=None) -> None:
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        self._final(fwd, pb_utils.InferenceResponse(error=error))

    def _final(self, fwd: _Forward, response) -> None:
        """Send fwd's final response. Under the lock the watcher holds while it asks senders
        whether their client cancelled: after the final response Triton frees the request's
        response factory, and asking it then crashes tritonserver (seen under perf_analyzer:
        SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled)."""
        with self._lock:
            self._live.discard(fwd)
            if fwd.finished:
                return
            fwd.finished = True
            fwd.sender.send(response, flags=FINAL)

    # ---- cancellation -------------------------------------------------------------------------

    def _stop_inner(self, fwd: _Forward) -> None:
        """End fwd's request inside aligned_llm (its `stop` input, by request id); before
        aligned_llm has answered once, when it does."""
        with self._lock:
            fwd.stop_wanted = True
            if fwd.stopped or not fwd.live:
                return
            fwd.stopped = True
        stop = pb_utils.InferenceRequest(model_name=INNER_MODEL, requested_output_names=[], request_id=fwd.inner_id,
                                         inputs=[pb_utils.Tensor("stop", np.array([[True]], dtype=bool))])
        for _ in stop.exec(decoupled=True):
            pass

    def _stop_named(self, client_id: str, sender) -> None:
        """A `tensorrt_llm` stop request: end the request under way with this request id."""
        if not client_id:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                "stop: a stop request needs the request id of the request to end")), flags=FINAL)
            return
        with self._lock:
            targets = [f for f in self._live if f.client_id == client_id]
        for fwd in targets:
            self._stop_inner(fwd)
        sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)

    def _watch(self) -> None:
        while not self._stopping.wait(CANCEL_POLL_S):
            with self._lock:  # no final response goes out meanwhile (`_final`)
                cancelled = [f for f in self._live if not f.stop_wanted and f.sender.is_cancelled()]
            for fwd in cancelled:
                try:
                    self._stop_inner(fwd)
                except Exception as e:
                    pb_utils.Logger.log_warn(f"{self.name}: cancelling {fwd.inner_id} failed: {e}")

    def finalize(self):
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _true(arr) -> bool:
    return arr is not None and bool(np.asarray(arr).reshape(-1)[0])


def _as_str(response, name: str) -> str:
    value = pb_utils.get_output_tensor_by_name(response, name).as_numpy().reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _floats(response, name: str) -> list[float]:
    tensor = pb_utils.get_output_tensor_by_name(response, name)
    return [] if tensor is None else tensor.as_numpy().reshape(-1).astype(float).tolist()

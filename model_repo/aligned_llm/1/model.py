"""Triton Python-backend model: AlignedServe's orchestrator behind TensorRT-LLM-style tensors.

`execute()` never blocks: it checks and tokenizes each request, hands it to the orchestrator and
returns. Tokens come back on the orchestrator's run-loop thread, which only queues them; one
sender thread turns them into streamed responses and watches for client cancellation.

The same orchestrator serves the admin dashboard (`admin_port`) and the OpenAI-compatible API
(`openai_port`), each on its own thread and port in this process: one model, one queue.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

_REPO_ROOT = Path(__file__).resolve().parents[3]
if str(_REPO_ROOT) not in sys.path:  # a checkout served without `pip install -e .`
    sys.path.insert(0, str(_REPO_ROOT))

from orchestrator.config import ServeConfig  # noqa: E402
from orchestrator.core import RequestRejected, TokenEvent  # noqa: E402
from orchestrator.service import Orchestrator  # noqa: E402
from serving.engine_setup import open_engine  # noqa: E402
from serving.request_parsing import GenerateParams, parse_request  # noqa: E402
from serving.stop_strings import TextOutput, stop_request  # noqa: E402
from serving.tokenizer import load_tokenizer, max_prompt_bytes  # noqa: E402

log = logging.getLogger("alignedserve.triton")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.1
TOKENIZER_THREADS = 2
"""Threads that tokenize prompts and submit them (off execute, which Triton calls for every request)."""
# The orchestrator names the prompt "prompt"; clients know it as the text_input tensor.
_FIELD_NAMES = {"prompt": "text_input"}


def _log_info(message: str) -> None:
    """Into Triton's own log, where operators look."""
    pb_utils.Logger.log_info(message)


@dataclass(eq=False)
class _Stream:
    """One client request being answered."""

    sender: object
    output: TextOutput
    stream: bool
    request_id: str = ""
    triton_id: str = ""
    """The id the client gave the request (Triton's request id), for a `stop` request naming it."""
    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[float] | None = None
    """The answer's log probabilities so far; None: not asked for (return_log_probs)."""
    num_input_tokens: int | None = None
    """The prompt's token count, where the client asked for the output (the front models do)."""
    cancelled: bool = False


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()
                  if v.get("string_value", "") != ""}
        config = self.config = ServeConfig.load(file=os.environ.get("ALIGNED_CONFIG"), **params)
        engine_dir = Path(config.engine_dir)
        if not engine_dir.is_absolute():
            engine_dir = _REPO_ROOT / engine_dir
        # Any failure here (missing or corrupt engine dir, bad config) fails this model's load
        # with the message; Triton reports it and keeps serving its other models.
        engine = open_engine(engine_dir, config)
        self.tokenizer = load_tokenizer(engine_dir)
        self.orchestrator = Orchestrator(engine, config).start()
        self.admin = None
        if config.admin_port:  # the dashboard and admin API, on their own port and thread
            from serving.admin import AdminServer
            self.admin = AdminServer(self.orchestrator, host=config.admin_host, port=config.admin_port,
                                     token=config.admin_token or None)
            self.admin.start()
            log.info("aligned_llm admin dashboard on %s", self.admin.url)
        self.openai = None
        if config.openai_port:  # the OpenAI-compatible API: same orchestrator, its own port and thread
            from serving.openai_api import OpenAIServer
            self.openai = OpenAIServer(self.orchestrator, self.tokenizer, engine_dir, host=config.openai_host,
                                       port=config.openai_port, model_name=config.openai_model_name or None)
            self.openai.start()
            log.info("aligned_llm OpenAI API on %s (model %r)", self.openai.base_url, self.openai.model_name)
        self.max_tokens_limit = self.orchestrator.config.max_tokens_limit
        self.vocab_size = self.orchestrator.info.model.vocab_size
        self.max_prompt_bytes = max_prompt_bytes(self.tokenizer, self.orchestrator.config.max_seq_len,
                                                 config.max_prompt_bytes)
        # Tokenizing happens here, not in execute: a long prompt never holds up the requests
        # behind it (execute only parses, and refuses an oversized prompt by its byte count).
        self._tokenizing = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="alignedserve-tok")
        self._outbox: queue.Queue = queue.Queue()
        self._live: set[_Stream] = set()  # requests to watch for client cancellation
        self._live_lock = threading.Lock()
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="alignedserve-sender", daemon=True)
        self._sender.start()
        self._drained = threading.Lock()
        if os.environ.get("ALIGNEDSERVE_DRAIN_FILE"):  # the launcher asks for a drain by creating it
            threading.Thread(target=self._watch_drain, args=(Path(os.environ["ALIGNEDSERVE_DRAIN_FILE"]),),
                             name="alignedserve-drain", daemon=True).start()
        log.info("aligned_llm ready: engine %s, policy %s", engine_dir, config.policy)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            params = None
            with _refusals(sender, self.orchestrator):
                if self._stop(request, sender):
                    continue
                params = self._parse(request)
                meta = (request.request_id(), "num_input_tokens" in request.requested_output_names())
            if params is None:  # refused, and answered
                continue
            with _refusals(sender, self.orchestrator, counted=True):
                self.orchestrator.check_admission()  # a full queue refuses at once, before tokenizing
                self._tokenizing.submit(self._accept, params, meta, sender)
        return None

    def _stop(self, request, sender) -> bool:
        """A `stop` request: cancel the live request with its request id (True: it was one)."""
        tensor = pb_utils.get_input_tensor_by_name(request, "stop")
        if tensor is None or not bool(np.asarray(tensor.as_numpy()).reshape(-1)[0]):
            return False
        rid = request.request_id()
        if not rid:
            raise RequestRejected("stop", "a stop request needs the request id of the request to end")
        with self._live_lock:
            targets = [ctx for ctx in self._live if ctx.triton_id == rid]
        for ctx in targets:  # it ends with a final response, finish_reason "cancelled", as it stands
            self.orchestrator.cancel(ctx.request_id)
        sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)
        return True

    def _parse(self, request) -> GenerateParams:
        """The request's inputs, checked (cheap: an oversized prompt is refused by its byte count)."""
        inputs = {}
        for name in ("text_input", "input_ids", "max_tokens", "stream", "temperature", "top_k", "top_p",
                     "seed", "end_id", "stop_words", "stop_words_list", "bad_words", "bad_words_list",
                     "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens",
                     "return_log_probs"):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        return parse_request(inputs, self.max_tokens_limit, self.vocab_size, self.max_prompt_bytes)

    def _accept(self, params: GenerateParams, meta: tuple[str, bool], sender) -> None:
        """On a tokenizer thread: tokenize and hand the request to the orchestrator."""
        with _refusals(sender, self.orchestrator, counted=True):
            self._submit(params, *meta, sender)

    def _submit(self, params: GenerateParams, triton_id: str, counted: bool, sender) -> None:
        prompt_ids = list(params.prompt_ids) or self.tokenizer.encode(params.text).ids
        sampling = params.sampling
        if params.bad_words:  # as TensorRT-LLM's preprocessing does: each word's ids, no special tokens
            words = tuple(tuple(self.tokenizer.encode(w, add_special_tokens=False).ids) for w in params.bad_words)
            sampling = dataclasses.replace(sampling, bad_words=sampling.bad_words + tuple(w for w in words if w))
        # Stop words are matched on the text (serving/stop_strings.py), kept in it as TensorRT-LLM does.
        output = TextOutput(self.tokenizer, params.stop_words, keep_stop=True,
                            on_stop=stop_request(self.orchestrator))
        ctx = _Stream(sender, output, params.stream, triton_id=triton_id,
                      logprobs=[] if sampling.logprobs else None, num_input_tokens=len(prompt_ids) if counted else None)
        with self._live_lock:
            req = self.orchestrator.submit(
                prompt_ids, params.max_tokens, sampling, params.end_id, params.stop_sequences,
                on_event=lambda event, ctx=ctx: self._outbox.put((ctx, event)))
            ctx.request_id = req.id
            self._live.add(ctx)

    # ---- sender thread ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            try:
                ctx, event = self._outbox.get(timeout=CANCEL_POLL_S)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                self._poll_cancellations()
                continue
            try:
                self._send(ctx, event)
            except Exception:
                log.exception("sending a response failed; cancelling %s", ctx.request_id)
                self.orchestrator.cancel(ctx.request_id)
                with self._live_lock:
                    self._live.discard(ctx)
            if self._outbox.empty():
                self._poll_cancellations()

    def _poll_cancellations(self) -> None:
        with self._live_lock:
            live = list(self._live)
        for ctx in live:
            if not ctx.cancelled and ctx.sender.is_cancelled():
                ctx.cancelled = True
                self.orchestrator.cancel(ctx.request_id)

    def _send(self, ctx: _Stream, event: TokenEvent) -> None:
        if event.final:
            with self._live_lock:
                self._live.discard(ctx)
        if ctx.output.finished:  # a stop word ended it; these are the tokens before its end landed
            return
        if event.final and event.finish_reason.value in ("cancelled", "error"):
            _log_info(f"request {ctx.request_id} {event.finish_reason.value}"
                      + (f": {event.error}" if event.error else ""))
        if ctx.cancelled:
            if event.final:
                ctx.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "request cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)
            return
        if event.error is not None:
            ctx.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(event.error)), flags=FINAL)
            return
        piece = ctx.output.feed(event)
        done = piece.finish_reason is not None
        if done and not event.final:  # a stop word: the request is being ended (reason stop); no more polling
            with self._live_lock:
                self._live.discard(ctx)
        asked = ctx.logprobs is not None
        if ctx.stream:
            ctx.sender.send(self._response(piece.text, list(piece.token_ids), piece.finish_reason,
                                           list(piece.logprobs) if asked else None, ctx.num_input_tokens),
                            flags=FINAL if done else 0)
            return
        ctx.ids.extend(piece.token_ids)
        ctx.text.append(piece.text)
        if asked:
            ctx.logprobs.extend(piece.logprobs)
        if done:
            ctx.sender.send(self._response("".join(ctx.text), ctx.ids, piece.finish_reason, ctx.logprobs,
                                           ctx.num_input_tokens), flags=FINAL)

    @staticmethod
    def _response(text: str, ids: list[int], finish_reason: str | None, logprobs: list[float] | None = None,
                  num_input_tokens: int | None = None):
        reason = finish_reason or ""
        tensors = [
            # Leading 1: the batch dimension of max_batch_size > 0, as the ensemble's outputs.
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("output_ids", np.array([ids], dtype=np.int32)),
            pb_utils.Tensor("finish_reason", np.array([[reason.encode()]], dtype=np.object_)),
        ]
        if logprobs is not None:  # asked for (return_log_probs): one per token of output_ids
            tensors.append(pb_utils.Tensor("output_log_probs", np.array([logprobs], dtype=np.float32).reshape(1, -1)))
        if num_input_tokens is not None:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([[num_input_tokens]], dtype=np.int32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    # ---- shutdown -----------------------------------------------------------------------------

    def _watch_drain(self, path: Path) -> None:
        """The launcher creates `path` on SIGTERM, before it stops tritonserver (which would first
        wait for every HTTP connection, admitting meanwhile): drain, then say so in `path`.done."""
        while not self._stopping.is_set():
            if path.exists():
                self._drain()
                path.with_suffix(".done").write_text("drained\n")
                return
            time.sleep(0.1)

    def _drain(self) -> None:
        """Refuse new requests, give those in flight drain_timeout_s to finish, end the rest with a
        final error ("the server is shutting down"). Once: the launcher's request and finalize may both ask."""
        if not self._drained.acquire(blocking=False):
            return
        drain_s = self.config.drain_timeout_s
        self.orchestrator.drain()
        left = self.orchestrator.wait_idle(drain_s)
        if left:
            _log_info(f"drain: {left} requests still in flight after {drain_s:g} s are ended (cancelled)")
            self.orchestrator.stop()
        else:
            _log_info("drain: no request in flight")

    def finalize(self):
        orchestrator = getattr(self, "orchestrator", None)
        if orchestrator is None:
            return
        self._tokenizing.shutdown(wait=True)  # every request taken in is submitted (or refused) first
        self._drain()  # where the launcher did not ask for it first (tritonserver stopped directly)
        if getattr(self, "admin", None) is not None:
            self.admin.stop()
        orchestrator.stop()  # in-flight requests end as cancelled; their finals are queued
        if getattr(self, "openai", None) is not None:
            self.openai.stop()  # after the orchestrator: its open streams have their finals by now
        self._stopping.set()
        self._sender.join(timeout=10)


@contextlib.contextmanager
def _refusals(sender, orchestrator, counted: bool = False):
    """A request that fails before it is accepted gets its final error answer: the field and the
    limit for a refusal (UNAVAILABLE, HTTP 503, for a full queue or a server draining; INVALID_ARG,
    HTTP 400, for the rest), the exception otherwise; the model goes on serving. counted: the
    orchestrator counted the refusal already (it refused it); else it is counted here."""
    try:
        yield
    except RequestRejected as e:
        if not counted:
            orchestrator.record_refusal(e.field)
        msg = f"{_FIELD_NAMES.get(e.field, e.field)}: {e.message}"
        code = pb_utils.TritonError.UNAVAILABLE if e.field in ("queue", "server") else pb_utils.TritonError.INVALID_ARG
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, code)), flags=FINAL)
    except Exception as e:  # never let one request crash the model
        log.exception("request failed before it was accepted")
        sender.send(pb_utils.InferenceResponse(
            error=pb_utils.TritonError(f"internal error: {type(e).__name__}: {e}")), flags=FINAL)

"""`TrtllmEngine`: the engine contract (engines/base.py) over TensorRT-LLM.

Two flavours, one code path: the LLM API (`tensorrt_llm.LLM`, PyTorch backend) and, for 1.2.x
TensorRT engine directories, the C++ Executor behind the same calls (`executor_llm.ExecutorLLM`).
How each contract call maps onto what TensorRT-LLM's public API offers (docs/tensorrt-llm.md):

- `prefill`: submit each request (streaming) and take its first token. Batches are formed by
  admission (`admission`): max_batch_size = the orchestrator's capacity, GUARANTEED_NO_EVICT,
  chunked context off, so every submitted request runs from the next iteration until it ends.
- `decode`: the next token of each named request. TensorRT-LLM decodes *every* admitted request
  every iteration; tokens the orchestrator has not asked for yet wait in `token_streams`
  (hence `can_form_batches=False`).
- `move(device -> host)` parks: order a save (`host_pool`), abort; the KV connector saves the
  blocks as TensorRT-LLM ends the request. `move(host -> device)` resumes: order a load, submit
  prompt + generated tokens; the connector loads the saved blocks instead of recomputing them.
  The Executor flavour has no connector: there the host tier is TensorRT-LLM's own
  (`host_cache`), a cancelled request's blocks stay as reusable cache, and the resubmitted
  tokens find them again.
- `move(helper -> device)` hands a `context_only` prefill to the decode instance as a
  `generation_only` request, whose KV the cache transceiver pulls over the peer link (`disagg`).
- `free`: abort, close the stream, release host slots. Unknown ids are ignored.

What TensorRT-LLM may still do on its own: pick the iteration's order of context and generation
work, add no request we did not submit, and under GUARANTEED_NO_EVICT never pause one; it does
decode requests the orchestrator holds back (their tokens are buffered), and with block reuse it
keeps finished requests' blocks as reusable cache (evicted by `retention` priority).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from engines.base import (HOST, IN_FLIGHT, CallTiming, CapabilityError, Capabilities, DeviceInfo, Engine, EngineError,
                          EngineInfo, ModelInfo, PrefillHandle, PrefillRequest, SamplingParams, StepResult,
                          TransferHandle, TransferTimedOut,
                          check_new_prompts)
from engines.tensorrt_llm import disagg, host_pool
from engines.tensorrt_llm.admission import AdmissionGate, reserved_blocks
from engines.tensorrt_llm.host_cache import HostCacheBooks
from engines.tensorrt_llm.host_pool import HostKvPool
from engines.tensorrt_llm.instances import open_engine_dir
from engines.tensorrt_llm.llm_settings import DRIVER_SLOTS, TrtllmSettings
from engines.tensorrt_llm.request_state import PendingMove, RequestState
from engines.tensorrt_llm.retention import retention_config
from engines.tensorrt_llm.sampling import sampling_params
from engines.tensorrt_llm.token_streams import TokenStreams

CONNECTOR_REFUSES_HANDOFF = (
    "TensorRT-LLM's KV connector refuses generation-only requests (\"Connector API is not supported for "
    "generation-only requests\"), so one decode instance cannot have both the connector host pool and peer "
    "prefetch; with a helper device the engine parks requests in TensorRT-LLM's own host cache instead")


class TrtllmEngine(Engine):
    """The engine contract over one decode `LLM` (or `ExecutorLLM`) instance, optionally a context
    (prefetch) instance on a helper GPU, and a host tier: the orchestrator's host KV pool through
    the KV connector (LLM API), or TensorRT-LLM's own host cache (Executor)."""

    def __init__(self, api: Any, llm: Any, settings: TrtllmSettings, model: ModelInfo, *, bytes_per_block: int,
                 kv_blocks: int, device: str = "cuda:0", pool: HostKvPool | HostCacheBooks | None = None,
                 ctx_llm: Any = None,
                 helper_device: str | None = None, timeout_s: float = 120.0):
        if (ctx_llm is None) != (helper_device is None):
            raise ValueError("a context instance and its helper device come together")
        if isinstance(pool, HostKvPool) and ctx_llm is not None:
            raise CapabilityError(CONNECTOR_REFUSES_HANDOFF)
        self.api, self.llm, self.ctx_llm, self.settings = api, llm, ctx_llm, settings
        self.pool = pool
        # With the connector, one more slot and block are TensorRT-LLM's (llm_settings.DRIVER_SLOTS):
        # the one-token request that drives the iteration a park's save needs (`_drive`).
        driver = DRIVER_SLOTS if isinstance(pool, HostKvPool) else 0
        if kv_blocks <= settings.max_batch_size + driver:
            raise ValueError(f"kv_blocks ({kv_blocks}) must exceed max_batch_size ({settings.max_batch_size}) + "
                             f"{driver}: one block per slot is kept back for the token TensorRT-LLM reserves and "
                             "never writes")
        self.gate = AdmissionGate(settings.max_batch_size, kv_blocks - driver)
        self._driver: str | None = None
        self._drives = 0
        self.streams = TokenStreams(timeout_s)
        self.timeout_s = timeout_s
        self.device, self.helper_device = device, helper_device
        self._reqs: dict[str, RequestState] = {}
        self._moves: dict[int, PendingMove] = {}
        self._prefills: dict[int, float] = {}  # unfinished helper prefills: handle id -> start time
        # The orchestrator grants prompt + max_tokens - 1 tokens of KV (the last token is never fed);
        # GUARANTEED_NO_EVICT reserves prompt + max_tokens, one block more at a block boundary. It is
        # told one block per slot less than the pool, so its grants always fit the gate's books.
        usable = kv_blocks - settings.max_batch_size - driver
        devices = (DeviceInfo(device, "cuda", usable),)
        if helper_device:
            devices += (DeviceInfo(helper_device, "cuda", usable),)
        self._info = EngineInfo(
            backend="tensorrt_llm", model=model, devices=devices, block_size=settings.tokens_per_block,
            bytes_per_block=bytes_per_block, host_blocks=pool.blocks if pool else 0,
            capabilities=Capabilities(can_offload=pool is not None and pool.blocks > 0,
                                      can_peer_copy=ctx_llm is not None, can_form_batches=False,
                                      can_chunk_prefill=False, can_overlap_prefill=ctx_llm is not None))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, manifest, *, device: str = "auto", dtype: str | None = None,
                        kv_blocks: int | None = None, host_kv_blocks: int | None = None,
                        helper_devices: Sequence[str] = ()) -> "TrtllmEngine":
        """Open an engine directory written by `make build-engine BACKEND=trtllm`.

        kv_blocks / host_kv_blocks override the manifest's pools; dtype cannot change without a
        rebuild (a TensorRT engine is compiled for one). The instances are started by `instances`."""
        return cls(**open_engine_dir(engine_dir, manifest, device=device, dtype=dtype, kv_blocks=kv_blocks,
                                     host_kv_blocks=host_kv_blocks, helper_devices=helper_devices))

    # ------------------------------------------------------------------ the contract
    def describe(self) -> EngineInfo:
        return self._info

    def prefill(self, requests: Sequence[PrefillRequest], device: str | None = None) -> StepResult:
        device = device or self.device
        if device == self.helper_device:
            handle = self.start_prefill(requests, device)
            while (result := self.prefill_result(handle)) is None:
                time.sleep(0.0005)
            return result
        self._check_device(device, "prefill")
        check_new_prompts(requests, self._reqs, self._info.model.max_seq_len, self._info.model.vocab_size)
        ids = [r.request_id for r in requests]
        states = [self._state(r, device) for r in requests]
        self.gate.admit({req.rid: self._reservation(req) for req in states}, "prefill")
        t0 = time.perf_counter()
        try:
            for req in states:
                self._reqs[req.rid] = req
                self._submit(req, self.llm, "running")
            tokens = {rid: self._take(rid, "prefill") for rid in ids}
        except BaseException:
            self.free(ids)
            self.gate.release(ids)
            raise
        n = sum(len(r.prompt_ids) for r in requests)
        return StepResult(tokens, CallTiming("prefill", time.perf_counter() - t0, len(ids), n, n,
                                             max(len(r.prompt_ids) for r in requests)))

    def decode(self, request_ids: Sequence[str]) -> StepResult:
        ids = list(request_ids)
        for rid in ids:
            self._check_on(rid, self.device, "decode")
        t0 = time.perf_counter()
        kv = [len(self._reqs[rid].tokens) for rid in ids]
        tokens = {rid: self._take(rid, "decode") for rid in ids}
        return StepResult(tokens, CallTiming("decode", time.perf_counter() - t0, len(ids), len(ids), sum(kv),
                                             max(kv, default=0)))

    def free(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            req = self._reqs.pop(rid, None)
            if req is None:
                continue
            for key in (req.stream, req.ctx_stream):
                if key is not None:
                    self.streams.close(key)
            if self.pool is not None:
                self.pool.release(rid)
            self.gate.release([rid])

    def tier_of(self, request_id: str) -> str:
        req = self._reqs.get(request_id)
        if req is None:
            raise EngineError(f"tier_of: unknown request id {request_id!r}")
        return req.tier

    def kv_blocks_used(self, tier: str) -> int:
        """Host: slots of the host pool. Device: blocks of the requests resident there, counted
        from their lengths (TensorRT-LLM's own count, with reusable cache, is in `llm.get_stats()`)."""
        if tier == HOST:
            return self.pool.used() if self.pool else 0
        self._info.tier_blocks(tier)  # KeyError for an unknown tier
        return sum(self._info.blocks_for(len(r.tokens)) for r in self._reqs.values() if r.tier == tier)

    def move(self, request_ids: Sequence[str], src: str, dst: str) -> TransferHandle:
        ids = list(request_ids)
        if src == self.device and dst == HOST:
            kind = "park"
        elif src == HOST and dst == self.device:
            kind = "resume"
        elif src == self.helper_device and dst == self.device and src is not None:
            kind = "handoff"
        else:
            return super().move(ids, src, dst)  # CapabilityError naming the capabilities
        if kind in ("park", "resume") and self.pool is None:
            raise CapabilityError(
                f"move {src} -> {dst}: this TensorRT-LLM engine has no host KV pool (host_pool_blocks=0 on the "
                "LLM-API flavour, host_cache_bytes=0 on the engine flavour); rebuild with --host-kv-memory-gb > 0")
        for rid in ids:
            self._check_on(rid, src, "move")
            if kind == "resume" and not self._reqs[rid].complete and self.pool.state(rid) != "saved":
                raise EngineError(f"move: request {rid!r} has no saved KV in the host pool ({self.pool.state(rid)})")
        if kind != "park":
            self.gate.admit({r: self._reservation(self._reqs[r]) for r in ids if not self._reqs[r].complete}, "move")
        handle = TransferHandle(tuple(ids), src, dst, bytes=self._bytes(ids))
        started = time.perf_counter()
        for rid in ids:
            req = self._reqs[rid]
            if kind == "park":
                self.pool.order_park(rid, req.tokens)
                if not self._ran_to_the_end(req):
                    self.streams.abort(req.stream)
                self.gate.release([rid])
            elif req.complete:
                pass  # resumed from its buffered tokens: nothing to load, nothing to submit
            elif kind == "resume":
                self.streams.close(req.stream)
                self.pool.order_resume(rid, req.tokens)
                self._submit(req, self.llm, "staged")
            else:
                params = disagg.generation_only(self.streams.disaggregated_params(req.ctx_stream), rid)
                # the context side's first token is one of the request's max_tokens
                self._submit(req, self.llm, "staged", disaggregated=params, tokens=req.prompt,
                             max_tokens=req.remaining + 1, skip=1 if disagg.GEN_ONLY_REPEATS_FIRST_TOKEN else 0)
            req.tier = IN_FLIGHT
        self._moves[handle.id] = PendingMove(kind, handle, started)
        return handle

    def poll(self, handle: TransferHandle) -> bool:
        m = self._moves.get(handle.id)
        if m is None:
            raise EngineError(f"poll: transfer {handle.id} was not started by this engine")
        if m.done:
            return True
        live = [rid for rid in handle.request_ids if rid in self._reqs]
        if not all(self._landed(m.kind, rid) for rid in live):
            if m.kind == "park" and isinstance(self.pool, HostKvPool):
                self._drive()
            return False
        for rid in live:
            req = self._reqs[rid]
            req.tier = handle.dst
            if m.kind == "park" and not req.complete:
                self.streams.close(req.stream)
                req.stream = None
            elif m.kind == "handoff":
                self.streams.close(req.ctx_stream)
                req.ctx_stream = None
        m.done = True
        handle.seconds = time.perf_counter() - m.started
        return True

    def wait(self, handle: TransferHandle, timeout: float | None = None) -> None:
        limit = self.timeout_s if timeout is None else min(timeout, self.timeout_s)
        deadline = time.monotonic() + limit
        while not self.poll(handle):
            if time.monotonic() >= deadline:
                # It goes on; if the orchestrator gives up on it, freeing the requests cancels them.
                raise TransferTimedOut(f"wait: transfer {handle.id} of {list(handle.request_ids)} did not finish "
                                       f"in {limit:g}s")
            time.sleep(0.0005)

    def start_prefill(self, requests: Sequence[PrefillRequest], device: str) -> PrefillHandle:
        if device != self.helper_device:
            return super().start_prefill(requests, device)
        check_new_prompts(requests, self._reqs, self._info.model.max_seq_len, self._info.model.vocab_size)
        ids = [r.request_id for r in requests]
        try:
            for r in requests:
                req = self._reqs[r.request_id] = self._state(r, IN_FLIGHT)
                req.ctx_stream = self._open(req, self.ctx_llm, "running", max_tokens=1,
                                            disaggregated=disagg.context_only(self.api))
        except BaseException:
            self.free(ids)
            raise
        handle = PrefillHandle(tuple(ids), device)
        self._prefills[handle.id] = time.perf_counter()
        return handle

    def prefill_result(self, handle: PrefillHandle) -> StepResult | None:
        if handle.id not in self._prefills or handle.result is not None:
            return handle.result
        live = [rid for rid in handle.request_ids if rid in self._reqs]
        if not all(self.streams.has_token(self._reqs[rid].ctx_stream) for rid in live):
            return None
        tokens = {}
        try:
            for rid in live:
                req = self._reqs[rid]
                tok = self.streams.next_token(req.ctx_stream, "prefill", rid)
                req.generated.append(tok)
                req.tier = handle.device
                tokens[rid] = tok
        except EngineError:
            self.free(live)
            raise
        n = sum(len(self._reqs[rid].prompt) for rid in live)
        seconds = time.perf_counter() - self._prefills.pop(handle.id)
        handle.result = StepResult(tokens, CallTiming("prefill", seconds, len(live), n, n,
                                                      max((len(self._reqs[r].prompt) for r in live), default=0)))
        return handle.result

    def wait_any(self, handles: Sequence[TransferHandle | PrefillHandle]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            for h in handles:
                ready = self.prefill_result(h) is not None if isinstance(h, PrefillHandle) else self.poll(h)
                if ready:
                    return
            if time.monotonic() > deadline:
                raise EngineError(f"wait_any: none of {len(handles)} handles finished in {self.timeout_s}s")
            time.sleep(0.0005)

    def close(self) -> None:
        self.free(list(self._reqs))
        if self._driver is not None:
            self.streams.close(self._driver)
        for llm in (self.llm, self.ctx_llm):  # first, so nothing is delivered to the streams' closed loop
            if llm is not None:
                llm.shutdown()
        self.streams.shutdown()
        if isinstance(self.pool, HostKvPool):
            host_pool.bind(None)

    # ------------------------------------------------------------------ helpers
    def _open(self, req: RequestState, llm: Any, role: str, *, max_tokens: int | None = None, disaggregated=None,
              skip: int = 0, tokens: Sequence[int] | None = None) -> str:
        """Submit the request (by default its prompt and every token generated so far) and open its stream.
        A generation_only hand-off sends the prompt alone: the first token travels in the hand-off."""
        key = f"{req.rid}#{req.submissions}"
        req.submissions += 1
        tokens = list(req.tokens if tokens is None else tokens)
        sp = sampling_params(self.api, req.sampling, max_tokens or req.remaining)
        retention = retention_config(self.api, role)
        self.streams.open(key, lambda: llm.generate_async(tokens, sampling_params=sp, streaming=True,
                                                          kv_cache_retention_config=retention,
                                                          disaggregated_params=disaggregated), skip=skip)
        return key

    def _drive(self) -> None:
        """Make TensorRT-LLM run an iteration when a park's save needs one and nothing else would.

        The connector saves a parked request's blocks in the executor's next iteration that forwards
        a batch, and reports the save done from `get_finished`; an executor with no active request
        blocks on its request queue instead (tensorrt_llm/_torch/pyexecutor/py_executor.py,
        `_executor_loop`, `_fetch_and_enqueue_requests`), and a request held for its save is not
        active. Parking the last running requests would wait for the next client request. Once no
        request of ours is still running there, a one-token request (its slot and block are kept
        for it) makes that iteration; its token is dropped."""
        if self._driver is not None:
            if not self.streams.ended(self._driver):
                return
            self.streams.close(self._driver)
            self._driver = None
        if any(r.stream is not None and not self.streams.ended(r.stream) for r in self._reqs.values()):
            return  # a running request's iterations will do
        key = self._driver = f"#drive{self._drives}"
        self._drives += 1
        token = self._info.model.bos_token_id or 0
        sp = sampling_params(self.api, SamplingParams(), 1)
        self.streams.open(key, lambda: self.llm.generate_async([token], sampling_params=sp, streaming=True))

    def _state(self, r: PrefillRequest, tier: str) -> RequestState:
        room = self._info.model.max_seq_len - len(r.prompt_ids)
        max_new = room if r.max_new_tokens is None else min(r.max_new_tokens, room)
        return RequestState(r.request_id, tuple(r.prompt_ids), r.sampling, tier, max_new)

    def _reservation(self, req: RequestState) -> int:
        """Blocks GUARANTEED_NO_EVICT reserves for the request's next submission: its tokens so far
        plus what is left of its max_tokens, the same whichever submission it is."""
        return reserved_blocks(len(req.tokens), req.remaining, self._info.model.max_seq_len, self._info.block_size)

    def _submit(self, req: RequestState, llm: Any, role: str, **kw) -> None:
        req.stream = self._open(req, llm, role, **kw)

    def _take(self, rid: str, op: str) -> int:
        req = self._reqs[rid]
        tok = self.streams.next_token(req.stream, op, rid)
        req.generated.append(tok)
        return tok

    def _landed(self, kind: str, rid: str) -> bool:
        req = self._reqs[rid]
        if kind == "park":
            if isinstance(self.pool, HostCacheBooks) and self.streams.ended(req.stream):
                self.pool.mark_saved(rid)  # cancelled: its blocks are TensorRT-LLM's reusable cache now
            if req.complete or self._ran_to_the_end(req):
                # Every token is buffered, so no KV is needed; a save may never come (the request
                # ended before the order was seen), and one that does is dropped.
                self.pool.release(rid)
                req.complete = True
                return True
            state = self.pool.state(rid)
            if state.startswith("failed"):
                raise EngineError(f"move: parking {rid!r} in the host pool failed ({state[8:]}); its KV is gone")
            return state == "saved"
        if self.streams.ended(req.stream) and not self.streams.has_token(req.stream):
            self.streams.next_token(req.stream, "move", rid)  # raises the stream's end or error
        return self.streams.has_token(req.stream)

    def _ran_to_the_end(self, req: RequestState) -> bool:
        """TensorRT-LLM ended the request at its max_tokens (or max_seq_len) and every token it made
        is buffered. (An abort ends a stream early; the count tells the two apart.)"""
        waiting = self.streams.ended_with_all_tokens(req.stream)
        return waiting is not None and waiting >= req.remaining

    def _check_device(self, device: str, op: str) -> None:
        if device not in (self.device, self.helper_device):
            raise EngineError(f"{op}: unknown device {device!r}; this engine has "
                              f"{[d.name for d in self._info.devices]}")

    def _check_on(self, rid: str, tier: str, op: str) -> None:
        req = self._reqs.get(rid)
        if req is None:
            raise EngineError(f"{op}: unknown request id {rid!r}")
        if req.tier != tier:
            raise EngineError(f"{op}: request {rid!r} is in tier {req.tier!r}, not {tier!r}")

    def _bytes(self, ids: list[str]) -> int:
        return sum(self._info.blocks_for(len(self._reqs[r].tokens)) for r in ids) * self._info.bytes_per_block

"""The engine contract in virtual time: every call costs what the cost model says, nothing runs.

`SimEngine` keeps the same books as the torch engine (KV blocks per tier through the shared
`BlockAllocator`, a request's KV in exactly one tier or IN_FLIGHT during a move, blocks taken
all-or-nothing, the source released when a move lands, every block back on `free`) and the same
refusals (unknown or duplicate ids, decode of KV that is not on the decode device, a prompt
longer than max_seq_len). What differs is time: each call advances its `clock`, a VirtualClock,
instead of running a model, so the production orchestrator (`Orchestrator(engine, config,
clock=engine.clock)`) is measured at the paper's scale on a laptop (DESIGN.md §4, "sim").

Time, per resource, first come first served:
- each device computes one call at a time (`_busy`): a prefill, decode or mixed step on the
  decode device is synchronous (the clock moves to its end); a prefill started on another device
  (`start_prefill`, a disaggregated prefill GPU) runs while the caller goes on decoding, and its
  tokens are there once the clock reaches its end;
- each copy direction of each link is a FIFO (`LinkTimeline`): host -> device and device -> host
  on that device's PCIe link, device -> device on the source's NVLink egress and the
  destination's ingress together. A move starts when its links are free and lands at its end;
  `poll` compares with the clock, `wait` and `wait_any` move the clock there.

Tokens: every generated token is `SIM_TOKEN`, never an end-of-sequence id, so a request runs to
its max_tokens (the workload's output length) unless a stop word made of SIM_TOKEN stops it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from engines.base import (
    HOST, IN_FLIGHT, CallTiming, Capabilities, CapabilityError, DeviceInfo, Engine, EngineError, EngineInfo, ModelInfo,
    OutOfKVBlocks, PrefillChunk, PrefillHandle, PrefillRequest, StepResult, TransferHandle, check_move, check_new_prompts,
)
from engines.block_allocator import BlockAllocator
from engines.sim.clock import VirtualClock
from engines.sim.cost_model import CostModel, LinkTimeline
from engines.sim.step_cost import SimStepCost

SIM_TOKEN = 4
"""The token every sim step generates (any id that is not the model's EOS would do)."""
SIM_EOS = 2
"""The sim model's end-of-sequence id (OPT's </s>); never generated."""
DEFAULT_BLOCK_SIZE = 16
"""Tokens per KV block: vLLM's and TensorRT-LLM's default page size."""
DEFAULT_MEMORY_FRACTION = 0.9
"""Share of device memory the engine may use for weights and KV, as vLLM's
gpu_memory_utilization default (0.9); the rest is activations and the CUDA context."""


@dataclass(slots=True)
class _Seq:
    """One request's KV: its blocks per tier and its length."""

    prompt_len: int
    kv_len: int
    """Tokens of KV it holds (the prompt's prefix computed so far, then one more per decode)."""
    tables: dict[str, list[int]] = field(default_factory=dict)
    """Block ids per tier: one tier, or two while a move is under way."""
    ready_at: float = 0.0
    """Virtual time its KV is complete where it is (a prefill on another device ends then)."""


@dataclass(slots=True)
class _Move:
    handle: TransferHandle
    submitted: float
    end: float
    fail: bool = False
    """An injected copy failure: at its end the destination blocks go back, the KV stays put."""


@dataclass(slots=True)
class _Prefill:
    handle: PrefillHandle
    end: float
    result: StepResult


class SimEngine(Engine):
    """A virtual-time engine over a cost model (module docstring)."""

    def __init__(self, cost: CostModel, *, helper_devices: int = 0, kv_blocks: int = 0, host_kv_bytes: float = 0,
                 block_size: int = DEFAULT_BLOCK_SIZE, max_seq_len: int = 0, split_kv: bool = False,
                 memory_fraction: float = DEFAULT_MEMORY_FRACTION, clock: VirtualClock | None = None):
        """cost: the model on the hardware profile. helper_devices: GPUs beside the decode GPU
        ("cuda:0"), named "cuda:1".. (prefill / prefetch devices). kv_blocks: blocks per device,
        0 = what `memory_fraction` of device memory holds after the weights. host_kv_bytes: the
        host KV pool (0 = none, the engine cannot offload). max_seq_len: 0 = the model profile's
        trained context. split_kv: the decode attention kernel splits long KV whatever the cost
        model's dispatch (cost model). `describe().step_costs` holds one `SimStepCost`: the
        decode step as this engine times it."""
        model, hw = cost.model, cost.hardware
        self.cost = cost
        self.split_kv = split_kv
        self.clock = clock or VirtualClock()
        if block_size < 1:
            raise EngineError(f"block_size must be >= 1 token, got {block_size}")
        if helper_devices < 0:
            raise EngineError(f"helper_devices must be >= 0, got {helper_devices}")
        self.block_size = block_size
        self.bytes_per_block = model.kv_bytes_per_token * block_size
        if not kv_blocks:
            free = hw.hbm_bytes * memory_fraction - model.weight_bytes
            kv_blocks = int(free // self.bytes_per_block)
            if kv_blocks < 1:
                raise EngineError(f"{model.name} ({model.weight_bytes / 1e9:.1f} GB of weights) leaves no KV memory "
                                  f"in {memory_fraction:.0%} of a {hw.name}'s {hw.hbm_bytes / 1e9:.0f} GB")
        self.max_seq_len = max_seq_len or model.max_seq_len
        self.devices = tuple(f"cuda:{i}" for i in range(1 + helper_devices))
        self.decode_device = self.devices[0]
        host_blocks = int(host_kv_bytes // self.bytes_per_block)
        self._alloc = {d: BlockAllocator(kv_blocks, d) for d in self.devices}
        if host_blocks:
            self._alloc[HOST] = BlockAllocator(host_blocks, HOST)
        self._info = EngineInfo(
            backend="sim",
            model=ModelInfo(architecture=model.name, vocab_size=model.vocab, max_seq_len=self.max_seq_len,
                            num_layers=model.layers, num_kv_heads=model.kv_heads, head_dim=model.head_dim,
                            dtype="bfloat16" if model.bytes_per_param == 2 else f"{8 * model.bytes_per_param}-bit",
                            num_params=model.params, eos_token_ids=(SIM_EOS,)),
            devices=tuple(DeviceInfo(d, "cuda", kv_blocks) for d in self.devices),
            block_size=block_size, bytes_per_block=self.bytes_per_block, host_blocks=host_blocks,
            capabilities=Capabilities(can_offload=bool(host_blocks), can_peer_copy=len(self.devices) > 1,
                                      can_form_batches=True, can_chunk_prefill=True,
                                      can_overlap_prefill=len(self.devices) > 1),
            step_costs=(SimStepCost(cost, split_kv),),
        )
        self._seqs: dict[str, _Seq] = {}
        self._busy = {d: 0.0 for d in self.devices}
        """Virtual time each device finishes the compute queued on it."""
        self._links: dict[tuple[str, str], LinkTimeline] = {}
        self._moves: dict[int, _Move] = {}
        self._in_flight: dict[str, _Move] = {}
        self._prefills: dict[int, _Prefill] = {}
        self._prefilling: set[str] = set()
        """Requests whose prefill on another device has not ended yet."""
        self._fail_next_copy = False
        self.busy_seconds = {d: 0.0 for d in self.devices}
        """Compute seconds per device so far (utilisation = busy / elapsed)."""
        self.link_seconds: dict[str, float] = {}
        """Seconds each link direction carried bytes so far (key "pcie:h2d:cuda:1", ...)."""

    # ---- contract ---------------------------------------------------------------------------

    def describe(self) -> EngineInfo:
        return self._info

    def prefill(self, requests: Sequence[PrefillRequest], device: str | None = None) -> StepResult:
        on = self._device(device, "prefill")
        result, end = self._prefill_now(requests, on)
        self.clock.advance_to(end)
        return result

    def start_prefill(self, requests: Sequence[PrefillRequest], device: str) -> PrefillHandle:
        on = self._device(device, "start_prefill")
        result, end = self._prefill_now(requests, on)
        handle = PrefillHandle(tuple(r.request_id for r in requests), on)
        if on == self.decode_device or end <= self.clock():
            self.clock.advance_to(end)
            handle.result = result
            return handle
        for r in requests:
            self._seqs[r.request_id].ready_at = end
            self._prefilling.add(r.request_id)
        self._prefills[handle.id] = _Prefill(handle, end, result)
        return handle

    def prefill_result(self, handle: PrefillHandle) -> StepResult | None:
        p = self._prefills.get(handle.id)
        if p is not None and self.clock() >= p.end:
            del self._prefills[handle.id]
            self._prefilling.difference_update(handle.request_ids)
            handle.result = p.result
        return handle.result

    def decode(self, request_ids: Sequence[str]) -> StepResult:
        return self.mixed_step(request_ids, ())

    def mixed_step(self, request_ids: Sequence[str], chunks: Sequence[PrefillChunk]) -> StepResult:
        ids = list(request_ids)
        self._check_decodable(ids)
        new = [c.request for c in chunks if c.start == 0]
        self._check_new(new, "mixed_step")
        for c in chunks:
            s = self._seqs.get(c.request.request_id)
            if c.start and (s is None or s.kv_len != c.start or s.kv_len >= s.prompt_len):
                have = "no KV" if s is None else f"{s.kv_len} tokens of KV"
                raise EngineError(f"mixed_step: chunk [{c.start}, {c.end}) of {c.request.request_id!r} does not "
                                  f"continue its prompt: it holds {have}")
        if not ids and not chunks:
            return StepResult({}, CallTiming("decode", 0.0, 0, 0, 0, 0))
        # Blocks for every token this step writes, all-or-nothing.
        grow = [(i, self._seqs[i].kv_len + 1) for i in ids]
        grow += [(c.request.request_id, c.end) for c in chunks]
        needed = {rid: self._blocks_for(n) - len(self._table(rid)) for rid, n in grow}
        got = self._take(self.decode_device, needed, "mixed_step")
        for r in new:
            self._seqs[r.request_id] = _Seq(len(r.prompt_ids), 0, {self.decode_device: got.pop(r.request_id)})
        for rid, n in needed.items():
            if n and rid in got:
                self._seqs[rid].tables[self.decode_device] += got.pop(rid)
        kv = [self._seqs[i].kv_len + 1 for i in ids]
        spans = [(c.start, c.end) for c in chunks]
        seconds = self.cost.step_seconds(kv, spans, self.split_kv)
        self._run(self.decode_device, seconds)
        for i in ids:
            self._seqs[i].kv_len += 1
        tokens = dict.fromkeys(ids, SIM_TOKEN)
        for c in chunks:
            self._seqs[c.request.request_id].kv_len = c.end
            if c.last:
                tokens[c.request.request_id] = SIM_TOKEN
        op = "mixed" if chunks else "decode"
        kv_all = kv + [c.end for c in chunks]
        n_tokens = len(ids) + sum(e - s for s, e in spans)
        return StepResult(tokens, CallTiming(op, seconds, len(kv_all), n_tokens, sum(kv_all), max(kv_all)))

    def move(self, request_ids: Sequence[str], src: str, dst: str) -> TransferHandle:
        ids = list(request_ids)
        self._check_move(ids, src, dst)
        handle = TransferHandle(tuple(ids), src, dst)
        if not ids:
            return handle
        counts = {i: len(self._seqs[i].tables[src]) for i in ids}
        got = self._take(dst, counts, f"move {ids[:5]} from {src!r} to {dst!r}")
        for i in ids:
            self._seqs[i].tables[dst] = got[i]
        handle.bytes = sum(counts.values()) * self.bytes_per_block
        now = self.clock()
        ready = max(self._seqs[i].ready_at for i in ids)
        links = self._route(src, dst)
        start = max([now, ready] + [t.free_at for t in links])
        for t in links:  # the copy holds every link on its path until it ends
            t.free_at = start
            _, end = t.schedule(handle.bytes, start)
            self.link_seconds[t.name] = self.link_seconds.get(t.name, 0.0) + end - start
        move = _Move(handle, now, end, fail=self._fail_next_copy)
        self._fail_next_copy = False
        self._moves[handle.id] = move
        for i in ids:
            self._in_flight[i] = move
        return handle

    def poll(self, handle: TransferHandle) -> bool:
        move = self._moves.get(handle.id)
        if move is None:
            return True
        if self.clock() < move.end:
            return False
        self._land(move)
        return True

    def wait(self, handle: TransferHandle, timeout: float | None = None) -> None:
        # Virtual time: a move lands at its computed end, so it never outlasts a timeout.
        move = self._moves.get(handle.id)
        if move is not None:
            self.clock.advance_to(move.end)
            self._land(move)

    def wait_any(self, handles: Sequence[TransferHandle | PrefillHandle]) -> None:
        ends = []
        for h in handles:
            pending = self._prefills.get(h.id) if isinstance(h, PrefillHandle) else self._moves.get(h.id)
            if pending is None:
                return  # already finished
            ends.append(pending.end)
        if ends:
            self.clock.advance_to(min(ends))

    def free(self, request_ids: Sequence[str]) -> None:
        for rid in dict.fromkeys(request_ids):
            s = self._seqs.pop(rid, None)
            if s is None:
                continue
            for tier, blocks in s.tables.items():
                self._alloc[tier].free(blocks)
            self._in_flight.pop(rid, None)  # its move lands for the others; nothing of it is left
            self._prefilling.discard(rid)

    def tier_of(self, request_id: str) -> str:
        s = self._seqs.get(request_id)
        if s is None:
            raise EngineError(f"tier_of: unknown request id {request_id!r}")
        if request_id in self._in_flight:
            return IN_FLIGHT
        return next(iter(s.tables))

    def kv_blocks_used(self, tier: str) -> int:
        if tier not in self._alloc:
            if tier == HOST:
                return 0
            raise KeyError(f"unknown KV tier {tier!r}; known: {list(self._alloc)}")
        return self._alloc[tier].used

    def kv_len(self, request_id: str) -> int:
        return self._seqs[request_id].kv_len

    def inject_copy_fault(self, fault: str = "error", hang_s: float = 0.0) -> None:
        """Fault injection (engines/faults.py): the next move fails when it lands (the
        destination's blocks go back and the KV stays in the source), as a failed copy does in the
        torch engine. "hang" is refused: in virtual time a move ends when its bytes have crossed."""
        if fault != "error":
            raise CapabilityError(f"the sim engine cannot inject a copy {fault!r} (virtual time: moves do not hang)")
        self._fail_next_copy = True

    def close(self) -> None:
        self._seqs.clear()
        self._moves.clear()
        self._in_flight.clear()
        self._prefills.clear()

    # ---- internals --------------------------------------------------------------------------

    def _device(self, device: str | None, op: str) -> str:
        on = self.decode_device if device is None else device
        if on not in self._busy:
            raise EngineError(f"{op} on device {device!r}: this engine computes on {list(self.devices)}")
        return on

    def _prefill_now(self, requests: Sequence[PrefillRequest], on: str) -> tuple[StepResult, float]:
        """Book the prompts' blocks on `on` and queue their compute; (tokens and timing, end)."""
        self._check_new(requests, "prefill")
        if not requests:
            return StepResult({}, CallTiming("prefill", 0.0, 0, 0, 0, 0)), self.clock()
        lens = [len(r.prompt_ids) for r in requests]
        got = self._take(on, {r.request_id: self._blocks_for(n) for r, n in zip(requests, lens)}, "prefill")
        for r, n in zip(requests, lens):
            self._seqs[r.request_id] = _Seq(n, n, {on: got[r.request_id]})
        seconds = self.cost.prefill_seconds(lens)
        end = self._queue(on, seconds)
        ids = [r.request_id for r in requests]
        timing = CallTiming("prefill", seconds, len(ids), sum(lens), sum(lens), max(lens))
        return StepResult(dict.fromkeys(ids, SIM_TOKEN), timing), end

    def _queue(self, device: str, seconds: float) -> float:
        start = max(self.clock(), self._busy[device])
        self._busy[device] = end = start + seconds
        self.busy_seconds[device] += seconds
        return end

    def _run(self, device: str, seconds: float) -> None:
        self.clock.advance_to(self._queue(device, seconds))

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _table(self, rid: str) -> list[int]:
        s = self._seqs.get(rid)
        return s.tables[self.decode_device] if s is not None else []

    def _take(self, tier: str, counts: dict[str, int], what: str) -> dict[str, list[int]]:
        """Allocate counts[rid] blocks in `tier` for each request, all or none; the block ids by
        request (requests needing none are left out)."""
        alloc = self._alloc[tier]
        total = sum(counts.values())
        if total > alloc.num_free:
            raise OutOfKVBlocks(f"{what}: KV pool {tier!r} is out of blocks: {total} needed, "
                                f"{alloc.num_free} of {alloc.num_blocks} free")
        return {rid: alloc.allocate(n) for rid, n in counts.items() if n}

    def _check_new(self, requests: Sequence[PrefillRequest], op: str) -> None:
        check_new_prompts(requests, self._seqs, self.max_seq_len, self._info.model.vocab_size, op)

    def _check_decodable(self, ids: list[str]) -> None:
        if len(set(ids)) != len(ids):
            raise EngineError(f"decode: request ids appear more than once: {sorted({i for i in ids if ids.count(i) > 1})}")
        for i in ids:
            s = self._seqs.get(i)
            if s is None:
                raise EngineError(f"decode: unknown request id {i!r}; prefill it first (or it was freed)")
            where = self.tier_of(i)
            if where != self.decode_device:
                raise EngineError(f"decode: KV must be on {self.decode_device!r} to decode, but {i!r} is "
                                  + (f"{IN_FLIGHT} (wait on its move)" if where == IN_FLIGHT else f"in {where!r}"))
            if s.kv_len < s.prompt_len:
                raise EngineError(f"decode: {i!r} has {s.kv_len} of its {s.prompt_len} prompt tokens prefilled; "
                                  "send the rest of its prompt first")
            if s.kv_len + 1 > self.max_seq_len:
                raise EngineError(f"decode: {i!r} already holds max_seq_len={self.max_seq_len} tokens of KV")

    def _check_move(self, ids: list[str], src: str, dst: str) -> None:
        check_move(ids, src, dst, self._alloc, lambda i: self.tier_of(i) if i in self._seqs else None)

    def _route(self, src: str, dst: str) -> list[LinkTimeline]:
        """The link directions a copy from src to dst holds."""
        if src == HOST:
            return [self._link("pcie", "h2d", dst)]
        if dst == HOST:
            return [self._link("pcie", "d2h", src)]
        return [self._link("nvlink", "out", src), self._link("nvlink", "in", dst)]

    def _link(self, kind: str, direction: str, device: str) -> LinkTimeline:
        key = (f"{kind}:{direction}", device)
        t = self._links.get(key)
        if t is None:
            t = self._links[key] = LinkTimeline(*self.cost.link(kind), name=f"{kind}:{direction}:{device}")
        return t

    def _land(self, move: _Move) -> None:
        """The move's end has come: release the source's blocks (or, for a failed copy, the
        destination's) of the requests still alive."""
        handle = move.handle
        del self._moves[handle.id]
        alive = [i for i in handle.request_ids if self._in_flight.get(i) is move]
        for i in alive:
            del self._in_flight[i]
            s = self._seqs[i]
            gone = handle.dst if move.fail else handle.src
            self._alloc[gone].free(s.tables.pop(gone))
        if move.fail:
            raise EngineError(f"move {list(handle.request_ids)[:5]} from {handle.src!r} to {handle.dst!r} failed; "
                              f"the KV stays in {handle.src!r}: injected copy failure")
        handle.seconds = move.end - move.submitted

"""What the KV Cache Connector decides (scheduler side) and copies (worker side).

Kept apart from TensorRT-LLM's base classes (`connector_classes` subclasses them lazily) so this
logic imports and tests without the package. Decide/execute as in vLLM's connectors: the
planner never touches a tensor, the mover never decides.

The planner works in whole blocks: a resumed request loads the full blocks of its saved KV and
recomputes the partial last block (and always its last token, which TensorRT-LLM must compute
to produce the next one).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engines.tensorrt_llm.host_pool import HostKvPool


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """Copy device blocks to host slots (save) or host slots to device blocks (load)."""

    request_id: str
    """The orchestrator's request id."""
    trt_request_id: int
    device_blocks: tuple[int, ...]
    host_slots: tuple[int, ...]


@dataclass(slots=True)
class ConnectorPlan:
    """The metadata one executor iteration hands from the planner to the movers."""

    saves: list[BlockCopy] = field(default_factory=list)
    loads: list[BlockCopy] = field(default_factory=list)


class HostPoolPlanner:
    """Scheduler side: which requests save into and load from the host pool, and which blocks."""

    def __init__(self, pool: HostKvPool):
        self.pool = pool
        self._pending = ConnectorPlan()
        self._loading: dict[int, tuple[str, tuple[int, ...]]] = {}  # trt id -> (rid, host slots to load)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens of a newly admitted request whose KV comes from the host pool (loaded
        synchronously before its first forward, hence False)."""
        tokens = list(request.get_tokens(0))
        entry = self.pool.match_resume(tokens)
        if entry is None:
            return 0, False
        usable = min(len(entry.kv_tokens), len(tokens) - 1)
        blocks = usable // self.pool.block_size
        matched = blocks * self.pool.block_size - num_computed_tokens
        if matched <= 0:  # nothing beyond what the device already has: recompute, free the copy
            self.pool.loaded(entry.request_id)
            return 0, False
        self._loading[request.request_id] = (entry.request_id, tuple(entry.slots[:blocks]))
        return matched, False

    def update_state_after_alloc(self, request, block_ids) -> None:
        """The device blocks allocated to a request we matched: plan the load into them."""
        load = self._loading.pop(request.request_id, None)
        if load is None:
            return
        rid, slots = load
        self._pending.loads.append(BlockCopy(rid, request.request_id, tuple(block_ids[:len(slots)]), slots))

    def request_finished(self, request, cache_block_ids) -> bool:
        """A request ended in TensorRT-LLM. If the engine parked it, plan saving its KV and return
        True, so TensorRT-LLM keeps the blocks until the save is reported done."""
        self._loading.pop(request.request_id, None)
        entry = self.pool.claim_park(list(request.get_tokens(0)))
        if entry is None:
            return False  # finished normally, or the pool is full (pool.state says so)
        if len(entry.slots) > len(cache_block_ids):
            self.pool.fail(entry.request_id, f"TensorRT-LLM reported {len(cache_block_ids)} blocks for "
                                             f"{len(entry.kv_tokens)} tokens")
            return False
        blocks = tuple(cache_block_ids[:len(entry.slots)])
        self._pending.saves.append(BlockCopy(entry.request_id, request.request_id, blocks, tuple(entry.slots)))
        return True

    def build_connector_meta(self, scheduler_output=None) -> ConnectorPlan:
        """Hand the planned copies to the workers (once each)."""
        plan, self._pending = self._pending, ConnectorPlan()
        return plan


class HostPoolMover:
    """Worker side: copies blocks between the device KV pool tensor and host memory.

    Assumes the registered tensor indexes blocks on its first dimension (the layout of the
    PyTorch backend's primary pool) and copies whole blocks, all layers at once, before the
    forward (loads) and after it (saves): no per-layer overlap yet (docs/tensorrt-llm.md)."""

    def __init__(self, pool: HostKvPool):
        self.pool = pool
        self.device_kv = None
        self.host_kv = None
        self._saved: set[int] = set()  # trt ids whose saves are done, not yet reported

    def register_kv_caches(self, kv_cache_tensor) -> None:
        import torch  # the worker runs inside TensorRT-LLM's process, which has torch

        self.device_kv = kv_cache_tensor
        pin = kv_cache_tensor.is_cuda
        self.host_kv = torch.empty((self.pool.blocks, *kv_cache_tensor.shape[1:]), dtype=kv_cache_tensor.dtype,
                                   device="cpu", pin_memory=pin)

    def load(self, plan: ConnectorPlan | None) -> None:
        for c in (plan.loads if plan else ()):
            self.device_kv[list(c.device_blocks)] = self.host_kv[list(c.host_slots)].to(self.device_kv.device)
            self.pool.loaded(c.request_id)

    def save(self, plan: ConnectorPlan | None) -> None:
        for c in (plan.saves if plan else ()):
            self.host_kv[list(c.host_slots)] = self.device_kv[list(c.device_blocks)].to("cpu")
            self.pool.mark_saved(c.request_id)
            self._saved.add(c.trt_request_id)

    def finished(self, finished_gen_req_ids, started_loading_req_ids) -> tuple[list[int], list[int]]:
        """Saves that are done among the requests TensorRT-LLM is waiting on; loads are synchronous."""
        done = [i for i in finished_gen_req_ids if i in self._saved]
        self._saved.difference_update(done)
        return done, list(started_loading_req_ids)

"""The KV Cache Connector classes TensorRT-LLM instantiates, built on first use.

`KvCacheConnectorConfig(connector_module="engines.tensorrt_llm.connector_classes",
connector_scheduler_class="HostPoolConnectorScheduler", connector_worker_class="HostPoolConnectorWorker")`
makes TensorRT-LLM import this module and read those two names. They must subclass its base
classes, and importing those imports TensorRT-LLM, so the classes are made by the module's
`__getattr__` (PEP 562) on that first read: importing this module alone imports nothing.
"""
from __future__ import annotations

from engines.tensorrt_llm import lazy_import
from engines.tensorrt_llm.host_pool import bound
from engines.tensorrt_llm.kv_connector import HostPoolMover, HostPoolPlanner

SCHEDULER_CLASS = "HostPoolConnectorScheduler"
WORKER_CLASS = "HostPoolConnectorWorker"
CONNECTOR_BASES = ("tensorrt_llm._torch.pyexecutor.kv_cache_connector",
                   "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector")
"""Where the base classes live: 1.x (through at least 1.3.0rc11), then `main` (2026)."""

_made: dict[str, type] = {}


def _base_module():
    """The first of CONNECTOR_BASES that imports; the last one's error if none does."""
    for name in CONNECTOR_BASES:
        try:
            return lazy_import.module(name, "the AlignedServe KV connector")
        except lazy_import.TensorRTLLMUnavailable as e:
            missing = e
    raise missing


def _make() -> None:
    base = _base_module()

    class HostPoolConnectorScheduler(base.KvCacheConnectorScheduler):
        """Scheduler side: delegates every decision to `HostPoolPlanner` over the bound host pool."""

        def __init__(self, llm_args):
            super().__init__(llm_args)
            self.planner = HostPoolPlanner(bound())

        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            return self.planner.get_num_new_matched_tokens(request, num_computed_tokens)

        def update_state_after_alloc(self, request, block_ids):
            self.planner.update_state_after_alloc(request, block_ids)

        def request_finished(self, request, cache_block_ids):
            return self.planner.request_finished(request, cache_block_ids)

        def build_connector_meta(self, scheduler_output):
            return self.planner.build_connector_meta(scheduler_output)

    class HostPoolConnectorWorker(base.KvCacheConnectorWorker):
        """Worker side: loads before the forward, saves after it, through `HostPoolMover`."""

        def __init__(self, llm_args):
            super().__init__(llm_args)
            self.mover = HostPoolMover(bound())

        def register_kv_caches(self, kv_cache_tensor):
            self.mover.register_kv_caches(kv_cache_tensor)

        def start_load_kv(self, stream):
            self.mover.load(self.get_connector_meta())

        def wait_for_layer_load(self, layer_idx, stream):
            pass  # loads finish in start_load_kv, before the first layer

        def save_kv_layer(self, layer_idx, stream):
            pass  # saves run whole-block in wait_for_save

        def wait_for_save(self, stream):
            self.mover.save(self.get_connector_meta())

        def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
            return self.mover.finished(finished_gen_req_ids, started_loading_req_ids)

    _made.update({SCHEDULER_CLASS: HostPoolConnectorScheduler, WORKER_CLASS: HostPoolConnectorWorker})


def __getattr__(name: str) -> type:
    if name in (SCHEDULER_CLASS, WORKER_CLASS):
        if name not in _made:
            _make()
        return _made[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def reset() -> None:
    """Forget the made classes (tests install a different fake TensorRT-LLM each time)."""
    _made.clear()

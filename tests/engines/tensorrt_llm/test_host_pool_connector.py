"""The LLM-API flavour's host KV pool through the KV Cache Connector: what the connector saves and loads.
(Parking and resuming on both flavours: test_parking.py.)"""
from __future__ import annotations

from engines.base import HOST, PrefillRequest
from engines.tensorrt_llm import host_pool
from engines.tensorrt_llm.host_pool import HostKvPool
from engines.tensorrt_llm.kv_connector import HostPoolPlanner


def test_resume_really_loads_the_saved_kv(make_engine, trtllm):
    """Corrupt the host copy: the resumed request's tokens change, so they came from the load."""
    e = make_engine(host_blocks=32)
    prompt = list(range(20, 32))
    e.prefill([PrefillRequest("a", prompt)])
    e.decode(["a"])
    e.wait(e.move(["a"], "cuda:0", HOST))
    worker_kv = e.llm.worker.mover.host_kv
    worker_kv += 7  # every saved value now wrong
    e.wait(e.move(["a"], HOST, "cuda:0"))
    nxt = e.decode(["a"]).tokens["a"]
    assert nxt != trtllm.reference_tokens(prompt, 3)[2]


def test_planner_matches_whole_blocks_only():
    pool = HostKvPool(8, 4)
    planner = HostPoolPlanner(pool)

    class Req:
        def __init__(self, rid, tokens):
            self.request_id, self._t = rid, tokens

        def get_tokens(self, beam):
            return list(self._t)

    pool.order_park("a", (1, 2, 3))
    assert planner.request_finished(Req(7, list(range(1, 12))), list(range(10))) is True
    assert pool.used() == 3  # 10 tokens with KV -> 3 blocks
    plan = planner.build_connector_meta()
    assert [c.device_blocks for c in plan.saves] == [(0, 1, 2)] and planner.build_connector_meta().saves == []
    pool.mark_saved("a")
    pool.order_resume("a", tuple(range(1, 12)))
    matched, asynchronous = planner.get_num_new_matched_tokens(Req(9, list(range(1, 12))), 0)
    assert (matched, asynchronous) == (8, False)  # 2 full blocks; the partial one is recomputed
    planner.update_state_after_alloc(Req(9, []), [5, 6, 7])
    assert [(c.host_slots, c.device_blocks) for c in planner.build_connector_meta().loads] == [
        (tuple(pool._entries["a"].slots[:2]), (5, 6))]
    pool.loaded("a")
    assert pool.used() == 0


def test_a_request_that_just_finishes_is_not_saved():
    pool = HostKvPool(8, 4)
    planner = HostPoolPlanner(pool)

    class Req:
        request_id = 3

        def get_tokens(self, beam):
            return [1, 2, 3]

    assert planner.request_finished(Req(), [0]) is False and pool.used() == 0


def test_park_and_resume_go_through_the_connector(make_engine, trtllm):
    e = make_engine(host_blocks=32)
    prompt = list(range(3, 14))
    e.prefill([PrefillRequest("a", prompt)])
    e.wait(e.move(["a"], "cuda:0", HOST))
    e.wait(e.move(["a"], HOST, "cuda:0"))
    assert e.decode(["a"]).tokens["a"] == trtllm.reference_tokens(prompt, 2)[1]
    calls = e.llm.connector_calls
    assert "request_finished" in calls and "get_num_new_matched_tokens" in calls and "get_finished" in calls


def test_connector_bases_are_found_where_main_moved_them(trtllm, monkeypatch):
    """1.x keeps the base classes in pyexecutor.kv_cache_connector; main (2026) in pyexecutor.connectors."""
    import sys

    from engines.tensorrt_llm import connector_classes

    old, new = connector_classes.CONNECTOR_BASES
    monkeypatch.setitem(sys.modules, new, sys.modules[old])
    monkeypatch.setitem(sys.modules, old, None)  # gone on main
    connector_classes.reset()
    host_pool.bind(HostKvPool(4, 4))
    cls = connector_classes.HostPoolConnectorScheduler
    assert issubclass(cls, sys.modules[new].KvCacheConnectorScheduler)

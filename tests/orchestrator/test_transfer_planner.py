"""The transfer planner's link model against hand-computed cases."""
from __future__ import annotations

import pytest

from engines.base import HOST, Capabilities, DeviceInfo, EngineInfo, ModelInfo
from orchestrator.transfer_planner import NVLINK4, PCIE5_X16, Link, TransferPlanner

MODEL = ModelInfo("LlamaForCausalLM", 1000, 4096, 2, 2, 64, "bfloat16", 1)
GB = 1e9


def info(devices: int, peer: bool) -> EngineInfo:
    return EngineInfo("test", MODEL, tuple(DeviceInfo(f"cuda:{i}", "cuda", 100) for i in range(devices)),
                      16, 4096, host_blocks=1000, capabilities=Capabilities(can_offload=True, can_peer_copy=peer))


def test_one_device_always_loads_directly():
    route = TransferPlanner(info(1, peer=False)).route(10 * GB, {"cuda:0": 100 * GB})
    assert route.hops == ((HOST, "cuda:0"),) and route.via is None
    # 110 GB queued+new over 55 GB/s, plus 10 us.
    assert route.seconds == pytest.approx(110 / 55 + 10e-6)


def test_without_peer_copies_a_second_device_is_not_used():
    assert TransferPlanner(info(2, peer=False)).route(GB, {"cuda:0": 100 * GB}).via is None


def test_idle_decode_link_loads_directly():
    # Direct: 1 GB / 55 GB/s = 18.2 ms. Via helper: the same PCIe time plus 1 GB over NVLink.
    route = TransferPlanner(info(2, peer=True)).route(GB)
    assert route.via is None
    assert route.seconds == pytest.approx(PCIE5_X16.seconds(GB))


def test_busy_decode_link_routes_through_the_idle_helper():
    # 2 GB of spilled KV queued on cuda:0's PCIe: direct = 3 GB / 55 GB/s = 54.5 ms;
    # via cuda:1 = 1 GB / 55 GB/s + 1 GB / 450 GB/s = 18.2 + 2.2 ms.
    route = TransferPlanner(info(2, peer=True)).route(GB, {"cuda:0": 2 * GB})
    assert route.hops == ((HOST, "cuda:1"), ("cuda:1", "cuda:0")) and route.via == "cuda:1"
    assert route.seconds == pytest.approx(PCIE5_X16.seconds(GB) + NVLINK4.seconds(GB))


def test_the_least_busy_helper_is_chosen():
    route = TransferPlanner(info(3, peer=True)).route(GB, {"cuda:0": 5 * GB, "cuda:1": 3 * GB, "cuda:2": 0.5 * GB})
    assert route.via == "cuda:2"


def test_a_slow_peer_link_keeps_loads_direct():
    # A peer link slower than PCIe (e.g. peer copies bounced through host memory) never wins
    # unless the decode link is far busier.
    slow = Link(bandwidth=10e9, latency=20e-6)
    planner = TransferPlanner(info(2, peer=True), peer_link=slow)
    assert planner.route(GB, {"cuda:0": 0.1 * GB}).via is None
    assert planner.route(GB, {"cuda:0": 2 * GB}).via is None  # 54.5 ms direct vs 118 ms via
    assert planner.route(GB, {"cuda:0": 10 * GB}).via == "cuda:1"  # 200 ms direct


def test_direct_mode_never_uses_a_helper():
    planner = TransferPlanner(info(2, peer=True), mode="direct")
    assert planner.route(GB, {"cuda:0": 100 * GB}).via is None


def test_helper_mode_uses_the_least_busy_helper_even_when_direct_is_faster():
    planner = TransferPlanner(info(3, peer=True), mode="helper")
    route = planner.route(GB, {"cuda:1": 2 * GB})
    assert route.via == "cuda:2"
    assert route.seconds == pytest.approx(PCIE5_X16.seconds(GB) + NVLINK4.seconds(GB))


def test_helper_mode_without_helpers_is_direct():
    assert TransferPlanner(info(1, peer=False), mode="helper").route(GB).via is None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="route mode 'sideways'"):
        TransferPlanner(info(2, peer=True), mode="sideways")

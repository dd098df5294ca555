"""Which way a batch's KV travels from the host pool to the decode device.

Direct: host -> decode device over the decode device's PCIe link. GPU-Prefetch-For-GPU
(DESIGN.md §1.4): host -> helper device over the helper's PCIe link, then helper -> decode
device over the peer link (NVLink), which is an order of magnitude faster. The helper route
pays off when the decode device's own PCIe link is busy (spilled requests going to the host use
it too) and the helper's is free. The planner estimates both from a link model (bandwidth,
latency, bytes already queued on each link) and picks the earlier finish.

With one device (or an engine without peer copies) every route is direct. The `mode` forces a
route for ablations and for links the model gets wrong: "direct" (no peer prefetch) or "helper"
(always through the least busy helper).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from engines.base import HOST, EngineInfo


@dataclass(frozen=True, slots=True)
class Link:
    """A copy path: sustained bytes per second one way, and the fixed cost per transfer."""

    bandwidth: float
    latency: float

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


ROUTE_MODES = ("auto", "direct", "helper")

PCIE5_X16 = Link(bandwidth=55e9, latency=10e-6)
"""PCIe 5.0 x16: 64 GB/s per direction raw (PCI-SIG), ~55 GB/s sustained for pinned copies."""
NVLINK4 = Link(bandwidth=450e9, latency=5e-6)
"""NVLink 4 on H100/H200 SXM: 900 GB/s bidirectional, 450 GB/s one way (NVIDIA datasheet)."""


@dataclass(frozen=True, slots=True)
class Route:
    """The hops of one transfer, in order, and its estimated finish time (seconds from now)."""

    hops: tuple[tuple[str, str], ...]
    seconds: float

    @property
    def via(self) -> str | None:
        """The helper device, or None for a direct copy."""
        return self.hops[0][1] if len(self.hops) > 1 else None


class TransferPlanner:
    """Routes host -> decode-device loads directly or through a helper device."""

    def __init__(self, info: EngineInfo, host_link: Link = PCIE5_X16, peer_link: Link = NVLINK4,
                 mode: str = "auto"):
        if mode not in ROUTE_MODES:
            raise ValueError(f"route mode {mode!r} is not one of {', '.join(ROUTE_MODES)}")
        self.mode = mode
        self.host_link = host_link
        self.peer_link = peer_link
        self.decode_device = info.decode_device
        peers = info.capabilities.can_peer_copy and len(info.devices) > 1
        self.helpers = tuple(d.name for d in info.devices[1:]) if peers else ()

    def route(self, nbytes: int, queued: Mapping[str, float] | None = None) -> Route:
        """Where to send `nbytes` of KV from the host to the decode device. `queued[device]`:
        bytes already waiting on that device's PCIe link (either direction)."""
        queued = queued or {}
        direct = Route(((HOST, self.decode_device),),
                       self.host_link.seconds(queued.get(self.decode_device, 0.0) + nbytes))
        if self.mode == "direct" or not self.helpers:
            return direct
        via = [Route(((HOST, h), (h, self.decode_device)),
                     self.host_link.seconds(queued.get(h, 0.0) + nbytes) + self.peer_link.seconds(nbytes))
               for h in self.helpers]
        best = min(via, key=lambda r: r.seconds)
        return best if self.mode == "helper" or best.seconds < direct.seconds else direct

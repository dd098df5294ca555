"""Where the torch engine computes: device names resolved to KV tiers, and on each tier a model
replica and a paged KV cache.

A tier is a name the orchestrator moves KV between ("cpu", "cpu:1", "cuda:0"); several tiers may
sit on one torch device (the CPU tiers do), and they then share one model replica.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from engines.base import EngineError
from engines.torch.kv_cache import PagedKVCache
from engines.torch.model_config import ModelConfig
from engines.torch.models.base import Architecture
from engines.torch.models.layers import CausalLM


@dataclass(slots=True)
class ComputeDevice:
    """One device the engine computes on: its tier name, model replica and KV cache."""

    tier: str
    device: torch.device
    model: CausalLM
    """Shared by every tier on the same torch device (the CPU tiers share one)."""
    cache: PagedKVCache


def resolve_tier(spec: str) -> tuple[str, torch.device]:
    """A device name -> (tier name, the torch device it computes on).

    "auto": cuda:0 when CUDA is available, else cpu. "cuda" / "cuda:N": that GPU, tier "cuda:N".
    "cpu": the CPU. "cpu:N" (N > 0): a further tier on the same CPU with a KV pool of its own,
    so two pools can run on a machine without a GPU; "cpu:0" is "cpu".
    """
    if spec == "auto":
        spec = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(spec)
    except (RuntimeError, TypeError):
        raise EngineError(f"device {spec!r} is not a device name; use 'auto', 'cpu', 'cpu:N' or 'cuda:N'") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {spec!r} requested but CUDA is not available; use device='cpu' or 'auto'")
        index = d.index or 0
        if index >= torch.cuda.device_count():
            raise EngineError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return f"cuda:{index}", torch.device("cuda", index)
    if d.type == "cpu":
        return ("cpu" if not d.index else f"cpu:{d.index}"), torch.device("cpu")
    raise EngineError(f"device {spec!r} is not supported; use 'auto', 'cpu', 'cpu:N' or 'cuda:N'")


def resolve_tiers(device: str, helper_devices: Sequence[str]) -> dict[str, torch.device]:
    """Tier name -> torch device of the decode device and then each helper, each named once."""
    if isinstance(helper_devices, str):
        raise EngineError(f"helper_devices must be a sequence of device names, e.g. ({helper_devices!r},), "
                          "not a single string")
    tiers: dict[str, torch.device] = {}
    named: dict[str, str] = {}
    for spec in (device, *helper_devices):
        tier, torch_device = resolve_tier(spec)
        if tier in tiers:
            raise EngineError(
                f"device {spec!r} is tier {tier!r}, which {named[tier]!r} already names "
                f"(device={device!r}, helper_devices={tuple(helper_devices)!r}); name each device once"
            )
        tiers[tier], named[tier] = torch_device, spec
    return tiers


def place_devices(architecture: Architecture, cfg: ModelConfig, weights: dict[str, torch.Tensor],
                  tiers: dict[str, torch.device], dtype: torch.dtype, block_size: int,
                  kv_blocks: int) -> dict[str, ComputeDevice]:
    """A model replica and a KV cache for every tier, in `tiers` order; tiers on one torch device
    share a replica. Takes `weights` over: the replica on their own device is built from them in
    place (CausalLM.from_weights), after the other devices' replicas have copied them."""
    home = next(iter(weights.values())).device
    models: dict[torch.device, CausalLM] = {}
    for torch_device in dict.fromkeys(tiers.values()):
        if torch_device != home:  # copied from the loaded set, not read from disk again
            models[torch_device] = architecture.build(cfg, {n: t.to(torch_device) for n, t in weights.items()})
    models[home] = architecture.build(cfg, weights)
    devices: dict[str, ComputeDevice] = {}
    for tier, torch_device in tiers.items():
        cache = PagedKVCache(
            num_layers=cfg.num_layers, num_blocks=kv_blocks, block_size=block_size, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, dtype=dtype, device=torch_device, tier=tier,
        )
        devices[tier] = ComputeDevice(tier, torch_device, models[torch_device], cache)
    return devices

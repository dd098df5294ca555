"""How long a prefill, a decode step or a KV transfer takes on a hardware profile: the sim engine's clock.

Notation: W = weight bytes, P = parameters, BW = HBM bandwidth, F = dense FLOP/s, S = SMs,
l = layers, H = KV heads, Hq = query heads, d = head_dim, b = bytes per element. The e_* and o_*
are the free constants (`CostConstants`), fitted by `engines.sim.calibration`.

Prefill of prompts n_1..n_B (one call):

    FLOPs   = 2 P Σn_i  +  4 l Hq d Σ n_i (n_i + 1) / 2        linear layers + causal QK^T and PV
    t       = o_prefill + max(W / (BW e_w),  FLOPs / (F e_f))

The weight read is a floor: a short prompt cannot finish before the weights have streamed in.

Decode step over KV lengths L_1..L_B (each including the token fed this step):

    t       = o_decode + max(W / (BW e_w),  2 P B / (F e_f))  +  t_attn

The first term is the roofline of the linear layers (weight-bound at small B, compute-bound at
large B). t_attn models the decode attention kernel as it runs on a GPU: one unit of work per
(sequence, KV head), each reading its sequence's K and V of one head, 2 d b bytes per token per
layer, and the kernel's *dispatch model* says how the units reach the S SMs
(engines/sim/dispatch.py has the arithmetic of each):

    t_attn  = l * t_layer(L_1..L_B)

- `waves` (the default of a bare `CostModel`, e.g. vLLM's paged_attention v1): units in launch
  order, the heads of a sequence together, dealt in waves of S; every SM reads at BW e_kv / S and
  a wave lasts as long as its longest unit. Without split-KV one long sequence makes its H units
  long, and the wave holding them keeps the other S - H SMs idle until it ends: the
  iteration-level bubble alignment removes. Order-sensitive: the same long requests cost more
  spread through the batch than placed last.
- `longest-first`: the same waves with the batch sorted longest first; never above `waves`.
- `greedy` (FlashAttention-2 varlen; the default of `bench.simulate` on the H100 profile): list
  scheduling, each unit starting when a slot frees, at most r bytes/s per unit, BW e shared;
  its constants fitted on an H100 (`dispatch.KERNELS`). Nearly order-insensitive, as measured.
- `split` (FlashDecoding, FlashInfer, TensorRT-LLM XQA multi-block; vLLM's paged_attention_v2):
  every sequence cut into chunks of `split_kv_chunk_tokens`, each (chunk, head) a unit: the waves
  are balanced and t_attn ~ l Σ L_i H 2 d b / (BW e_kv) = Σ L_i * kv_bytes_per_token / (BW e_kv),
  the KV term of DESIGN.md §6's roofline, give or take one wave of chunks and each sequence's
  last, shorter chunk (it costs a whole one where it shares a wave with full ones). Roofline, not
  measured.

`split_kv=True` on a call forces `split` whatever the model's dispatch (the sim engine's
`split_kv`). `waves`, `longest-first` and `split` read at e_kv (`CostConstants`); `greedy` carries
its own fitted e and r. A batch of equal lengths costs the same under every dispatch, give or
take one wave, when the constants agree. Left out as small next to these terms: attention FLOPs
in decode (2 FLOPs per KV byte, far under the ridge point), KV writes, split-KV's reduction
pass, sampling, and the kernel's launch (a fixed cost per step: o_decode).

A mixed step (chunked prefill: SplitFuse, Sarathi) runs decode tokens and prompt chunks
[s_j, e_j) through one forward, so the linear layers see every token of both at once:

    t       = max(o_prefill, o_decode) + max(W / (BW e_w),  2 P (B + Σ(e_j - s_j)) / (F e_f))
              + t_attn(L)  +  4 l Hq d Σ_j Σ_{p=s_j}^{e_j - 1} (p + 1) / (F e_f)

the chunk's attention FLOPs counted over its causal (query, key) pairs, keys of earlier chunks
included. With no decode tokens and chunks from 0 it is `prefill_seconds` (overheads aside).

Transfers: `transfer_seconds(n, link) = latency + n / (bandwidth e_link)` on the link's profile
numbers; `LinkTimeline` serves the transfers on one link direction first in, first out.

The default `CostConstants` (efficiencies 1, overheads 0) give the plain roofline: the fastest the
hardware allows, a lower bound on every real call. Absolute times need a fitted profile
(bench/profiles/*.json, `engines.sim.calibration`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from engines.sim.dispatch import SPLIT_KV_CHUNK_TOKENS, Dispatch, kernel_for, wave_sum
from engines.sim.profiles import HardwareProfile, ModelProfile

__all__ = ["CostConstants", "CostModel", "LinkTimeline", "LINKS", "SPLIT_KV_CHUNK_TOKENS", "wave_sum"]
LINKS = ("pcie", "nvlink")
"""Link names: "pcie" host<->device, "nvlink" device<->device."""


@dataclass(frozen=True, slots=True)
class CostConstants:
    """The cost model's free constants. Defaults are the roofline (every efficiency 1, no
    overhead): a bound, not a guess; fitted values come from `engines.sim.calibration`, never
    from tuning toward a result."""

    flops_efficiency: float = 1.0
    """e_f: fraction of dense peak FLOP/s the matmuls reach (prefill, and decode at large B)."""
    weight_bandwidth_efficiency: float = 1.0
    """e_w: fraction of HBM bandwidth reached while streaming the weights."""
    kv_bandwidth_efficiency: float = 1.0
    """e_kv: fraction of each SM's share of HBM bandwidth the decode attention kernel reaches
    (dispatch models waves, longest-first and split; a `greedy` kernel carries its own)."""
    prefill_overhead_s: float = 0.0
    """o_prefill: fixed seconds per prefill call (launches, scheduling, sampling)."""
    decode_overhead_s: float = 0.0
    """o_decode: fixed seconds per decode step (launches, scheduling, sampling)."""
    pcie_efficiency: float = 1.0
    """Fraction of the PCIe datasheet bandwidth a KV copy reaches (not fitted yet: no GPU timings)."""
    nvlink_efficiency: float = 1.0
    """Fraction of the NVLink datasheet bandwidth a KV copy reaches (not fitted yet)."""
    split_kv_chunk_tokens: int = SPLIT_KV_CHUNK_TOKENS
    """KV tokens per split-KV work unit (a kernel's choice, not fitted)."""
    source: str = "roofline defaults (efficiency 1, overhead 0); not fitted"
    """Where these values come from: "roofline defaults" or the calibration that fitted them."""

    def __post_init__(self) -> None:
        for f in ("flops_efficiency", "weight_bandwidth_efficiency", "kv_bandwidth_efficiency",
                  "pcie_efficiency", "nvlink_efficiency"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"CostConstants.{f} must be a finite number > 0, got {v}")
        for f in ("prefill_overhead_s", "decode_overhead_s"):
            v = getattr(self, f)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"CostConstants.{f} must be a finite number >= 0 (seconds), got {v}")
        if self.split_kv_chunk_tokens < 1:
            raise ValueError(f"CostConstants.split_kv_chunk_tokens must be >= 1, got {self.split_kv_chunk_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> CostConstants:
        return cls(**d)


class CostModel:
    """Seconds of each engine call for one model on one hardware profile (module docstring)."""

    def __init__(self, hardware: HardwareProfile, model: ModelProfile, constants: CostConstants = CostConstants(),
                 dispatch: Dispatch | str = "waves"):
        """dispatch: the decode attention kernel, a `Dispatch` or a name `dispatch.kernel_for`
        knows (a dispatch model: "waves", "longest-first", "greedy", "split"; or a kernel:
        "paged-v1", "fa2-varlen", ...)."""
        self.hardware, self.model, self.constants = hardware, model, constants
        c, hw, m = constants, hardware, model
        self._weight_s = m.weight_bytes / (hw.hbm_bandwidth * c.weight_bandwidth_efficiency)
        self._flop_s = 1.0 / (hw.dense_flops * c.flops_efficiency)
        d = kernel_for(hw, dispatch) if isinstance(dispatch, str) else dispatch
        if d.model == "split":
            d = replace(d, chunk_tokens=c.split_kv_chunk_tokens)
        self.dispatch = d
        """The decode attention kernel and its dispatch model."""
        self._split = replace(kernel_for(hw, "split"), chunk_tokens=c.split_kv_chunk_tokens)

    def kernel(self, split_kv: bool = False) -> Dispatch:
        """The attention kernel a decode step runs: this model's, or split-KV if `split_kv`."""
        return self._split if split_kv else self.dispatch

    # ---- prefill ------------------------------------------------------------------------------

    def prefill_seconds(self, prompt_lens: Sequence[int]) -> float:
        """One prefill call over these prompts (0 for none)."""
        n = _lengths(prompt_lens, "prompt_lens")
        if not n.size:
            return 0.0
        pairs = float((n * (n + 1) // 2).sum())  # causal (query, key) pairs
        flops = self.model.flops_per_token * float(n.sum()) + self.model.attention_flops_per_token_pair * pairs
        return self.constants.prefill_overhead_s + max(self._weight_s, flops * self._flop_s)

    # ---- decode -------------------------------------------------------------------------------

    def decode_seconds(self, kv_lens: Sequence[int], split_kv: bool = False) -> float:
        """One decode step over sequences with these KV lengths (0 for none)."""
        t = self.decode_breakdown(kv_lens, split_kv)
        return t["overhead"] + max(t["weights"], t["matmul"]) + t["attention"]

    def decode_breakdown(self, kv_lens: Sequence[int], split_kv: bool = False) -> dict[str, float]:
        """The terms of a decode step, in seconds: overhead, weights (the weight read), matmul
        (the linear layers' compute), attention. The step is overhead + max(weights, matmul) +
        attention; all zero for an empty step."""
        kv = _lengths(kv_lens, "kv_lens")
        if not kv.size:
            return {"overhead": 0.0, "weights": 0.0, "matmul": 0.0, "attention": 0.0}
        return {
            "overhead": self.constants.decode_overhead_s,
            "weights": self._weight_s,
            "matmul": self.model.flops_per_token * kv.size * self._flop_s,
            "attention": self.attention_seconds(kv, split_kv),
        }

    def attention_seconds(self, kv_lens: Sequence[int] | np.ndarray, split_kv: bool = False) -> float:
        """t_attn of the module docstring: every layer's decode attention over these KV lengths,
        in this order, under the model's dispatch (split-KV if `split_kv`)."""
        kv = _lengths(kv_lens, "kv_lens")
        layer = self.kernel(split_kv).layer_seconds(kv, self.hardware, self.model,
                                                    self.constants.kv_bandwidth_efficiency)
        return self.model.layers * layer

    # ---- mixed (chunked prefill) -------------------------------------------------------------

    def step_seconds(self, kv_lens: Sequence[int], chunks: Sequence[tuple[int, int]],
                     split_kv: bool = False) -> float:
        """One forward decoding sequences of these KV lengths and prefilling prompt positions
        [start, end) of each chunk (module docstring); 0 for an empty step."""
        kv = _lengths(kv_lens, "kv_lens")
        spans = np.asarray(chunks, dtype=np.int64).reshape(-1, 2)
        if spans.size and ((spans[:, 0] < 0).any() or (spans[:, 1] <= spans[:, 0]).any()):
            raise ValueError(f"chunks must be [start, end) with 0 <= start < end, got {spans.tolist()[:5]}")
        if not spans.size:
            return self.decode_seconds(kv, split_kv)
        s, e = spans[:, 0], spans[:, 1]
        tokens = kv.size + float((e - s).sum())
        pairs = float((e * (e + 1) // 2 - s * (s + 1) // 2).sum())
        c = self.constants
        linear = max(self._weight_s, self.model.flops_per_token * tokens * self._flop_s)
        attention = self.attention_seconds(kv, split_kv) if kv.size else 0.0
        return (max(c.prefill_overhead_s, c.decode_overhead_s) + linear + attention
                + self.model.attention_flops_per_token_pair * pairs * self._flop_s)

    # ---- transfers ----------------------------------------------------------------------------

    def transfer_seconds(self, nbytes: int, link: str) -> float:
        """One copy of `nbytes` over `link` ("pcie" or "nvlink"): latency + bytes / bandwidth;
        0 for nothing to copy."""
        bandwidth, latency = self.link(link)
        if nbytes < 0:
            raise ValueError(f"transfer of {nbytes} bytes: a byte count must be >= 0")
        return 0.0 if nbytes == 0 else latency + nbytes / bandwidth

    def link(self, link: str) -> tuple[float, float]:
        """(effective bandwidth bytes/s one way, latency s) of a link."""
        hw, c = self.hardware, self.constants
        if link == "pcie":
            return hw.pcie_bandwidth * c.pcie_efficiency, hw.pcie_latency
        if link == "nvlink":
            return hw.nvlink_bandwidth * c.nvlink_efficiency, hw.nvlink_latency
        raise ValueError(f"unknown link {link!r}; known links: {', '.join(LINKS)}")

    def link_timeline(self, link: str) -> LinkTimeline:
        """A fresh FIFO timeline for one direction of `link`."""
        return LinkTimeline(*self.link(link), name=link)


class LinkTimeline:
    """One direction of one link: transfers are served one at a time, first in first out, each
    at the link's full bandwidth and starting when the previous one has finished.

    Why FIFO and not fair sharing: a GPU serves each copy direction (host-to-device,
    device-to-host, peer) with its own DMA copy engine, which runs the copies queued on it in
    order; concurrent host-to-device copies from several streams are observed to serialise
    (NVIDIA developer forum, "Three concurrent cudaMemcpyAsync(HtoD) calls still serialized on
    H100/H20"). Keep one timeline per (link, direction); a full-duplex link's two directions do not
    contend. Host memory is not modelled as a shared limit: even all 8 PCIe x16 links of a node
    loading at once (8 x 64 GB/s = 512 GB/s) stay under the DRAM bandwidth of a DGX H100's two
    sockets (2 x 8 DDR5-4800 channels = 614 GB/s peak), and AlignedServe loads from host through
    the helper GPUs only. A run driving every link from host at once would be a little optimistic."""

    def __init__(self, bandwidth: float, latency: float, name: str = ""):
        if not bandwidth > 0 or not latency >= 0:
            raise ValueError(f"link {name!r}: bandwidth must be > 0 and latency >= 0, got {bandwidth}, {latency}")
        self.bandwidth, self.latency, self.name = bandwidth, latency, name
        self.free_at = 0.0
        """Virtual time when the last scheduled transfer ends."""

    def schedule(self, nbytes: int, now: float) -> tuple[float, float]:
        """Queue a transfer of `nbytes` submitted at `now`: its (start, end) virtual times."""
        if nbytes < 0:
            raise ValueError(f"transfer of {nbytes} bytes on {self.name or 'link'}: a byte count must be >= 0")
        start = max(now, self.free_at)
        end = start + (self.latency + nbytes / self.bandwidth if nbytes else 0.0)
        self.free_at = end
        return start, end


def _lengths(values: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.int64).reshape(-1)
    if a.size and a.min() < 1:
        raise ValueError(f"{what} must all be >= 1 token, got {int(a.min())}")
    return a

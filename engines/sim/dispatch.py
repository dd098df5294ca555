"""How a decode attention kernel deals its work to the SMs: the dispatch models of the cost model.

A decode attention kernel reads, per layer, the K and V of every (sequence, KV head) pair: one
*unit* of b = L * 2 d bytes_per_elem bytes for a sequence of L tokens. How long the layer takes
depends on how the units reach the S SMs (`Dispatch.model`):

- ``waves``: units in launch order, a sequence's heads together (the grid of vLLM's
  paged_attention v1, heads fastest), dealt S at a time in strict waves; every SM reads at its
  share BW e / S and a wave lasts as long as its longest unit:
      t = Σ_waves max_{u in wave} b_u / (BW e / S)
  Order-sensitive: a long sequence launched among short ones holds a wave of idle SMs open.
- ``longest-first``: the same waves with the batch sorted longest first whatever its order (what
  a scheduler that sorts its decode batch gets from the same kernel); never slower than waves.
- ``greedy``: list scheduling, as a GPU's block scheduler does it: every unit starts as soon as a
  slot frees (N = slots_per_sm x S slots), each unit reads at most r bytes/s by itself, and all
  the running units share BW e. Units are launched head-major (FlashAttention-2's grid
  (m_block, batch, head): the batch fastest), so a long sequence's units are spread through the
  launch, not bunched. In the fluid approximation, with r' = min(r, BW e / N) a unit's speed
  while every slot is busy, d_j = c0 + b_j / r' its slot time and c0 a fixed cost per unit:
      start_j = Σ_{k<j} d_k / N,        t = max_j (start_j + c0 + b_j / r)
  a unit ends at its own top speed r once it runs alone (the tail). The critical path is then
  the long units' own duration b / r, which is what the H100 probe shows (the long sequence's
  units take ~b / r whatever the rest of the batch does), and order hardly matters (longs first
  vs last: 1.84x vs 1.82x measured). Constants fitted on the probe (`fit_greedy`).
- ``split``: split-KV / load-balanced kernels (FlashDecoding, FlashInfer's plan, TensorRT-LLM
  XQA multi-block, vLLM paged_attention v2): every sequence cut into chunks of `chunk_tokens`,
  each (chunk, head) a unit, dealt in waves: t ~ Σ b / (BW e), the bytes roofline, give or take
  one wave of chunks and each sequence's last chunk (a wave lasts as long as its longest chunk,
  so a short last chunk beside full ones costs a full one). Not measured on a GPU (no FlashInfer
  on the probe's machine): roofline.

Equal-length batches cost the same under every model, give or take one wave (for `greedy`:
when its constants are the roofline's, r = BW e / S, one slot per SM, c0 = 0).

`KERNELS` names the kernels and says which dispatch each uses, with its constants and their
source; `kernel_for(hardware, name)` looks one up by kernel or dispatch name. Only one GPU
measurement exists (`bench/results/decode_bubble-h100.json`, FlashAttention-2 varlen on an H100,
2026-12-05); every other entry is the roofline and says so.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from engines.sim.profiles import HardwareProfile, ModelProfile, model_profile

DISPATCH_MODELS = ("waves", "longest-first", "greedy", "split")
"""The dispatch models, in the order reports list them."""
SPLIT_KV_CHUNK_TOKENS = 512
"""KV tokens per split-KV work unit: vLLM's paged_attention_v2 PARTITION_SIZE
(vllm/attention/ops/paged_attn.py, `_PARTITION_SIZE = 512`)."""
H100_PROBE = Path(__file__).resolve().parents[2] / "bench" / "results" / "decode_bubble-h100.json"
"""The decode-bubble probe's H100 timings (../shared/probes/decode_bubble_gpu.py, 2026-12-05)."""
ROOFLINE = "roofline, not measured"


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One decode attention kernel: its dispatch model and constants (module docstring)."""

    kernel: str
    """The kernel's name, e.g. "fa2-varlen"; reports and `StepCost.attention` show it."""
    model: str
    """One of DISPATCH_MODELS."""
    kv_bandwidth_efficiency: float | None = None
    """e: share of HBM bandwidth the kernel reaches in aggregate. None: the cost model's
    `CostConstants.kv_bandwidth_efficiency` (1 unless a calibration fitted it)."""
    unit_bandwidth: float = 0.0
    """r (greedy): bytes/s one (sequence, KV head) unit reads by itself; 0 = BW e / S."""
    slots_per_sm: int = 1
    """Units an SM runs at once (greedy)."""
    unit_overhead_s: float = 0.0
    """c0 (greedy): fixed seconds per unit (loading the query, writing the output)."""
    launch_s: float = 0.0
    """Fixed seconds per layer the fit needed to reproduce the probe. Not charged by the cost
    model: the probe times one eager call (Python, the aten dispatcher, event records: tens of
    us), which a serving engine's CUDA graphs hide; a step's fixed cost is
    `CostConstants.decode_overhead_s`."""
    chunk_tokens: int = SPLIT_KV_CHUNK_TOKENS
    """KV tokens per unit (split)."""
    source: str = ROOFLINE
    """Where the constants come from."""

    def __post_init__(self) -> None:
        if self.model not in DISPATCH_MODELS:
            raise ValueError(f"Dispatch {self.kernel!r}: unknown dispatch model {self.model!r}; "
                             f"known: {', '.join(DISPATCH_MODELS)}")
        e = self.kv_bandwidth_efficiency
        if e is not None and not 0 < e <= 1.5:
            raise ValueError(f"Dispatch {self.kernel!r}: kv_bandwidth_efficiency must be in (0, 1.5], got {e}")
        if self.unit_bandwidth < 0 or self.unit_overhead_s < 0 or self.launch_s < 0:
            raise ValueError(f"Dispatch {self.kernel!r}: unit_bandwidth, unit_overhead_s and launch_s must be >= 0")
        if self.slots_per_sm < 1 or self.chunk_tokens < 1:
            raise ValueError(f"Dispatch {self.kernel!r}: slots_per_sm and chunk_tokens must be >= 1")

    @property
    def order_matters(self) -> bool:
        """Whether the batch's order changes the step's time: only for in-order waves."""
        return self.model == "waves"

    def layer_seconds(self, kv_lens: np.ndarray, hardware: HardwareProfile, model: ModelProfile,
                      kv_bandwidth_efficiency: float = 1.0, launch: bool = False) -> float:
        """One layer of decode attention over sequences of these KV lengths, in this order
        (module docstring). `kv_bandwidth_efficiency` is used where this kernel has none of its
        own; `launch` adds the fitted per-layer launch cost (for comparing with the probe)."""
        kv = np.asarray(kv_lens, dtype=np.int64).reshape(-1)
        if not kv.size:
            return 0.0
        e = self.kv_bandwidth_efficiency or kv_bandwidth_efficiency
        unit_bytes = 2 * model.head_dim * model.bytes_per_param  # one token of one head, K and V
        sm_bw = hardware.hbm_bandwidth * e / hardware.sm_count
        fixed = self.launch_s if launch else 0.0
        if self.model == "greedy":
            return fixed + fluid_list_schedule(kv * unit_bytes, model.kv_heads, hardware.sm_count * self.slots_per_sm,
                                               self.unit_bandwidth or sm_bw, hardware.hbm_bandwidth * e,
                                               self.unit_overhead_s)
        if self.model == "split":
            units = split_chunks(kv, self.chunk_tokens)
        elif self.model == "longest-first":
            units = np.sort(kv)[::-1]
        else:
            units = kv
        return fixed + wave_sum(units, model.kv_heads, hardware.sm_count) * unit_bytes / sm_bw


# ---- the models' arithmetic ------------------------------------------------------------------

def wave_sum(items: np.ndarray, repeat: int, slots: int) -> float:
    """Σ over waves of the longest unit in the wave, where the units are each item repeated
    `repeat` times in a row (the KV heads of one sequence or chunk), dealt out `slots` (SMs) at a
    time. Equal to

        units = np.repeat(items, repeat); pad with zeros to a multiple of slots;
        units.reshape(-1, slots).max(axis=1).sum()

    without building the repeated array (40x smaller for OPT-13B's 40 heads): wave w holds units
    [w*slots, (w+1)*slots), i.e. items first[w] .. last[w] with first = w*slots // repeat."""
    if not items.size:
        return 0.0
    waves = -(-items.size * repeat // slots)
    w = np.arange(waves)
    first = w * slots // repeat
    last = np.minimum(((w + 1) * slots - 1) // repeat, items.size - 1)
    # reduceat takes the max over items[first[w]:first[w+1]]; the wave also holds items[last[w]],
    # which may be first[w+1] (an item whose heads straddle two waves).
    return float(np.maximum(np.maximum.reduceat(items, first), items[last]).sum())


def split_chunks(kv: np.ndarray, chunk: int) -> np.ndarray:
    """Each sequence cut into chunks of `chunk` tokens (the last one shorter), in order."""
    per_seq = -(-kv // chunk)
    # Chunk j of a sequence of length L holds min(chunk, L - j*chunk) tokens.
    j = np.arange(int(per_seq.sum())) - np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    return np.minimum(chunk, np.repeat(kv, per_seq) - j * chunk)


def fluid_list_schedule(seq_bytes: np.ndarray, heads: int, slots: int, unit_bandwidth: float,
                        bandwidth: float, unit_overhead_s: float) -> float:
    """The `greedy` model's makespan (module docstring) of `heads` units per sequence launched
    head-major (all sequences of head 0, then head 1, ...), each sequence's unit `seq_bytes`.

    Every head's row of units is the same, so a unit's fluid start grows with its head and the
    latest-ending unit of each sequence is its last head's: only that row is evaluated, its units
    starting after (heads - 1) whole rows."""
    b = np.asarray(seq_bytes, dtype=np.float64)
    if not b.size:
        return 0.0
    slot_time = unit_overhead_s + b / min(unit_bandwidth, bandwidth / slots)
    before = np.cumsum(slot_time) - slot_time + (heads - 1) * slot_time.sum()
    return float((before / slots + unit_overhead_s + b / unit_bandwidth).max())


# ---- the kernels -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeCase:
    """One probe timing: a model shape, a batch's KV lengths in launch order, the seconds."""

    shape: str
    case: str
    kv_lens: tuple[int, ...]
    seconds: float


def load_probe(path: str | Path = H100_PROBE, kernel: str = "fa2-varlen") -> tuple[dict, list[ProbeCase]]:
    """The probe's JSON: its header (device, sms, torch) and the timings of `kernel`. The batch
    of each case is rebuilt from its name (the probe writes B, sum_L and max_L, checked here)."""
    d = json.loads(Path(path).read_text())
    cases = []
    for row in d["rows"]:
        if row.get(kernel) is None:
            continue
        lens = _case_lengths(row["case"])
        if (len(lens), sum(lens), max(lens)) != (row["B"], row["sum_L"], row["max_L"]):
            raise ValueError(f"{path}: case {row['case']!r} rebuilt as B={len(lens)} sum={sum(lens)} max={max(lens)}, "
                             f"the probe wrote B={row['B']} sum={row['sum_L']} max={row['max_L']}")
        cases.append(ProbeCase(row["shape"], row["case"], tuple(lens), float(row[kernel])))
    return {k: v for k, v in d.items() if k != "rows"}, cases


def _case_lengths(name: str) -> list[int]:
    """The probe's batches from their names: "c 60x300+4x8000" is 60 of 300 then 4 of 8,000
    ("longs first" puts the long ones first); "sweep long=L" is one of L after 35 sharing the
    rest of 36,000 (decode_bubble_gpu.py's SWEEP_SUM and SWEEP_B)."""
    m = re.match(r"sweep long=(\d+)$", name)
    if m:
        long = int(m.group(1))
        return [(36_000 - long) // 35] * 35 + [long]
    groups = [(int(n), int(L)) for n, L in re.findall(r"(\d+)x(\d+)", name)]
    if not groups:
        raise ValueError(f"probe case {name!r}: cannot tell its KV lengths from its name")
    if "longs first" in name:
        groups.sort(key=lambda g: -g[1])
    return [L for n, L in groups for _ in range(n)]


@dataclass(frozen=True)
class GreedyFit:
    """The `greedy` constants fitted to a probe, and how well they reproduce it."""

    dispatch: Dispatch
    cases: tuple[ProbeCase, ...]
    predicted: tuple[float, ...]
    """Seconds the fitted model gives each case (launch included, as the probe timed it)."""

    @property
    def errors(self) -> np.ndarray:
        """Relative error per case (predicted / measured - 1)."""
        return np.array(self.predicted) / np.array([c.seconds for c in self.cases]) - 1

    def table(self) -> str:
        """Per case: measured, predicted, error (a markdown table)."""
        lines = ["| shape | case | measured us | greedy us | error |", "|---|---|---:|---:|---:|"]
        for c, p, e in zip(self.cases, self.predicted, self.errors):
            lines.append(f"| {c.shape} | {c.case} | {c.seconds * 1e6:.1f} | {p * 1e6:.1f} | {e:+.1%} |")
        rms = float(np.sqrt(np.mean(self.errors ** 2)))
        lines.append(f"\nrms {rms:.1%}, max |error| {np.abs(self.errors).max():.1%} over {len(self.cases)} cases")
        return "\n".join(lines)


SLOTS_GRID = (1, 2, 3, 4)
"""Slots per SM the fit tries."""


def fit_greedy(cases: Sequence[ProbeCase], hardware: HardwareProfile, kernel: str = "fa2-varlen",
               source: str = "") -> GreedyFit:
    """Least squares of relative error of the `greedy` model over the probe's cases, on a grid
    and then a finer grid around its best point: slots per SM 1-4; e 0.40-1.00 by 0.05, then by
    0.01; r 4-64 GB/s in 8% steps, then 1%; c0 0-16 us by 2 us, then 0.25 us; and at every point
    the per-layer launch cost that minimises the error (closed form, >= 0). Each case's shape is
    the model profile of its name (OPT-13B, Llama-3-8B)."""
    shapes = {c.shape: model_profile(c.shape) for c in cases}
    y = np.array([c.seconds for c in cases])
    per_case = []
    for c in cases:
        m = shapes[c.shape]
        # Only the last head's row can end last (fluid_list_schedule): units j = (H - 1) B + i.
        b = np.asarray(c.kv_lens, dtype=np.float64) * 2 * m.head_dim * m.bytes_per_param
        rows_before = (m.kv_heads - 1) * b.size
        per_case.append((b, np.cumsum(b) - b + (m.kv_heads - 1) * b.sum(),
                         rows_before + np.arange(b.size, dtype=np.float64)))
    coarse = _grid_search(per_case, y, hardware, SLOTS_GRID, np.arange(0.40, 1.001, 0.05),
                          4e9 * 1.08 ** np.arange(37), np.arange(0, 16.01, 2) * 1e-6)
    k, e, r, c0 = coarse[1][:4]
    _, (k, e, r, c0, launch, predicted) = _grid_search(
        per_case, y, hardware, (k,), np.clip(e + np.arange(-0.05, 0.051, 0.01), 0.01, 1.0),
        r * 1.01 ** np.arange(-8, 9), np.clip(c0 + np.arange(-2, 2.01, 0.25) * 1e-6, 0, None))
    d = Dispatch(kernel, "greedy", kv_bandwidth_efficiency=round(e, 2), unit_bandwidth=r, slots_per_sm=k,
                 unit_overhead_s=c0, launch_s=launch, source=source or f"fit_greedy on {len(cases)} probe cases")
    return GreedyFit(d, tuple(cases), predicted)


def _grid_search(per_case, y, hardware, slots_grid, e_grid, r_grid, c0_grid):
    """(loss, (slots_per_sm, e, r, c0, launch, predicted seconds per case)) at the grid's best."""
    c0 = np.unique(np.asarray(c0_grid, dtype=np.float64))
    w2 = 1 / y ** 2
    best = (np.inf, None)
    for slots_per_sm in slots_grid:
        n = slots_per_sm * hardware.sm_count
        for e in np.unique(np.round(e_grid, 4)):
            cap = hardware.hbm_bandwidth * e / n
            for r in r_grid:
                if r <= cap and e != max(e_grid):
                    continue  # no unit is ever bandwidth-shared: e plays no part, try it once
                busy = min(r, cap)
                # t_j(c0) = c0 (j / n + 1) + B_<j / (n busy) + b_j / r, maximised over j, per c0.
                model = np.stack([(c0[:, None] * (j / n + 1)[None, :]
                                   + (before / (n * busy) + b / r)[None, :]).max(axis=1)
                                  for b, before, j in per_case], axis=1)  # [c0, case]
                launch = np.maximum(0.0, ((y - model) * w2).sum(axis=1) / w2.sum())
                loss = ((((model + launch[:, None]) - y) / y) ** 2).sum(axis=1)
                i = int(np.argmin(loss))
                if loss[i] < best[0]:
                    best = (float(loss[i]), (slots_per_sm, float(e), float(r), float(c0[i]), float(launch[i]),
                                             tuple(model[i] + launch[i])))
    return best


# ---- the kernel table ------------------------------------------------------------------------

H100_FIT_SOURCE = ("fitted on H100 probe 2026-12-05 (fit_greedy on bench/results/decode_bubble-h100.json, "
                   "28 fa2-varlen cases, OPT-13B and Llama-3-8B shapes, bf16: rms error 8.0%, max 18.1%)")
KERNELS: dict[str, Dispatch] = {d.kernel: d for d in (
    Dispatch("paged-v1", "waves",
             source=f"{ROOFLINE}: vLLM paged_attention v1's grid (heads, seqs), dealt in launch order"),
    Dispatch("paged-v1-longest-first", "longest-first",
             source=f"{ROOFLINE}: paged-v1 with its batch sorted longest KV first"),
    # fit_greedy(load_probe()[1], H100_SXM) gives these (tests/engines/sim/test_dispatch.py refits them).
    Dispatch("fa2-varlen", "greedy", kv_bandwidth_efficiency=0.81, unit_bandwidth=17.61e9, slots_per_sm=4,
             unit_overhead_s=7.0e-6, launch_s=27.6e-6, source=H100_FIT_SOURCE),
    Dispatch("split-kv", "split",
             source=f"{ROOFLINE}: FlashDecoding / FlashInfer / TensorRT-LLM XQA multi-block, chunks of "
                    f"{SPLIT_KV_CHUNK_TOKENS} tokens (no FlashInfer on the probe's machine)"),
)}
"""Named decode attention kernels, each with its dispatch model, constants and their source."""
MEASURED_ON = {"fa2-varlen": "H100-SXM"}
"""Kernels whose constants were measured, and on which hardware profile."""
DEFAULT_KERNEL = {"waves": "paged-v1", "longest-first": "paged-v1-longest-first", "greedy": "fa2-varlen",
                  "split": "split-kv"}
"""The kernel each dispatch model names by default."""


def kernel_for(hardware: HardwareProfile, name: str) -> Dispatch:
    """The kernel `name` (a kernel of KERNELS or a dispatch model of DISPATCH_MODELS) on this
    hardware. A kernel measured on other hardware keeps its constants and says so in `source`."""
    key = DEFAULT_KERNEL.get(name, name)
    if key not in KERNELS:
        raise KeyError(f"unknown attention kernel or dispatch model {name!r}; dispatch models: "
                       f"{', '.join(DISPATCH_MODELS)}; kernels: {', '.join(KERNELS)}")
    d = KERNELS[key]
    where = MEASURED_ON.get(key)
    if where and where != hardware.name:
        d = replace(d, source=f"{d.source}; carried over to {hardware.name} unchanged, not measured there")
    return d

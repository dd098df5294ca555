"""Time the torch engine for calibration: what `python -m bench.calibrate` measures.

This module imports torch; only the calibration CLI (`bench.calibrate`) imports it, and only inside `main`.

`measure` builds (once, cached under .cache/sim/) a random-weight demo engine, measures the
machine's peaks, and times prefill and decode calls chosen so the fit can separate its terms:

- hardware: the "HBM" bandwidth is a large tensor copy (bytes read + bytes written per second,
  the STREAM "copy" convention), FLOP/s a square matmul in the engine's dtype, the SM count the
  torch thread count on a CPU (the multiprocessor count on a GPU). Links are timed as a plain copy
  (CPU: memcpy) or a pinned host-to-device copy (GPU); a single-GPU run has no peer link, so its
  NVLink numbers are the PCIe ones and say so. These are *measured* peaks of this machine; the
  fitted efficiencies are relative to them.
- prefill: equal-length batches (B in 1, 4; prompts from 16 to max_seq_len/2 tokens), because the
  torch engine pads a prefill batch to its longest prompt and a CallTiming keeps only the sum;
- decode: batches of one length (short, then mid-length) at batch sizes doubling from 1 (to 31
  short or 8 mid sequences), and the same with one near-max_seq_len member, so batch size, max_kv
  and the sum of KV lengths vary independently (bench/policy_comparison.py `calibrate` explains
  why a workload run does not).

Every call is run `reps` times after one untimed warm-up. ~1 minute on a 2-core CPU at the defaults.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from engines.base import CallTiming, PrefillRequest
from engines.sim.profiles import HardwareProfile, ModelProfile

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "sim"
MAX_BATCH = 32
"""Sizes the decode plan: MAX_BATCH - 1 short sequences (MAX_BATCH with "long") and MAX_BATCH // 4
mid-length ones, so the largest decode batch is 31. A choice of this plan, not a limit of the engine."""
PREFILL_BATCHES = (1, 4)
"""Prefill batch sizes timed at each prompt length (one prompt, and four equal ones): a choice of this plan."""
BOS, FILLER = 256, 65
"""Prompt tokens of the demo byte tokenizer: <s> then "A"s (content does not change the time)."""


@dataclass
class TimingRun:
    """What `measure` returns: the timings and the profiles they were taken on."""

    timings: list[CallTiming]
    hardware: HardwareProfile
    model: ModelProfile
    meta: dict


def engine_dir(model: str, max_seq_len: int) -> Path:
    """The demo engine directory for (model, max_seq_len), built on first use."""
    from build_scripts.build_engine import main as build_engine

    out = CACHE / f"engine-{model}-{max_seq_len}"
    if not (out / "manifest.json").is_file():
        build_engine(["--model", "demo", "--out", str(out), "--demo-size", model, "--max-seq-len", str(max_seq_len),
                      "--kv-memory-gb", "0.25", "--host-kv-memory-gb", "0"])
    return out


def measure(model: str, device: str, dtype: str, max_seq_len: int, reps: int) -> TimingRun:
    from engines.loader import load_engine

    t0, load_before = time.monotonic(), os.getloadavg()[0]
    if load_before > torch.get_num_threads():
        print(f"warning: the 1-minute load average is {load_before:.1f} with {torch.get_num_threads()} torch threads: "
              "something else is using the CPU and these timings will be noisy")
    lengths, batches = decode_plan(max_seq_len, reps)  # first: it checks max_seq_len and reps
    path = engine_dir(model, max_seq_len)
    probe = load_engine(path, device=device, dtype=dtype, kv_blocks=1, host_kv_blocks=0)
    block = probe.describe().block_size
    probe.close()
    # Room for the decode sequences at their final lengths and the largest prefill batch beside them.
    need = sum(-(-(n + (reps + 1) * len(batches)) // block) for n in lengths.values())
    need += max(PREFILL_BATCHES) * -(-(max_seq_len // 2) // block)
    engine = load_engine(path, device=device, dtype=dtype, kv_blocks=need, host_kv_blocks=0)
    hardware = measure_hardware(engine.describe().devices[0].name, dtype)
    timings = time_calls(engine, lengths, batches, prefill_plan(max_seq_len), reps)
    profile = model_profile(engine, model, dtype)
    engine.close()
    if os.getloadavg()[0] > torch.get_num_threads():
        print(f"warning: the 1-minute load average rose to {os.getloadavg()[0]:.1f} while timing: something else "
              "used the CPU, so these timings are noisy; check the fit's error and time again on an idle machine")
    meta = {"date": date.today().isoformat(), "device": device, "dtype": dtype, "engine_model": model,
            "max_seq_len": max_seq_len, "reps": reps, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "wall_s": round(time.monotonic() - t0, 1),
            "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    return TimingRun(timings, hardware, profile, meta)


def prefill_plan(max_seq_len: int) -> list[tuple[int, int]]:
    """(batch size, prompt length) of the timed prefills: equal-length batches."""
    lens = sorted({16, 64, 256, max_seq_len // 2} - {0})
    return [(b, n) for n in lens for b in PREFILL_BATCHES if n <= max_seq_len]


def decode_plan(max_seq_len: int, reps: int) -> tuple[dict[str, int], list[list[str]]]:
    """Start lengths by sequence id, and the decode batches: one-length batches of short (16) and
    mid (max_seq_len/2) sequences at doubling sizes, each also with "long" in place of one member.
    Sequences grow one token per step they take part in; "long" is sized to stay within max_seq_len."""
    short = [f"s{i}" for i in range(MAX_BATCH - 1)]
    mid = [f"m{i}" for i in range(MAX_BATCH // 4)]
    batches = []
    for group in (short, mid):
        for b in sorted({*(2**k for k in range(len(group).bit_length())), len(group)}):
            batches += [group[:b], ["long"] + group[:b - 1]]
    if reps < 1:
        raise ValueError(f"--reps {reps}: must be >= 1 (the first run of each call is an untimed warm-up)")
    with_long = sum("long" in b for b in batches)
    lengths = {**{i: 16 for i in short}, **{i: max_seq_len // 2 for i in mid},
               "long": max_seq_len - 1 - (reps + 1) * with_long}
    if lengths["long"] <= max_seq_len // 2:  # "long" must start longer than the mid-length sequences
        raise ValueError(f"--max-seq-len {max_seq_len} is too short for --reps {reps}: the long decode sequence "
                         f"grows {(reps + 1) * with_long} tokens and must start past max_seq_len / 2; use "
                         f"--max-seq-len >= {2 * (reps + 1) * with_long + 3} or fewer --reps")
    return lengths, batches


def time_calls(engine, lengths: dict[str, int], batches: list[list[str]], prefills: list[tuple[int, int]],
               reps: int) -> list[CallTiming]:
    def prompt(n: int) -> list[int]:
        return [BOS] + [FILLER] * (n - 1)

    timings: list[CallTiming] = []
    total = len(prefills) * (reps + 1) + len(set(lengths.values())) + len(batches) * (reps + 1)
    with tqdm(total=total, desc="calibration calls", unit="call") as bar:
        for b, n in prefills:
            for r in range(reps + 1):
                ids = [f"p{b}-{n}-{r}-{i}" for i in range(b)]
                t = engine.prefill([PrefillRequest(i, prompt(n)) for i in ids]).timing
                engine.free(ids)
                timings += [t] if r else []  # the first of each is a warm-up
                bar.update()
        for n in sorted(set(lengths.values())):  # one prefill per length: no padding
            timings.append(engine.prefill([PrefillRequest(i, prompt(n)) for i, m in lengths.items() if m == n]).timing)
            bar.update()
        for batch in batches:
            for r in range(reps + 1):
                t = engine.decode(batch).timing
                timings += [t] if r else []
                bar.update()
    engine.free(list(lengths))
    return timings


def model_profile(engine, size: str, dtype: str) -> ModelProfile:
    """The engine's model as a ModelProfile (params counted from its loaded tensors)."""
    cfg, info = engine.cfg, engine.describe()
    return ModelProfile(
        name=f"demo-{size}", layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_heads,
        kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size, params=info.model.num_params, max_seq_len=info.model.max_seq_len,
        bytes_per_param=torch.finfo(getattr(torch, dtype)).bits // 8,
        source=f"build_scripts/demo_checkpoint.py size {size!r}; params counted from the loaded weights",
    )


def measure_hardware(tier: str, dtype: str) -> HardwareProfile:
    """This machine's measured peaks (module docstring), as a HardwareProfile."""
    dev = torch.device("cpu" if tier == "cpu" else tier)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=dev).fill_(1.0)  # 256 MiB, past every cache
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy_s = _best(lambda: dst.copy_(src), sync)
    n = 4096 if cuda else 1024
    a = torch.randn(n, n, dtype=getattr(torch, dtype), device=dev)
    mm_s = _best(lambda: a @ a, sync)
    if cuda:
        host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True)
        link_s = _best(lambda: dst.copy_(host, non_blocking=True), sync)
        props = torch.cuda.get_device_properties(dev)
        sms, capacity = props.multi_processor_count, props.total_memory
    else:
        link_s, sms = copy_s, torch.get_num_threads()
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peer = "NVLink numbers are the PCIe ones (one GPU: no peer link measured)" if cuda else "links are memcpy"
    return HardwareProfile(
        name=f"{'cuda' if cuda else 'cpu'}-{platform.machine()}-{sms}{'sm' if cuda else 'threads'}",
        hbm_bandwidth=2 * nbytes / copy_s, dense_flops=2 * n**3 / mm_s, sm_count=sms, hbm_bytes=capacity,
        pcie_bandwidth=nbytes / link_s, pcie_latency=0.0, nvlink_bandwidth=nbytes / link_s, nvlink_latency=0.0,
        host_memory_bytes=host_bytes,
        source=f"measured by bench/torch_timings.py on {date.today().isoformat()}: 256 MiB tensor copy "
               f"(read + write bytes / s), {n}x{n} {dtype} matmul; {peer}; latencies not measured (0)",
    )


def _best(fn, sync, runs: int = 20) -> float:
    """Fastest of `runs` timed calls after one warm-up: the machine's peak, not its average."""
    fn()
    sync()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best

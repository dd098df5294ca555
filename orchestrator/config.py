"""The one typed configuration of a serving process.

Built in three layers, later ones win: defaults derived from the engine manifest, a TOML or JSON
config file, then environment variables `ALIGNED_<FIELD>` (e.g. `ALIGNED_MAX_BATCH_SIZE=16`).
Every field is documented here; this file is the manual.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from orchestrator.policies import REGISTRY
from orchestrator.transfer_planner import ROUTE_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "ALIGNED_"


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the field, the value and the source."""


UNBOUNDED = sys.maxsize
"""A queue bound that never refuses: for benchmarks that submit a whole workload at once."""

@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Settings of one serving process (engine runtime + orchestrator policy + request limits)."""

    engine_dir: str = "engines_built/smollm2"
    """Engine directory made by `make build-engine` (holds manifest.json)."""
    device: str = "auto"
    """Decode device: "auto" (first CUDA GPU, else CPU), "cpu" or "cuda:N"."""
    helper_devices: str = ""
    """Comma-separated helper devices (e.g. "cuda:1"): their PCIe links carry the next batch's
    KV from the host, then the peer link (NVLink) pushes it to the decode device
    (GPU-Prefetch-For-GPU). Empty: one device, every load direct."""
    prefill_device: str = ""
    """Device that prefills prompts. Empty: the decode device (policy disagg-fcfs: the first
    helper device). A helper device (e.g. "cuda:1", the paper's prefill GPU) prefills while the
    decode device decodes; each prompt's KV then moves to the decode device (joining the running
    batch) or, for aligned / fcfs-offload, to the host pool over that helper's PCIe link. Needs an
    engine that overlaps them (can_overlap_prefill) to gain anything; elsewhere prefill and decode
    take turns as before."""
    prefetch_route: str = "auto"
    """How loads reach the decode device when there are helper devices. "auto": the transfer
    planner's link model picks, per load, direct or via the least busy helper, whichever
    finishes first; "direct": never via a helper (the "no peer prefetch" ablation); "helper":
    always via a helper."""
    pcie_gb_s: float = 55.0
    """Sustained host <-> device copy bandwidth per device, GB/s, for the link model (PCIe 5.0
    x16 moves ~55 GB/s of pinned memory; PCIe 4.0 x16 about half)."""
    peer_gb_s: float = 450.0
    """Device <-> device bandwidth one way, GB/s, for the link model (NVLink 4 on H100/H200:
    450; PCIe peer copies: the pcie figure)."""
    dtype: str = ""
    """Compute dtype override ("float32" / "bfloat16"); empty keeps the manifest's."""
    kv_blocks: int = 0
    """KV blocks on the decode device; 0 keeps the manifest's (sized by its memory budget)."""
    policy: str = "adaptive"
    """Scheduling policy, a name in the registry (`orchestrator/policies/__init__.py`).
    "adaptive" (the default): continuous batching that prices each candidate batch with the
    engine's fitted step cost (`EngineInfo.step_costs`): where a step costs batch x longest KV,
    long prompts wait (at most max_wait_s / 2) while shorter ones run and then start together;
    where it costs its real KV, every place is filled in arrival order (fcfs). KV for prompt +
    max_tokens is granted on admission, so a started request is never parked or preempted;
    batches decode longest first where the engine's kernel is order-sensitive. Without a fitted
    step cost it is fcfs.
    "aligned": the paper's policy, length-aligned batches from a host-memory KV pool (DESIGN.md §1): the running
    batch is refilled by nearest KV length and switched for a denser staged batch.
    "fcfs": continuous batching in arrival order, as vLLM and TensorRT-LLM's in-flight batcher
    do; KV for prompt + max_tokens is reserved on admission (no eviction), no host pool.
    "fcfs-offload": the aligned machinery (host pool, staged batches, switches) picking requests
    in arrival order instead of by length: isolates the effect of alignment.
    Both host-pool policies need an engine that can offload (a host KV pool); "aligned" on one
    that cannot runs as "fcfs".
    "disagg-fcfs": fcfs with prefill disaggregated as DistServe does it: prompts are prefilled
    on the first helper device while the decode device decodes, then their KV moves to it over
    the peer link; needs a helper device.
    "chunked-prefill": fcfs where prompts are prefilled in chunks inside the decode steps, each
    step carrying at most `chunk_tokens` tokens (DeepSpeed-FastGen's Dynamic SplitFuse,
    Sarathi-Serve); needs an engine that can (can_chunk_prefill)."""
    adaptive_chunks: str = "auto"
    """"adaptive": prefill prompts in chunks inside the decode steps (at most chunk_tokens tokens a
    step, as Sarathi-Serve does), so no whole prompt stalls the running batch's tokens. "auto":
    where the engine can and its step cost says a chunk rides on the step's weight read (a chunk
    of chunk_tokens tokens adds at most one decode step's time: a GPU's memory-bound decode, not
    this CPU's compute-bound one); "on": wherever the engine can; "off": whole prompts between
    decode steps, max_prefill_tokens a call, as fcfs. Ignored with a prefill_device."""
    tpot_slo_s: float = 0.0
    """"adaptive": a target on time per output token, in seconds (0: none). Where prompts ride in
    the decode steps in chunks, each step then carries as many prompt tokens as keep its predicted
    time (the engine's step cost) under the target, instead of a fixed chunk_tokens: long chunks
    (prefill throughput, TTFT) while the running batch's step is short, short ones as it grows.
    A step always carries at least one KV block of prompt, so prompts progress even where the
    decode step alone is over the target."""
    max_batch_size: int = 64
    """Most requests decoding together in one iteration."""
    max_prefill_tokens: int = 4096
    """Most prompt tokens prefilled in one engine call (a longer single prompt runs alone)."""
    chunk_tokens: int = 512
    """"chunked-prefill": most tokens (decode tokens plus prompt chunk tokens) in one step.
    512 is Sarathi-Serve's token budget for strict decode-latency targets (Agrawal et al.,
    OSDI 2024, §5); larger budgets trade decode latency for prefill throughput."""
    max_queue: int = 1024
    """Most requests waiting for admission; more are refused at once ("queue full": Triton's
    UNAVAILABLE / HTTP 503, the OpenAI API's 429 with Retry-After) instead of queuing without bound."""
    max_queue_tokens: int = 0
    """Most prompt tokens waiting for admission, refused beyond as max_queue is; 0: four times the
    tokens the decode device's KV pool holds. Benchmarks that submit a whole workload up front set
    it to UNBOUNDED (and max_queue to the workload's size)."""
    max_tokens_limit: int = 0
    """Largest max_tokens a client may ask for; 0 means the model's max sequence length."""
    max_seq_len: int = 0
    """Longest prompt + output; 0 means the manifest's. Cannot exceed the manifest's."""
    default_max_tokens: int = 64
    """max_tokens when a client sends none."""
    kmin: int = 36
    """Fewest requests in a staged batch, and the running-batch size under which the staged
    batch replaces it (bounded by max_batch_size)."""
    bmax_fraction: float = 0.4
    """Most of the decode device's KV blocks one staged batch may take (Bmax), in (0, 1)."""
    max_wait_s: float = 10.0
    """Starvation bounds. "aligned": no started request waits longer than this between two
    tokens (plus one decode step and one transfer). From half of it on, a parked request is
    loaded and joins the running batch, running members spilling to the host where the device
    cannot grant it; from a quarter of it on, no fresh request is parked (it waits in the queue:
    TTFT). The bound needs host blocks for those spills: with the host pool full it can be
    exceeded. "adaptive": a waiting request held back by the step cost starts once it has waited
    half of this, ahead of the others (its TTFT); a started request is never parked."""
    align_tolerance: float = 0.125
    """A fresh request joins the running batch if its prompt length is within this fraction
    of the batch's KV-length span; otherwise its KV is parked in the host pool."""
    switch_margin: float = 0.1
    """Switch to the staged batch when its alignment efficiency beats the running batch's by
    at least this much (alignment = sum(L) / (B * max L))."""
    min_batch_iterations: int = 8
    """A running batch decodes at least this many iterations before a better-aligned staged
    batch may replace it (one that fell below Kmin is replaced at once). It bounds the switch
    rate, so members brought in do not spill again after a token; the paper reports switches
    in 9-13% of iterations."""
    idle_wait_s: float = 0.05
    """How long the run loop sleeps when nothing is runnable before looking again (it also
    wakes at once on a new request or a cancel)."""
    max_prompt_bytes: int = 0
    """Longest prompt text in UTF-8 bytes, refused (naming the limit) before it is tokenized, so a
    huge prompt costs no tokenizer time and no memory; 0: max_seq_len times the tokenizer's
    longest token in bytes, the most a prompt that fits can have (SmolLM2 at 2,048 tokens:
    165,888 bytes)."""
    drain_timeout_s: float = 30.0
    """On shutdown (the launcher's SIGTERM, SIGINT or SIGHUP): new requests are refused, and those
    in flight get this long to finish; the rest end with a final error ("the server is shutting
    down")."""
    transfer_timeout_s: float = 10.0
    """A KV move (host <-> device, device <-> device) not finished after this long is given up on:
    the requests it moves end with an error and the server goes on; its blocks stay held until the
    copy really ends. A step that needs the move's KV (a batch's loads) waits up to this long, so
    it bounds what a stuck copy costs everyone: 80 GB of KV takes ~3 s over PCIe 4."""
    fault_injection: bool = False
    """Wrap the engine in engines.faults.FaultInjectingEngine so the admin API's POST /api/faults
    (admin token required) can make its next calls fail, for soak and fault tests. Off in
    production: nothing is injected unless someone arms it."""
    admin_host: str = "127.0.0.1"
    """Address the admin API and dashboard listen on. Loopback by default: the read-only pages
    need no token, so expose them beyond this host only behind your own access control."""
    admin_port: int = 0
    """Port of the admin API and dashboard (serving/admin); 0: no admin server."""
    admin_token: str = ""
    """Bearer token the admin API's operator actions (drain, resume, cancel, policy switch)
    require; set it through ALIGNED_ADMIN_TOKEN rather than a file. Empty: those actions are
    refused (403) and the read-only endpoints still work."""
    openai_host: str = "127.0.0.1"
    """Address the OpenAI-compatible API (serving/openai_api) listens on. Loopback by default:
    it asks for no API key, so expose it beyond this host only behind your own access control."""
    openai_port: int = 0
    """Port of the OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions),
    served from the same orchestrator as Triton; 0: no OpenAI API. `make serve` sets 8080."""
    openai_model_name: str = ""
    """The model name the OpenAI API serves (and clients send as "model"); empty: the engine
    directory's name."""

    def __post_init__(self) -> None:
        if self.policy not in REGISTRY:
            raise ConfigError(f"policy: {self.policy!r} is not one of {', '.join(REGISTRY)}")
        if self.prefetch_route not in ROUTE_MODES:
            raise ConfigError(f"prefetch_route: {self.prefetch_route!r} is not one of {', '.join(ROUTE_MODES)}")
        for name in ("pcie_gb_s", "peer_gb_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0 GB/s, got {getattr(self, name)}")
        if self.dtype not in ("", "float32", "bfloat16"):
            raise ConfigError(f"dtype: {self.dtype!r} is not float32 or bfloat16")
        for name in ("max_batch_size", "max_prefill_tokens", "max_queue", "default_max_tokens", "kmin",
                     "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("kv_blocks", "max_tokens_limit", "max_seq_len", "max_prompt_bytes", "max_queue_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0 (0 = from the engine), got {getattr(self, name)}")
        if not 0 < self.bmax_fraction < 1:
            raise ConfigError(f"bmax_fraction: must be in (0, 1), got {self.bmax_fraction}")
        if self.adaptive_chunks not in ("auto", "on", "off"):
            raise ConfigError(f"adaptive_chunks: must be auto, on or off, got {self.adaptive_chunks!r}")
        for name in ("max_wait_s", "align_tolerance", "switch_margin", "min_batch_iterations"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.tpot_slo_s) and self.tpot_slo_s >= 0):
            raise ConfigError(f"tpot_slo_s: must be >= 0 seconds (0 = no target), got {self.tpot_slo_s}")
        if not (math.isfinite(self.drain_timeout_s) and self.drain_timeout_s >= 0):
            raise ConfigError(f"drain_timeout_s: must be >= 0 seconds, got {self.drain_timeout_s}")
        if not (math.isfinite(self.transfer_timeout_s) and self.transfer_timeout_s > 0):
            raise ConfigError(f"transfer_timeout_s: must be > 0 seconds, got {self.transfer_timeout_s}")
        if self.idle_wait_s <= 0:
            raise ConfigError(f"idle_wait_s: must be > 0, got {self.idle_wait_s}")
        if not 0 <= self.admin_port <= 65535:
            raise ConfigError(f"admin_port: must be in [0, 65535] (0 = no admin server), got {self.admin_port}")
        if not 0 <= self.openai_port <= 65535:
            raise ConfigError(f"openai_port: must be in [0, 65535] (0 = no OpenAI API), got {self.openai_port}")

    def replace(self, **changes: Any) -> "ServeConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(
        cls,
        file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> "ServeConfig":
        """Defaults, then `file` (TOML or JSON), then `ALIGNED_*` variables of `env`, then
        keyword `overrides` (e.g. a Triton model config's string parameters, converted)."""
        values: dict[str, Any] = {}
        if file:
            values.update(_read_file(Path(file)))
        values.update(_from_env(os.environ if env is None else env))
        values.update({k: _coerce(k, v, "override") for k, v in overrides.items()})
        return cls(**values)

    def with_manifest(self, max_seq_len: int) -> "ServeConfig":
        """Resolve the fields whose default comes from the engine (its max sequence length)."""
        if self.max_seq_len > max_seq_len:
            raise ConfigError(f"max_seq_len: {self.max_seq_len} exceeds the engine's {max_seq_len}")
        seq = self.max_seq_len or max_seq_len
        limit = self.max_tokens_limit or seq
        return self.replace(max_seq_len=seq, max_tokens_limit=min(limit, seq),
                            default_max_tokens=min(self.default_max_tokens, limit))

    @property
    def helpers(self) -> tuple[str, ...]:
        """`helper_devices` as a tuple of device names."""
        return tuple(d.strip() for d in self.helper_devices.split(",") if d.strip())

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in fields(ServeConfig)}


def _coerce(name: str, raw: Any, source: str) -> Any:
    types = _field_types()
    if name not in types:
        raise ConfigError(f"{source}: unknown setting {name!r}; known: {', '.join(sorted(types))}")
    want = types[name]
    try:
        if want is bool:
            if isinstance(raw, str):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                return raw.lower() in ("1", "true", "yes")
            return bool(raw)
        return want(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be {want.__name__}, got {raw!r}") from None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from e
    return {k: _coerce(k, v, str(path)) for k, v in data.items()}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for key, raw in env.items():
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG":
            name = key[len(ENV_PREFIX):].lower()
            out[name] = _coerce(name, raw, f"environment variable {key}")
    return out

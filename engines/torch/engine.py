"""`TorchEngine`: the built-in engine, a Llama-family decoder on paged KV caches on one or more devices.

The engine executes the calls of the contract (engines/base.py) and keeps each request's state
(`SequenceState`); where it computes is `placement`, what the model is `models`, the rules of a
chunked prefill `chunked_prefill`, and the KV pools and moves between them `KVTiers`.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from engines.base import (
    HOST, IN_FLIGHT, CallTiming, Capabilities, DeviceInfo, Engine, EngineError, EngineInfo, ModelInfo,
    OutOfKVBlocks, PrefillChunk, PrefillRequest, StepResult, TransferHandle, check_new_prompts,
)
from engines.manifest import Manifest, ManifestError
from engines.torch.attention import ATTENTION_PATHS
from engines.torch.chunked_prefill import chunk_sampling, check_chunks, commit_mixed, undo_reservations
from engines.torch.cpu_kernels import unavailable as cpu_kernels_unavailable
from engines.torch.cpu_threads import release_thread_pool
from engines.torch.forward_batch import ForwardBatch, build_batch
from engines.torch.kv_cache import HostKVPool
from engines.torch.kv_tiers import KVTiers
from engines.torch.models import architecture, config_from_dir
from engines.torch.packed_linear import pack_model, packing_available
from engines.torch.placement import place_devices, resolve_tiers
from engines.torch.sampler import make_generator, sample_with_logprobs
from engines.torch.sequence import SequenceState
from engines.torch.step_cost import read_step_costs
from engines.torch.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

DEFAULT_KV_SEQS = 8
"""Without an explicit kv_blocks, each device's pool holds this many sequences of max_seq_len tokens."""


def resolve_attention(attention: str, device: torch.device) -> str:
    """The path "auto" means on this device; EngineError for "paged" where it cannot run."""
    cpu = device.type == "cpu"
    if attention == "auto":
        return ("paged" if cpu_kernels_unavailable() is None else "varlen") if cpu else "padded"
    if attention == "paged" and not cpu:
        raise EngineError(f"attention 'paged' runs on a CPU only, not on {device}; use 'varlen' or 'padded'")
    if attention == "paged" and (why := cpu_kernels_unavailable()) is not None:
        raise EngineError(f"attention 'paged': the CPU kernels could not be built ({why}); use 'varlen'")
    return attention


class TorchEngine(Engine):
    """A real decoder on one or more devices (CPU or CUDA), each with a paged KV cache, and an
    optional host pool; `move` copies KV between any two of them.

    model_dir: a Hugging Face checkpoint directory (config.json + safetensors).
    device: the decode device: "auto" (cuda:0 if available, else cpu), "cpu" or "cuda:N".
    helper_devices: further devices that can prefill and hold KV (peer copies to and from the
        decode device), e.g. ("cuda:1",); "cpu:N" adds a CPU tier with its own pool. Every device
        name must be distinct. Weights are loaded once per torch device.
    dtype: compute and KV dtype, "float32" or "bfloat16".
    block_size: tokens per KV block.
    kv_blocks: blocks in each device's pool; None sizes it for DEFAULT_KV_SEQS full-length sequences.
    host_kv_blocks: blocks in the host pool that `move` offloads to (pinned memory when a device
        is a GPU); 0 means no host pool and can_offload=False.
    max_seq_len: longest KV (prompt + generated) per request; None -> max_position_embeddings.
    architecture_check: False accepts an unlisted architecture and runs it as a Llama decoder.
    attention: how a forward lays out its tokens and reads the KV cache (engines/torch/attention.py):
        "paged" (as varlen, with decode attention read straight from the cache blocks by a compiled
        CPU kernel, engines/torch/cpu_kernels.py; CPU only), "varlen" (real tokens only;
        attention cost follows each sequence's KV length), "padded"
        (every run padded to the longest, attention over the longest KV: the layout before issue 15,
        kept as a fallback and benchmark baseline), or "auto": paged on a CPU (varlen where the
        kernels cannot be built), padded on a GPU (the others are not yet measured on a GPU).
    prepack: on a CPU in bfloat16 with native bfloat16, multiply by weights prepacked for oneDNN
        (engines/torch/packed_linear.py); False keeps plain F.linear (the benchmark baseline).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        helper_devices: Sequence[str] = (),
        dtype: str = "float32",
        block_size: int = 16,
        kv_blocks: int | None = None,
        host_kv_blocks: int = 0,
        max_seq_len: int | None = None,
        architecture_check: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        bos_token_id: int | None = None,
        attention: str = "auto",
        prepack: bool = True,
    ):
        if dtype not in DTYPES:
            raise EngineError(f"dtype {dtype!r} is not supported by the torch engine; use one of {list(DTYPES)}")
        if host_kv_blocks < 0:
            raise EngineError(f"host_kv_blocks must be >= 0 (0: no host pool), got {host_kv_blocks}")
        if attention not in ("auto", *ATTENTION_PATHS):
            raise EngineError(f"attention {attention!r} is not a path of the torch engine; use 'auto' or one of "
                              f"{list(ATTENTION_PATHS)}")
        self.cfg = config_from_dir(model_dir, check_architecture=architecture_check)
        """The model's shape and constants, from config.json."""
        tiers = resolve_tiers(device, helper_devices)
        self.dtype_name = dtype
        self.max_seq_len = max_seq_len or self.cfg.max_position_embeddings
        if self.max_seq_len <= 0:
            raise EngineError(f"max_seq_len must be > 0, got {self.max_seq_len}")
        if self.max_seq_len > self.cfg.max_position_embeddings:
            raise EngineError(
                f"max_seq_len {self.max_seq_len} exceeds max_position_embeddings "
                f"{self.cfg.max_position_embeddings} in {Path(model_dir) / 'config.json'}"
            )
        window = self.cfg.sliding_window
        if window is not None and window < self.max_seq_len:
            warnings.warn(
                f"{Path(model_dir) / 'config.json'}: sliding_window={window} is not implemented (attention is "
                f"full), so outputs past {window} tokens differ from the reference model; "
                f"pass max_seq_len<={window} to stay exact",
                stacklevel=2,
            )
        if kv_blocks is None:
            kv_blocks = -(-DEFAULT_KV_SEQS * self.max_seq_len // block_size)
        weights = load_weights(model_dir, self.cfg, DTYPES[dtype], next(iter(tiers.values())))
        self.num_params = sum(t.numel() for t in weights.values())
        self._devices = place_devices(architecture(self.cfg.architecture), self.cfg, weights, tiers, DTYPES[dtype],
                                      block_size, kv_blocks)
        """Decode device first, then the helpers."""
        del weights
        for d in self._devices.values():
            if prepack and packing_available(d.device, DTYPES[dtype]):
                pack_model(d.model)
        self._decode = next(iter(self._devices.values()))
        self.device, self.model, self.cache = self._decode.device, self._decode.model, self._decode.cache
        self.attention = resolve_attention(attention, self.device)
        """The attention path every forward takes ("paged", "varlen" or "padded")."""
        self._step_costs = read_step_costs(model_dir, self.device.type, dtype, self.attention)
        """Fitted step costs of this device and dtype, from the directory's step_cost.json (step_cost.py)."""
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids else self.cfg.eos_token_ids
        self.bos_token_id = bos_token_id if bos_token_id is not None else self.cfg.bos_token_id
        self._seqs: dict[str, SequenceState] = {}
        self._has_gpu = any(d.device.type == "cuda" for d in self._devices.values())
        self.host_pool: HostKVPool | None = None
        if host_kv_blocks:
            self.host_pool = HostKVPool(num_blocks=host_kv_blocks, like=self.cache, pin_memory=self._has_gpu)
        pools = [d.cache for d in self._devices.values()] + ([self.host_pool] if self.host_pool else [])
        self._tiers = KVTiers(pools)
        # The server runs the steps on another thread than this one (cpu_threads.py).
        release_thread_pool()

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, manifest: Manifest, device: str = "auto",
                        dtype: str | None = None, kv_blocks: int | None = None,
                        host_kv_blocks: int | None = None, helper_devices: Sequence[str] = (),
                        attention: str | None = None) -> "TorchEngine":
        """Open an engine directory built by `make build-engine` (see engines/loader.py).

        kv_blocks and host_kv_blocks override the manifest's kv_blocks_device and kv_blocks_host;
        attention overrides the manifest's extra "attention" (default "auto")."""
        cfg = config_from_dir(engine_dir)
        if cfg.architecture != manifest.architecture:
            raise ManifestError(
                f"{Path(engine_dir) / 'manifest.json'}: architecture {manifest.architecture!r} disagrees with "
                f"config.json's {cfg.architecture!r}; rebuild the engine"
            )
        engine = cls(
            engine_dir, device=device, helper_devices=helper_devices, dtype=dtype or manifest.dtype,
            block_size=manifest.kv_block_size, kv_blocks=kv_blocks or manifest.kv_blocks_device,
            host_kv_blocks=manifest.kv_blocks_host if host_kv_blocks is None else host_kv_blocks,
            max_seq_len=manifest.max_seq_len,
            eos_token_ids=manifest.eos_token_ids, bos_token_id=manifest.bos_token_id,
            attention=attention or manifest.extra.get("attention", "auto"),
        )
        # The build sized the pool from bytes_per_block; a different figure here means the
        # builder and the engine disagree on the KV geometry, so the memory budget is wrong.
        if engine.dtype_name == manifest.dtype and engine.cache.bytes_per_block != manifest.bytes_per_block:
            raise ManifestError(
                f"{Path(engine_dir) / 'manifest.json'}: bytes_per_block is {manifest.bytes_per_block} but the "
                f"torch engine's KV block is {engine.cache.bytes_per_block} bytes "
                "(2 * layers * kv_block_size * kv_heads * head_dim * dtype size); rebuild the engine"
            )
        return engine

    @property
    def tier(self) -> str:
        """The decode device's tier name: "cpu" or "cuda:N"."""
        return self._decode.tier

    def describe(self) -> EngineInfo:
        model = ModelInfo(
            architecture=self.cfg.architecture, vocab_size=self.cfg.vocab_size, max_seq_len=self.max_seq_len,
            num_layers=self.cfg.num_layers, num_kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim,
            dtype=self.dtype_name, num_params=self.num_params,
            eos_token_ids=self.eos_token_ids, bos_token_id=self.bos_token_id,
        )
        return EngineInfo(
            backend="torch",
            model=model,
            devices=tuple(DeviceInfo(d.tier, d.device.type, d.cache.allocator.num_blocks)
                          for d in self._devices.values()),
            block_size=self.cache.block_size,
            bytes_per_block=self.cache.bytes_per_block,
            host_blocks=self.host_pool.allocator.num_blocks if self.host_pool else 0,
            capabilities=self._capabilities(),
            step_costs=self._step_costs,
        )

    # -- prefill ---------------------------------------------------------------------------

    def prefill(self, requests: Sequence[PrefillRequest], device: str | None = None) -> StepResult:
        return self._run_prefill(requests, device)[0]

    @torch.inference_mode()
    def _run_prefill(self, requests: Sequence[PrefillRequest], device: str | None = None,
                     all_positions: bool = False) -> tuple[StepResult, torch.Tensor]:
        """`prefill`, also returning the float32 logits: [B, vocab] of each prompt's last token,
        or [B, longest prompt, vocab] of every position (pads hold zeros or garbage) when all_positions
        (the tests compare them with transformers: tests/engines/torch_probe.py)."""
        on = self._decode if device is None else self._devices.get(device)
        if on is None:
            raise EngineError(
                f"prefill on device {device!r}: this engine computes on {list(self._devices)}"
                + (" (prefill there, then move the KV to the host)" if device == HOST else "")
            )
        check_new_prompts(requests, self._seqs, self.max_seq_len, self.cfg.vocab_size, "prefill")
        if not requests:
            return self._empty("prefill"), torch.empty(0, self.cfg.vocab_size)
        ids = [r.request_id for r in requests]
        try:
            for r in requests:
                on.cache.reserve(r.request_id, len(r.prompt_ids))
        except OutOfKVBlocks:
            for i in ids:
                on.cache.release(i)
            raise
        start = self._clock(on.device)
        try:
            batch = self._batch(on.cache, ids, [r.prompt_ids for r in requests], [0] * len(ids), on.device)
            logits = on.model(batch, on.cache, all_logits=all_positions)
            if all_positions:
                last, logits = logits[batch.last], batch.per_run(logits)
            else:
                last = logits
            # Generators live on the decode device, which draws every later token: a seeded
            # request then gets the same tokens wherever it was prefilled.
            generators = [None if r.sampling.greedy else make_generator(r.sampling, self.device) for r in requests]
            histories = [(list(r.prompt_ids), len(r.prompt_ids)) if r.sampling.shapes_logits else None for r in requests]
            tokens, lps = sample_with_logprobs(last.to(self.device), [r.sampling for r in requests], generators,
                                               histories)
        except Exception:
            for i in ids:
                on.cache.release(i)
            raise
        seconds = self._clock(on.device) - start
        for r, tok, g in zip(requests, tokens, generators):
            seq = SequenceState(len(r.prompt_ids), None, r.sampling, g, len(r.prompt_ids),
                                list(r.prompt_ids) if r.sampling.shapes_logits else [])
            seq.record(tok)
            self._seqs[r.request_id] = seq
        lens = [len(r.prompt_ids) for r in requests]
        timing = CallTiming("prefill", seconds, len(ids), sum(lens), sum(lens), max(lens))
        return StepResult(dict(zip(ids, tokens)), timing, _asked(ids, lps)), logits

    # -- decode ----------------------------------------------------------------------------

    def decode(self, request_ids: Sequence[str]) -> StepResult:
        return self._run_decode(request_ids)[0]

    @torch.inference_mode()
    def _run_decode(self, request_ids: Sequence[str]) -> tuple[StepResult, torch.Tensor]:
        """`decode`, also returning the float32 logits [B, vocab] the tokens were sampled from."""
        ids = list(request_ids)
        self._check_decodable(ids, "decode")
        if not ids:
            return self._empty("decode"), torch.empty(0, self.cfg.vocab_size)
        seqs = [self._seqs[i] for i in ids]
        for i, s in zip(ids, seqs):
            self.cache.reserve(i, s.kv_len + 1)
        start = self._clock(self.device)
        batch = self._batch(self.cache, ids, [[s.last_token] for s in seqs], [s.kv_len for s in seqs], self.device)
        logits = self.model(batch, self.cache)
        tokens, lps = sample_with_logprobs(logits, [s.sampling for s in seqs], [s.generator for s in seqs],
                                           [s.history() for s in seqs])
        seconds = self._clock(self.device) - start
        for s, tok in zip(seqs, tokens):
            s.kv_len += 1
            s.record(tok)
        kv = [s.kv_len for s in seqs]
        timing = CallTiming("decode", seconds, len(ids), len(ids), sum(kv), max(kv))
        return StepResult(dict(zip(ids, tokens)), timing, _asked(ids, lps)), logits

    def _check_decodable(self, ids: list[str], op: str) -> None:
        """Refuse, before anything changes, requests that cannot take one more decode step here."""
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise EngineError(f"{op}: request ids appear more than once: {repeated}")
        unknown = [i for i in ids if i not in self._seqs]
        if unknown:
            raise EngineError(f"{op}: unknown request ids {unknown[:5]}; prefill them first (or they were freed)")
        pending = [(i, self._seqs[i]) for i in ids if self._seqs[i].last_token is None]
        if pending:
            done = ", ".join(f"{i!r} has {s.kv_len} of {s.prompt_len}" for i, s in pending[:5])
            raise EngineError(f"{op}: requests {[i for i, _ in pending[:5]]} are still prefilling their prompts in "
                              f"chunks ({done} prompt tokens); run their remaining chunks before decoding them")
        elsewhere = [(i, self.tier_of(i)) for i in ids if self.tier_of(i) != self.tier]
        if elsewhere:
            where = ", ".join(f"{i!r} is {IN_FLIGHT} (wait on its move)" if t == IN_FLIGHT else f"{i!r} is in {t!r}"
                              for i, t in elsewhere[:5])
            raise EngineError(f"{op}: KV must be on {self.tier!r} to decode, but {where}; move it back first")
        full = [i for i in ids if self._seqs[i].kv_len + 1 > self.max_seq_len]
        if full:
            raise EngineError(
                f"{op}: requests {full[:5]} already hold max_seq_len={self.max_seq_len} tokens of KV; "
                "finish them (length limit) before decoding again"
            )

    # -- mixed steps (chunked prefill) -----------------------------------------------------

    def mixed_step(self, request_ids: Sequence[str], chunks: Sequence[PrefillChunk]) -> StepResult:
        return self._run_mixed(request_ids, chunks)[0]

    @torch.inference_mode()
    def _run_mixed(self, request_ids: Sequence[str],
                   chunks: Sequence[PrefillChunk]) -> tuple[StepResult, torch.Tensor]:
        """`mixed_step`, also returning the float32 logits [B, vocab] of each sequence's last
        position: the decoded requests first, then the chunks, in call order.

        One forward on the decode device: a decoded request is a run of one token at its KV
        length, a chunk a run of prompt tokens at positions [start, end) that attends to the KV
        its earlier chunks left in the cache. Any failure once blocks are reserved gives them back
        (`undo_reservations`), so a failed step changes nothing either; see chunked_prefill."""
        ids, chunks = list(request_ids), list(chunks)
        self._check_decodable(ids, "mixed_step")
        check_chunks(chunks, self._seqs, self.tier_of, self.tier, self.max_seq_len, self.cfg.vocab_size)
        if not ids and not chunks:
            return self._empty("mixed"), torch.empty(0, self.cfg.vocab_size)
        decoding = [self._seqs[i] for i in ids]
        chunk_ids = [c.request.request_id for c in chunks]
        new = [c.request.request_id for c in chunks if c.start == 0]
        held = {i: len(self.cache.tables[i]) for i in ids + chunk_ids if i not in new}
        states = [chunk_sampling(c, self._seqs, self.device) for c in chunks]
        try:
            for i, s in zip(ids, decoding):
                self.cache.reserve(i, s.kv_len + 1)
            for c in chunks:
                self.cache.reserve(c.request.request_id, c.end)
            start = self._clock(self.device)
            runs = [[s.last_token] for s in decoding] + [c.request.prompt_ids[c.start:c.end] for c in chunks]
            starts = [s.kv_len for s in decoding] + [c.start for c in chunks]
            logits = self.model(self._batch(self.cache, ids + chunk_ids, runs, starts, self.device), self.cache)
            # Unfinished chunks sample nothing: drawing from their generators now would shift
            # every later token of a seeded request away from what a whole prefill gives it.
            rows = list(range(len(ids))) + [len(ids) + k for k, c in enumerate(chunks) if c.last]
            params = [s.sampling for s in decoding] + [p for (p, _), c in zip(states, chunks) if c.last]
            generators = [s.generator for s in decoding] + [g for (_, g), c in zip(states, chunks) if c.last]
            histories = [s.history() for s in decoding] + [
                (list(c.request.prompt_ids), len(c.request.prompt_ids)) if p.shapes_logits else None
                for (p, _), c in zip(states, chunks) if c.last]
            tokens, lps = sample_with_logprobs(logits[rows], params, generators, histories)
        except Exception:
            undo_reservations(self.cache, held, new)
            raise
        seconds = self._clock(self.device) - start
        out = commit_mixed(self._seqs, ids, decoding, chunks, states, tokens)
        kv = [s.kv_len for s in decoding] + [c.end for c in chunks]
        num_tokens = len(ids) + sum(c.end - c.start for c in chunks)
        timing = CallTiming("mixed", seconds, len(ids) + len(chunks), num_tokens, sum(kv), max(kv))
        return StepResult(out, timing, _asked(ids + [c.request.request_id for c in chunks if c.last], lps)), logits

    # -- KV tiers --------------------------------------------------------------------------

    def move(self, request_ids: Sequence[str], src: str, dst: str) -> TransferHandle:
        """Start copying these requests' KV from tier `src` to `dst`: any two of the devices and
        HOST (device to device needs 2+ devices, HOST a host pool).

        Destination blocks are taken now, all-or-nothing (OutOfKVBlocks changes nothing); until
        `poll` or `wait` sees the copy finish the requests are IN_FLIGHT: they hold blocks in both
        tiers and cannot be decoded or moved. Then the source blocks are released."""
        caps = self._capabilities()
        if not (caps.can_offload or caps.can_peer_copy) or (HOST in (src, dst) and not caps.can_offload):
            return super().move(request_ids, src, dst)
        return self._tiers.start(request_ids, src, dst)

    def poll(self, handle: TransferHandle) -> bool:
        return self._tiers.poll(handle)

    def wait(self, handle: TransferHandle, timeout: float | None = None) -> None:
        caps = self._capabilities()
        if not (caps.can_offload or caps.can_peer_copy):
            super().wait(handle, timeout)
        self._tiers.wait(handle, timeout)

    def abandon(self, handle: TransferHandle) -> str:
        return self._tiers.abandon(handle)

    def inject_copy_fault(self, fault: str, hang_s: float = 0.0) -> None:
        """Fault injection (engines/faults.py): the next KV copy fails ("error") or hangs for
        `hang_s` seconds and then fails ("hang"); see BlockCopier.inject."""
        self._tiers.copier.inject(fault, hang_s)

    def tier_of(self, request_id: str) -> str:
        """Where the request's KV is: a device's name, HOST, or IN_FLIGHT during a move."""
        if request_id not in self._seqs:
            raise EngineError(f"tier_of: unknown request id {request_id!r}")
        return self._tiers.tier_of(request_id)

    # -- bookkeeping -----------------------------------------------------------------------

    def free(self, request_ids: Sequence[str]) -> None:
        """Release the requests' blocks in every tier (mid-move: held until the copy ends, see KVTiers)."""
        for rid in dict.fromkeys(request_ids):  # a repeated id must not free twice
            self._tiers.release(rid)
            self._seqs.pop(rid, None)

    def kv_blocks_used(self, tier: str) -> int:
        return self._tiers.used(tier)

    def close(self) -> None:
        self._tiers.close()
        self._seqs.clear()
        self._devices.clear()
        self.host_pool = None
        del self.model, self.cache, self._decode
        if self._has_gpu:
            torch.cuda.empty_cache()

    def _capabilities(self) -> Capabilities:
        return Capabilities(can_offload=self.host_pool is not None, can_peer_copy=len(self._devices) >= 2,
                            can_form_batches=True, can_chunk_prefill=True, can_shape_logits=True,
                            can_return_logprobs=True)

    def _batch(self, cache, ids: list[str], runs: list, starts: list[int], device: torch.device) -> ForwardBatch:
        return build_batch(cache, ids, runs, starts, device, self.attention, self.cfg.q_per_kv)

    def _clock(self, device: torch.device) -> float:
        # CUDA kernels run asynchronously: synchronise so the time covers the work, not the launch.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _empty(self, op: str) -> StepResult:
        return StepResult({}, CallTiming(op, 0.0, 0, 0, 0, 0))


def _asked(ids: Sequence[str], logprobs: Sequence[float | None]) -> dict[str, float]:
    """The log probabilities of the requests that asked for them, by request id."""
    return {rid: lp for rid, lp in zip(ids, logprobs) if lp is not None}

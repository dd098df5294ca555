"""`TorchEngine`: the built-in engine, a Llama-family decoder on one device's paged KV cache."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from engines.base import (
    HOST, CallTiming, Capabilities, DeviceInfo, Engine, EngineError, EngineInfo, ModelInfo,
    OutOfKVBlocks, PrefillRequest, SamplingParams, StepResult,
)
from engines.manifest import Manifest, ManifestError
from engines.torch.forward_batch import decode_batch, prefill_batch
from engines.torch.kv_cache import PagedKVCache
from engines.torch.model import CausalLM
from engines.torch.model_config import ModelConfig
from engines.torch.sampler import make_generator, sample
from engines.torch.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

DEFAULT_KV_SEQS = 8
"""Without an explicit kv_blocks, the pool holds this many sequences of max_seq_len tokens."""


@dataclass(slots=True)
class _Sequence:
    """What the engine remembers about one request between calls."""

    kv_len: int
    """Tokens whose K/V are in the cache."""
    last_token: int
    """Sampled but not yet fed: the input of the next decode step."""
    sampling: SamplingParams
    generator: torch.Generator | None


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda:0 when CUDA is available, else cpu; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
        d = torch.device("cuda", d.index or 0)
    elif d.type != "cpu":
        raise EngineError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda:N'")
    return d


class TorchEngine(Engine):
    """A real decoder on one device (CPU or CUDA) with a paged KV cache and no host pool.

    model_dir: a Hugging Face checkpoint directory (config.json + safetensors).
    device: "auto" (cuda:0 if available, else cpu), "cpu" or "cuda:N".
    dtype: compute and KV dtype, "float32" or "bfloat16".
    block_size: tokens per KV block.
    kv_blocks: blocks in the device pool; None sizes it for DEFAULT_KV_SEQS full-length sequences.
    max_seq_len: longest KV (prompt + generated) per request; None -> max_position_embeddings.
    architecture_check: False accepts an unlisted architecture and runs it as a Llama decoder.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "auto",
        dtype: str = "float32",
        block_size: int = 16,
        kv_blocks: int | None = None,
        max_seq_len: int | None = None,
        architecture_check: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        bos_token_id: int | None = None,
    ):
        if dtype not in DTYPES:
            raise EngineError(f"dtype {dtype!r} is not supported by the torch engine; use one of {list(DTYPES)}")
        self.cfg = ModelConfig.from_dir(model_dir, check_architecture=architecture_check)
        self.device = resolve_device(device)
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
        weights = load_weights(model_dir, self.cfg, DTYPES[dtype], self.device)
        self.num_params = sum(t.numel() for t in weights.values())
        self.model = CausalLM.from_weights(self.cfg, weights)
        if kv_blocks is None:
            kv_blocks = -(-DEFAULT_KV_SEQS * self.max_seq_len // block_size)
        self.cache = PagedKVCache(
            num_layers=self.cfg.num_layers, num_blocks=kv_blocks, block_size=block_size,
            num_kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim,
            dtype=DTYPES[dtype], device=self.device, tier=self.tier,
        )
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids else self.cfg.eos_token_ids
        self.bos_token_id = bos_token_id if bos_token_id is not None else self.cfg.bos_token_id
        self._seqs: dict[str, _Sequence] = {}

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, manifest: Manifest, device: str = "auto",
                        dtype: str | None = None, kv_blocks: int | None = None) -> "TorchEngine":
        """Open an engine directory built by `make build-engine` (see engines/loader.py)."""
        cfg = ModelConfig.from_dir(engine_dir)
        if cfg.architecture != manifest.architecture:
            raise ManifestError(
                f"{Path(engine_dir) / 'manifest.json'}: architecture {manifest.architecture!r} disagrees with "
                f"config.json's {cfg.architecture!r}; rebuild the engine"
            )
        engine = cls(
            engine_dir, device=device, dtype=dtype or manifest.dtype, block_size=manifest.kv_block_size,
            kv_blocks=kv_blocks or manifest.kv_blocks_device, max_seq_len=manifest.max_seq_len,
            eos_token_ids=manifest.eos_token_ids, bos_token_id=manifest.bos_token_id,
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
        """This engine's device tier name: "cpu" or "cuda:N"."""
        return "cpu" if self.device.type == "cpu" else f"cuda:{self.device.index}"

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
            devices=(DeviceInfo(self.tier, self.device.type, self.cache.allocator.num_blocks),),
            block_size=self.cache.block_size,
            bytes_per_block=self.cache.bytes_per_block,
            host_blocks=0,
            capabilities=Capabilities(can_offload=False, can_peer_copy=False, can_form_batches=True),
        )

    # -- prefill ---------------------------------------------------------------------------

    def prefill(self, requests: Sequence[PrefillRequest], device: str | None = None) -> StepResult:
        return self.prefill_with_logits(requests, device)[0]

    @torch.inference_mode()
    def prefill_with_logits(self, requests: Sequence[PrefillRequest], device: str | None = None,
                            all_positions: bool = False) -> tuple[StepResult, torch.Tensor]:
        """`prefill`, also returning the float32 logits: [B, vocab] of each prompt's last token,
        or [B, longest prompt, vocab] of every position (pads hold garbage) when all_positions."""
        if device is not None and device != self.tier:
            raise EngineError(f"prefill on device {device!r}: this engine only has {self.tier!r}")
        self._check_new(requests)
        if not requests:
            return self._empty("prefill"), torch.empty(0, self.cfg.vocab_size)
        ids = [r.request_id for r in requests]
        try:
            for r in requests:
                self.cache.reserve(r.request_id, len(r.prompt_ids))
        except OutOfKVBlocks:
            for i in ids:
                self.cache.release(i)
            raise
        start = self._clock()
        try:
            batch = prefill_batch(self.cache, ids, [r.prompt_ids for r in requests], self.device)
            logits = self.model(batch, self.cache, all_logits=all_positions)
            last = logits[torch.arange(len(ids), device=logits.device), batch.last] if all_positions else logits
            generators = [None if r.sampling.greedy else make_generator(r.sampling, self.device) for r in requests]
            tokens = sample(last, [r.sampling for r in requests], generators)
        except Exception:
            for i in ids:
                self.cache.release(i)
            raise
        seconds = self._clock() - start
        for r, tok, g in zip(requests, tokens, generators):
            self._seqs[r.request_id] = _Sequence(len(r.prompt_ids), tok, r.sampling, g)
        lens = [len(r.prompt_ids) for r in requests]
        timing = CallTiming("prefill", seconds, len(ids), sum(lens), sum(lens), max(lens))
        return StepResult(dict(zip(ids, tokens)), timing), logits

    def _check_new(self, requests: Sequence[PrefillRequest]) -> None:
        seen: set[str] = set()
        for r in requests:
            rid = r.request_id
            if rid in seen or rid in self._seqs:
                raise EngineError(f"prefill: request id {rid!r} is already in use; free it first or pick a new id")
            seen.add(rid)
            n = len(r.prompt_ids)
            if n == 0:
                raise EngineError(f"prefill: request {rid!r} has an empty prompt")
            if n > self.max_seq_len:
                raise EngineError(
                    f"prefill: request {rid!r} has a {n}-token prompt, longer than max_seq_len={self.max_seq_len}; "
                    "truncate the prompt or rebuild the engine with a larger max_seq_len"
                )
            bad = [t for t in r.prompt_ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise EngineError(f"prefill: request {rid!r} has token ids outside [0, {self.cfg.vocab_size}): {bad[:5]}")

    # -- decode ----------------------------------------------------------------------------

    def decode(self, request_ids: Sequence[str]) -> StepResult:
        return self.decode_with_logits(request_ids)[0]

    @torch.inference_mode()
    def decode_with_logits(self, request_ids: Sequence[str]) -> tuple[StepResult, torch.Tensor]:
        """`decode`, also returning the float32 logits [B, vocab] the tokens were sampled from."""
        ids = list(request_ids)
        if len(set(ids)) != len(ids):
            raise EngineError(f"decode: request ids appear more than once: {sorted({i for i in ids if ids.count(i) > 1})}")
        unknown = [i for i in ids if i not in self._seqs]
        if unknown:
            raise EngineError(f"decode: unknown request ids {unknown[:5]}; prefill them first (or they were freed)")
        if not ids:
            return self._empty("decode"), torch.empty(0, self.cfg.vocab_size)
        seqs = [self._seqs[i] for i in ids]
        full = [i for i, s in zip(ids, seqs) if s.kv_len + 1 > self.max_seq_len]
        if full:
            raise EngineError(
                f"decode: requests {full[:5]} already hold max_seq_len={self.max_seq_len} tokens of KV; "
                "finish them (length limit) before decoding again"
            )
        for i, s in zip(ids, seqs):
            self.cache.reserve(i, s.kv_len + 1)
        start = self._clock()
        batch = decode_batch(self.cache, ids, [s.last_token for s in seqs], [s.kv_len for s in seqs], self.device)
        logits = self.model(batch, self.cache)
        tokens = sample(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        seconds = self._clock() - start
        for s, tok in zip(seqs, tokens):
            s.kv_len += 1
            s.last_token = tok
        kv = [s.kv_len for s in seqs]
        timing = CallTiming("decode", seconds, len(ids), len(ids), sum(kv), max(kv))
        return StepResult(dict(zip(ids, tokens)), timing), logits

    # -- bookkeeping -----------------------------------------------------------------------

    def free(self, request_ids: Sequence[str]) -> None:
        for rid in dict.fromkeys(request_ids):  # a repeated id must not free twice
            self._seqs.pop(rid, None)
            self.cache.release(rid)

    def kv_blocks_used(self, tier: str) -> int:
        if tier == self.tier:
            return self.cache.allocator.used
        if tier == HOST:
            return 0
        raise KeyError(f"unknown KV tier {tier!r}; known: {[self.tier, HOST]}")

    def kv_len(self, request_id: str) -> int:
        """Tokens of KV the request holds now."""
        return self._seqs[request_id].kv_len

    def close(self) -> None:
        self._seqs.clear()
        self.cache.tables.clear()
        del self.model, self.cache
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _clock(self) -> float:
        # CUDA kernels run asynchronously: synchronise so the time covers the work, not the launch.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _empty(self, op: str) -> StepResult:
        return StepResult({}, CallTiming(op, 0.0, 0, 0, 0, 0))

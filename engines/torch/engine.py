"""`TorchEngine`: the built-in engine, a Llama-family decoder on one device's paged KV cache."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from engines.base import (
    HOST, IN_FLIGHT, CallTiming, Capabilities, DeviceInfo, Engine, EngineError, EngineInfo, ModelInfo,
    OutOfKVBlocks, PrefillRequest, SamplingParams, StepResult, TransferHandle,
)
from engines.manifest import Manifest, ManifestError
from engines.torch.forward_batch import decode_batch, prefill_batch
from engines.torch.kv_cache import HostKVPool, KVBlockPool, PagedKVCache
from engines.torch.kv_transfer import BlockCopier, PendingCopy
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
    """Seeded sampling state; it stays here while the KV moves, so offloading changes no token."""
    tier: str
    """Tier holding the KV (the device's name or HOST); see `_in_flight` for moves under way."""


@dataclass(slots=True)
class _Transfer:
    """A started `move`: both tiers hold blocks of its requests until it is finished."""

    handle: TransferHandle
    src: KVBlockPool
    dst: KVBlockPool
    copy: PendingCopy
    started: float
    """time.perf_counter() when `move` started the copy."""


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
    """A real decoder on one device (CPU or CUDA) with a paged KV cache and an optional host pool.

    model_dir: a Hugging Face checkpoint directory (config.json + safetensors).
    device: "auto" (cuda:0 if available, else cpu), "cpu" or "cuda:N".
    dtype: compute and KV dtype, "float32" or "bfloat16".
    block_size: tokens per KV block.
    kv_blocks: blocks in the device pool; None sizes it for DEFAULT_KV_SEQS full-length sequences.
    host_kv_blocks: blocks in the host pool that `move` offloads to (pinned memory when the device
        is a GPU); 0 means no host pool and can_offload=False.
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
        host_kv_blocks: int = 0,
        max_seq_len: int | None = None,
        architecture_check: bool = True,
        eos_token_ids: Sequence[int] | None = None,
        bos_token_id: int | None = None,
    ):
        if dtype not in DTYPES:
            raise EngineError(f"dtype {dtype!r} is not supported by the torch engine; use one of {list(DTYPES)}")
        if host_kv_blocks < 0:
            raise EngineError(f"host_kv_blocks must be >= 0 (0: no host pool), got {host_kv_blocks}")
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
        self.host_pool: HostKVPool | None = None
        self._copier: BlockCopier | None = None
        if host_kv_blocks:
            self.host_pool = HostKVPool(num_blocks=host_kv_blocks, like=self.cache,
                                        pin_memory=self.device.type == "cuda")
            self._copier = BlockCopier(self.cache, self.host_pool)
        self._transfers: dict[int, _Transfer] = {}
        """Unfinished moves by handle id."""
        self._in_flight: dict[str, _Transfer] = {}
        """Unfinished moves by request id."""

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, manifest: Manifest, device: str = "auto",
                        dtype: str | None = None, kv_blocks: int | None = None,
                        host_kv_blocks: int | None = None) -> "TorchEngine":
        """Open an engine directory built by `make build-engine` (see engines/loader.py).

        kv_blocks and host_kv_blocks override the manifest's kv_blocks_device and kv_blocks_host."""
        cfg = ModelConfig.from_dir(engine_dir)
        if cfg.architecture != manifest.architecture:
            raise ManifestError(
                f"{Path(engine_dir) / 'manifest.json'}: architecture {manifest.architecture!r} disagrees with "
                f"config.json's {cfg.architecture!r}; rebuild the engine"
            )
        engine = cls(
            engine_dir, device=device, dtype=dtype or manifest.dtype, block_size=manifest.kv_block_size,
            kv_blocks=kv_blocks or manifest.kv_blocks_device,
            host_kv_blocks=manifest.kv_blocks_host if host_kv_blocks is None else host_kv_blocks,
            max_seq_len=manifest.max_seq_len,
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
            host_blocks=self.host_pool.allocator.num_blocks if self.host_pool else 0,
            capabilities=Capabilities(can_offload=self.host_pool is not None, can_peer_copy=False,
                                      can_form_batches=True),
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
            raise EngineError(
                f"prefill on device {device!r}: this engine computes only on {self.tier!r}"
                + (" (prefill there, then move the KV to the host)" if device == HOST else "")
            )
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
            self._seqs[r.request_id] = _Sequence(len(r.prompt_ids), tok, r.sampling, g, self.tier)
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
        elsewhere = [(i, self.tier_of(i)) for i in ids if self.tier_of(i) != self.tier]
        if elsewhere:
            where = ", ".join(f"{i!r} is {IN_FLIGHT} (wait on its move)" if t == IN_FLIGHT else f"{i!r} is in {t!r}"
                              for i, t in elsewhere[:5])
            raise EngineError(f"decode: KV must be on {self.tier!r} to decode, but {where}; move it back first")
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

    # -- KV tiers --------------------------------------------------------------------------

    def move(self, request_ids: Sequence[str], src: str, dst: str) -> TransferHandle:
        """Start copying these requests' KV from tier `src` to `dst` (the device and HOST).

        Destination blocks are taken now, all-or-nothing (OutOfKVBlocks changes nothing); until
        `poll` or `wait` sees the copy finish the requests are IN_FLIGHT: they hold blocks in both
        tiers and cannot be decoded or moved. Then the source blocks are released."""
        if self.host_pool is None:
            return super().move(request_ids, src, dst)
        pools = {self.tier: self.cache, HOST: self.host_pool}
        for tier in (src, dst):
            if tier not in pools:
                raise EngineError(f"move: unknown KV tier {tier!r}; this engine has {list(pools)}")
        if src == dst:
            raise EngineError(f"move: source and destination are both {src!r}")
        ids = list(request_ids)
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise EngineError(f"move: request ids appear more than once: {repeated}")
        unknown = [i for i in ids if i not in self._seqs]
        if unknown:
            raise EngineError(f"move: unknown request ids {unknown[:5]}; prefill them first (or they were freed)")
        elsewhere = [(i, self.tier_of(i)) for i in ids if self.tier_of(i) != src]
        if elsewhere:
            where = ", ".join(f"{i!r} is {t}" if t == IN_FLIGHT else f"{i!r} is in {t!r}" for i, t in elsewhere[:5])
            raise EngineError(f"move from {src!r}: {where}")
        handle = TransferHandle(tuple(ids), src, dst)
        if not ids:
            return handle
        source, target = pools[src], pools[dst]
        src_blocks = [source.tables[i] for i in ids]
        try:
            flat_dst = target.allocator.allocate(sum(len(t) for t in src_blocks))
        except OutOfKVBlocks as e:
            raise OutOfKVBlocks(f"move {ids[:5]} from {src!r} to {dst!r}: {e}") from None
        at = 0
        for rid, table in zip(ids, src_blocks):
            target.adopt(rid, flat_dst[at:at + len(table)])
            at += len(table)
        flat_src = [b for t in src_blocks for b in t]
        device_blocks, host_blocks = (flat_src, flat_dst) if dst == HOST else (flat_dst, flat_src)
        started = time.perf_counter()
        try:
            copy = self._copier.start(device_blocks, host_blocks, to_host=dst == HOST)
        except Exception:
            for rid in ids:
                target.release(rid)
            raise
        handle.bytes = len(flat_src) * self.cache.bytes_per_block
        transfer = _Transfer(handle, source, target, copy, started)
        self._transfers[handle.id] = transfer
        for rid in ids:
            self._in_flight[rid] = transfer
        return handle

    def poll(self, handle: TransferHandle) -> bool:
        transfer = self._transfers.get(handle.id)
        if transfer is None:
            return True  # finished earlier (or moved nothing)
        if not transfer.copy.done():
            return False
        self._finish(transfer)
        return True

    def wait(self, handle: TransferHandle) -> None:
        if self.host_pool is None:
            super().wait(handle)
        transfer = self._transfers.get(handle.id)
        if transfer is not None:
            self._finish(transfer)

    def _finish(self, transfer: _Transfer) -> None:
        """Wait for the copy, then release the source blocks (or, if it failed, the destination's)."""
        handle = transfer.handle
        del self._transfers[handle.id]
        for rid in handle.request_ids:
            del self._in_flight[rid]
        try:
            transfer.copy.wait()
        except Exception as e:
            for rid in handle.request_ids:
                transfer.dst.release(rid)
            raise EngineError(f"move {list(handle.request_ids)[:5]} from {handle.src!r} to {handle.dst!r} "
                              f"failed; the KV stays in {handle.src!r}: {e}") from e
        handle.seconds = time.perf_counter() - transfer.started
        for rid in handle.request_ids:
            transfer.src.release(rid)
            self._seqs[rid].tier = handle.dst

    def tier_of(self, request_id: str) -> str:
        """Where the request's KV is: the device's name, HOST, or IN_FLIGHT during a move."""
        if request_id in self._in_flight:
            return IN_FLIGHT
        seq = self._seqs.get(request_id)
        if seq is None:
            raise EngineError(f"tier_of: unknown request id {request_id!r}")
        return seq.tier

    def kv_contents(self, request_id: str) -> torch.Tensor:
        """A CPU copy of the request's KV, [num_layers, 2 (K, V), kv_len, kv_heads, head_dim],
        read from whichever tier holds it (for tests and debugging)."""
        tier = self.tier_of(request_id)
        if tier == IN_FLIGHT:
            raise EngineError(f"kv_contents: request {request_id!r} is {IN_FLIGHT}; wait on its move first")
        pool = self.cache if tier == self.tier else self.host_pool
        blocks = pool.read_blocks(pool.tables[request_id]).movedim(0, 2)  # [L, 2, n, block, heads, dim]
        layers, two, n, block, heads, dim = blocks.shape
        return blocks.reshape(layers, two, n * block, heads, dim)[:, :, : self._seqs[request_id].kv_len].cpu()

    # -- bookkeeping -----------------------------------------------------------------------

    def free(self, request_ids: Sequence[str]) -> None:
        """Release the requests' blocks in every tier; a request in flight waits for its move."""
        for rid in dict.fromkeys(request_ids):  # a repeated id must not free twice
            transfer = self._in_flight.get(rid)
            if transfer is not None:
                try:
                    self._finish(transfer)
                except EngineError:
                    pass  # the failed move already gave back its destination blocks
            self._seqs.pop(rid, None)
            self.cache.release(rid)
            if self.host_pool is not None:
                self.host_pool.release(rid)

    def kv_blocks_used(self, tier: str) -> int:
        if tier == self.tier:
            return self.cache.allocator.used
        if tier == HOST:
            return self.host_pool.allocator.used if self.host_pool else 0
        raise KeyError(f"unknown KV tier {tier!r}; known: {[self.tier, HOST]}")

    def kv_len(self, request_id: str) -> int:
        """Tokens of KV the request holds now."""
        return self._seqs[request_id].kv_len

    def close(self) -> None:
        for transfer in list(self._transfers.values()):
            try:
                self._finish(transfer)
            except EngineError:
                pass
        if self._copier is not None:
            self._copier.close()
            self._copier = self.host_pool = None
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

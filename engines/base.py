"""The engine contract: what the orchestrator may ask of an execution backend.

An engine is a plan executor (DESIGN.md §4). The orchestrator decides which requests prefill,
which decode together and where their KV lives; the engine carries that out and reports tokens
and timings. Nothing here knows what a policy is, and nothing here imports torch.

Tier names: each device an engine drives has a name (``"cpu"``, ``"cuda:0"``...), and
``HOST`` names the host-memory block pool. A request's KV lives in exactly one tier, or is
``IN_FLIGHT`` between two while a `move` of it is unfinished.
"""
from __future__ import annotations

import abc
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Container, Sequence

HOST = "host"
IN_FLIGHT = "in_flight"


class EngineError(RuntimeError):
    """An engine call failed. A call refused before it ran (unknown or duplicate id, too long,
    bad token) changed nothing; after any other failure the orchestrator ends and frees the
    requests named in the call."""


class OutOfKVBlocks(EngineError):
    """A tier has no free KV block left for a request that needed one."""


class TransferTimedOut(EngineError):
    """`wait` with a timeout: the move has not finished by then. It goes on; wait or poll it
    again, or `abandon` it."""


class CapabilityError(NotImplementedError):
    """The engine does not offer an optional operation (see `Capabilities`)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the next token is chosen from the logits, per request."""

    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens before sampling; 0 disables the filter."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability mass reaches p (nucleus); 1 disables."""
    seed: int | None = None
    """Seed of this request's own random generator: the same seed gives the same tokens."""
    repetition_penalty: float = 1.0
    """Logits of tokens already in the sequence (prompt and output) divided by it where positive,
    multiplied where negative (transformers' RepetitionPenaltyLogitsProcessor); 1 disables."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI's, vLLM's)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (OpenAI's, vLLM's)."""
    min_tokens: int = 0
    """The tokens of `stop_ids` cannot be chosen before this many tokens are generated."""
    stop_ids: tuple[int, ...] = ()
    """The tokens that would end the request (its end_id, or the model's EOS tokens): what
    min_tokens holds back. The orchestrator fills it in."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    """Token sequences never generated: a word's last token is banned where the sequence ends
    with the rest of the word (transformers' NoBadWordsLogitsProcessor)."""
    logprobs: bool = False
    """Return the natural log of each chosen token's probability, in the distribution it was
    drawn from: the logits after the penalties, min_tokens and bad words, divided by the
    temperature (greedy: by 1), before top-k / top-p (TensorRT-LLM's `output_log_probs`)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number (0 disables it), got {getattr(self, name)}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if any(not w or min(w) < 0 for w in self.bad_words):
            raise ValueError("bad_words must be non-empty sequences of token ids >= 0")

    @property
    def shapes_logits(self) -> bool:
        """A penalty, a minimum length or bad words change the logits before the choice."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or (self.min_tokens > 0 and bool(self.stop_ids)) or bool(self.bad_words))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Optional operations; the orchestrator degrades instead of failing when one is absent."""

    can_offload: bool = False
    """`move` between a device and the host pool works."""
    can_peer_copy: bool = False
    """`move` between two devices works."""
    can_form_batches: bool = True
    """`decode` runs exactly the requests it is given (False: the engine batches on its own)."""
    can_chunk_prefill: bool = False
    """`mixed_step` works: one forward decodes a batch and prefills chunks of prompts
    (SplitFuse / Sarathi-style chunked prefill)."""
    can_overlap_prefill: bool = False
    """`start_prefill` on a device other than the decode device runs concurrently with decode
    steps (a disaggregated prefill device). False: it runs before the call returns."""
    can_shape_logits: bool = False
    """SamplingParams' penalties, min_tokens and bad_words are applied (False: the orchestrator
    refuses requests that set them)."""
    can_return_logprobs: bool = False
    """`SamplingParams.logprobs` is honoured: results carry each chosen token's log probability
    (False: the orchestrator refuses requests that ask)."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One device the engine computes on, and its KV block pool."""

    name: str
    """Tier name, e.g. "cpu" or "cuda:0"."""
    kind: str
    """"cpu" or "cuda"."""
    kv_blocks: int
    """KV blocks in this device's pool."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the orchestrator needs to know about the model, and nothing about its tensors."""

    architecture: str
    vocab_size: int
    max_seq_len: int
    """Longest KV (prompt + generated tokens) one request may reach."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    num_params: int
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None


@dataclass(frozen=True, slots=True)
class StepCost:
    """A fitted cost model of one decode step on one attention path of an engine:

        seconds ~ fixed + per_seq * B + padded_kv * B * max_kv + kv * sum_kv

    for B sequences whose longest KV is max_kv and whose KV lengths sum to sum_kv. Where
    padded_kv dominates, a step costs batch x longest and requests of one length belong together;
    where kv dominates, a step costs its real KV bytes and every free place is worth filling
    (DESIGN.md §7). Fitted by least squares on timed steps (bench/step_cost_profile.py), so a
    coefficient may come out slightly negative where its term explains nothing."""

    attention: str
    """The attention path it was fitted on, e.g. "varlen" or "padded" (torch engine)."""
    fixed: float
    """Seconds per step whatever its size (one pass over the weights, per-step overhead)."""
    per_seq: float
    """Seconds per sequence in the step (the weight matmuls grow with B)."""
    padded_kv: float
    """Seconds per token of B x max_kv: attention over KV padded to the longest."""
    kv: float
    """Seconds per token of sum_kv: attention over the real KV."""
    order_matters: bool = False
    """Whether the order of a batch's sequences changes the step's time (a GPU kernel that starts
    per-sequence work in launch order ends sooner with the longest first). False on a CPU path:
    its step runs every sequence's work to the end in any order."""
    r2: float | None = None
    """The fit's coefficient of determination on its own points."""
    points: int = 0
    """Timed steps the fit rests on."""
    fitted_on: str = ""
    """Where and when: machine, device, dtype, threads, date."""

    def seconds(self, batch: int, max_kv: int, sum_kv: int) -> float:
        """The predicted time of a step of `batch` sequences."""
        return self.fixed + self.per_seq * batch + self.padded_kv * batch * max_kv + self.kv * sum_kv

    def chunk_seconds(self, tokens: int, start: int = 0) -> float:
        """What `tokens` prompt tokens (positions start .. start + tokens) riding in a decode step
        add to it: their share of the linear layers (per_seq each; a chunk's attention over its
        prefix is not in the fit, so `start` changes nothing here)."""
        return self.per_seq * tokens

    def step_seconds(self, kv_lens: Sequence[int]) -> float:
        """The predicted time of a decode step over sequences of these KV lengths, in this order
        (0 for none). A policy calls this one: a cost model that sees the whole batch (the sim
        engine's, `engines/sim/step_cost.py`) answers the same question with the same name."""
        return self.seconds(len(kv_lens), max(kv_lens), sum(kv_lens)) if kv_lens else 0.0


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """`Engine.describe()`: devices, KV geometry per tier, capabilities, model."""

    backend: str
    model: ModelInfo
    devices: tuple[DeviceInfo, ...]
    block_size: int
    """Tokens per KV block."""
    bytes_per_block: int
    """Bytes of one KV block (all layers, K and V)."""
    host_blocks: int
    """Blocks in the host pool (0 when the engine cannot offload)."""
    capabilities: Capabilities = field(default_factory=Capabilities)
    step_costs: tuple[StepCost, ...] = ()
    """Fitted decode-step cost models, one per attention path the engine can run on its decode
    device and dtype; the first is the path it runs. Empty when none has been fitted."""

    @property
    def decode_device(self) -> str:
        return self.devices[0].name

    def blocks_for(self, tokens: int) -> int:
        """KV blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def tier_blocks(self, tier: str) -> int:
        if tier == HOST:
            return self.host_blocks
        for d in self.devices:
            if d.name == tier:
                return d.kv_blocks
        raise KeyError(f"unknown KV tier {tier!r}; known: {[d.name for d in self.devices] + [HOST]}")


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    """One prompt to prefill; the engine keeps its KV until `free`."""

    request_id: str
    prompt_ids: Sequence[int]
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int | None = None
    """The most tokens the request will generate, its first included (the client's max_tokens);
    None: up to the model's max_seq_len. An engine that reserves KV ahead (TensorRT-LLM's
    GUARANTEED_NO_EVICT reserves prompt + max_tokens on admission) reserves for this."""


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt positions [start, end) of one request, prefilled as part of a `mixed_step`. The
    chunk with start 0 registers the request (like `prefill`); chunks follow one another without
    gaps; the one ending at the prompt's length returns the request's first token."""

    request: PrefillRequest
    start: int
    end: int

    def __post_init__(self) -> None:
        n = len(self.request.prompt_ids)
        if not 0 <= self.start < self.end <= n:
            raise ValueError(f"chunk of {self.request.request_id!r}: need 0 <= start < end <= prompt length "
                             f"{n}, got [{self.start}, {self.end})")

    @property
    def last(self) -> bool:
        """This chunk completes the prompt: the step returns the request's first token."""
        return self.end == len(self.request.prompt_ids)


@dataclass(frozen=True, slots=True)
class CallTiming:
    """Wall time of one engine call and the work it did, for cost-model fitting."""

    op: str
    """"prefill", "decode", "mixed" (decode with prompt chunks) or "move"."""
    seconds: float
    num_seqs: int
    num_tokens: int
    """Tokens computed (prompt tokens for prefill, one per sequence for decode)."""
    kv_tokens: int
    """Sum of the KV lengths attended over: the prompt lengths for prefill; for decode, each
    sequence's KV length including the token fed this step."""
    max_kv: int
    """Longest KV length in the call."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """Next token of each request in the call, and its timing."""

    tokens: dict[str, int]
    timing: CallTiming
    logprobs: dict[str, float] = field(default_factory=dict)
    """Log probability of the token of each request that asked (`SamplingParams.logprobs`)."""


def check_new_prompts(requests: Sequence[PrefillRequest], in_use: Container[str], max_seq_len: int,
                      vocab_size: int, op: str = "prefill") -> None:
    """Refuse, before anything changes, prompts an engine cannot take: an id already in use (or
    twice in the call), an empty prompt, one longer than max_seq_len, a token outside the
    vocabulary. Every engine checks new prompts through this one function."""
    seen: set[str] = set()
    for r in requests:
        rid = r.request_id
        if rid in seen or rid in in_use:
            raise EngineError(f"{op}: request id {rid!r} is already in use; free it first or pick a new id")
        seen.add(rid)
        n = len(r.prompt_ids)
        if n == 0:
            raise EngineError(f"{op}: request {rid!r} has an empty prompt")
        if n > max_seq_len:
            raise EngineError(
                f"{op}: request {rid!r} has a {n}-token prompt, longer than max_seq_len={max_seq_len}; "
                "truncate the prompt or rebuild the engine with a larger max_seq_len")
        check_vocab(rid, r.prompt_ids, vocab_size, op)


def check_vocab(request_id: str, token_ids: Sequence[int], vocab_size: int, op: str) -> None:
    """Refuse token ids outside [0, vocab_size), naming the first few."""
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        raise EngineError(f"{op}: request {request_id!r} has token ids outside [0, {vocab_size}): {bad[:5]}")


def check_move(request_ids: Sequence[str], src: str, dst: str, tiers: Container[str],
               where: Callable[[str], str | None]) -> None:
    """Refuse, before anything changes, a move an engine cannot make: an unknown tier, the same
    tier twice, a repeated id, an unknown request (`where` gives None), or one whose KV is not in
    `src` (elsewhere or IN_FLIGHT). Every engine checks moves through this one function."""
    for tier in (src, dst):
        if tier not in tiers:
            raise EngineError(f"move: unknown KV tier {tier!r}; this engine has {list(tiers)}")
    if src == dst:
        raise EngineError(f"move: source and destination are both {src!r}")
    ids = list(request_ids)
    if len(set(ids)) != len(ids):
        raise EngineError(f"move: request ids appear more than once: {sorted({i for i in ids if ids.count(i) > 1})}")
    tiers_of = {i: where(i) for i in ids}
    unknown = [i for i, t in tiers_of.items() if t is None]
    if unknown:
        raise EngineError(f"move: unknown request ids {unknown[:5]}; prefill them first (or they were freed)")
    elsewhere = [(i, t) for i, t in tiers_of.items() if t != src]
    if elsewhere:
        text = ", ".join(f"{i!r} is {t}" if t == IN_FLIGHT else f"{i!r} is in {t!r}" for i, t in elsewhere[:5])
        raise EngineError(f"move from {src!r}: {text}")


_handle_ids = itertools.count(1)


@dataclass(slots=True)
class TransferHandle:
    """An asynchronous KV move started by `Engine.move`."""

    request_ids: tuple[str, ...]
    src: str
    dst: str
    bytes: int = 0
    seconds: float | None = None
    """Wall time from `move` to the moment `poll` or `wait` saw the copy finish; None until then."""
    id: int = field(default_factory=lambda: next(_handle_ids))


@dataclass(slots=True)
class PrefillHandle:
    """A prefill started by `Engine.start_prefill`; `prefill_result` gives its tokens once done."""

    request_ids: tuple[str, ...]
    device: str
    result: StepResult | None = None
    """Set when the prefill has finished (at once when it ran synchronously)."""
    id: int = field(default_factory=lambda: next(_handle_ids))


class Engine(abc.ABC):
    """An execution backend. Calls come from one thread (the orchestrator's run loop)."""

    @abc.abstractmethod
    def describe(self) -> EngineInfo:
        """Devices, KV geometry, capabilities and model of this engine."""

    @abc.abstractmethod
    def prefill(self, requests: Sequence[PrefillRequest], device: str | None = None) -> StepResult:
        """Run the prompts in one batch, keep their KV on `device` (default: the decode device),
        and return each request's first generated token."""

    @abc.abstractmethod
    def decode(self, request_ids: Sequence[str]) -> StepResult:
        """One decode iteration over requests whose KV is on the decode device: feed each its
        last token, append its KV, return its next token."""

    @abc.abstractmethod
    def free(self, request_ids: Sequence[str]) -> None:
        """Release every KV block of these requests in every tier. Unknown ids are ignored, so
        freeing on every exit path is always safe."""

    @abc.abstractmethod
    def tier_of(self, request_id: str) -> str:
        """Where the request's KV is: a device's name, HOST, or IN_FLIGHT during a move."""

    @abc.abstractmethod
    def kv_blocks_used(self, tier: str) -> int:
        """Physical KV blocks held in `tier` right now (leak checks, occupancy metrics)."""

    def move(self, request_ids: Sequence[str], src: str, dst: str) -> TransferHandle:
        """Start copying these requests' KV from tier `src` to tier `dst`."""
        caps = self.describe().capabilities
        raise CapabilityError(
            f"{type(self).__name__} cannot move KV from {src} to {dst}: "
            f"can_offload={caps.can_offload}, can_peer_copy={caps.can_peer_copy}"
        )

    def poll(self, handle: TransferHandle) -> bool:
        """True when the transfer has finished (also for a handle already waited on)."""
        raise CapabilityError(f"{type(self).__name__} has no transfers to poll (can_offload=False)")

    def wait(self, handle: TransferHandle, timeout: float | None = None) -> None:
        """Block until the transfer has finished. With `timeout` (seconds; 0: do not block), raise
        TransferTimedOut if it has not finished by then (it goes on). An engine whose moves cannot
        hang (virtual time) may ignore the timeout."""
        raise CapabilityError(f"{type(self).__name__} has no transfers to wait on (can_offload=False)")

    def abandon(self, handle: TransferHandle) -> str:
        """Give up on an unfinished move: its requests' KV is lost (the orchestrator ends and
        frees them); the blocks the copy may still write stay held until it really ends. Returns
        what the engine knows of why ("" if nothing). This default has nothing to hold: the
        requests' `free` cancels what is left of the move."""
        return ""

    def mixed_step(self, request_ids: Sequence[str], chunks: Sequence[PrefillChunk]) -> StepResult:
        """One forward that decodes `request_ids` (as `decode`) and prefills `chunks`; returns
        the decoded requests' next tokens and the first token of each request whose last chunk
        ran. Needs `can_chunk_prefill`."""
        raise CapabilityError(
            f"{type(self).__name__} cannot prefill prompts in chunks (can_chunk_prefill=False); "
            "use a policy that prefills whole prompts")

    def start_prefill(self, requests: Sequence[PrefillRequest], device: str) -> PrefillHandle:
        """Start prefilling on `device`. With `can_overlap_prefill` the prefill runs while the
        caller goes on decoding; this default runs it now, so the handle is finished on return."""
        result = self.prefill(requests, device)
        return PrefillHandle(tuple(r.request_id for r in requests), device, result)

    def prefill_result(self, handle: PrefillHandle) -> StepResult | None:
        """The prefill's tokens and timing once it has finished, else None. A failed prefill
        raises EngineError here, and its requests hold no KV."""
        return handle.result

    def wait_any(self, handles: Sequence[TransferHandle | PrefillHandle]) -> None:
        """Block until at least one of these moves or prefills has finished (a failure is then
        raised by the `poll` or `prefill_result` that follows). Only needed with
        `can_overlap_prefill`: elsewhere a prefill is finished when `start_prefill` returns, so
        this default returns at once when one is among `handles`."""
        if any(isinstance(h, PrefillHandle) and h.result is not None for h in handles):
            return
        raise CapabilityError(f"{type(self).__name__} cannot wait on several handles at once "
                              "(can_overlap_prefill=False); wait on each move with `wait`")

    def close(self) -> None:
        """Release the engine's memory. The default does nothing."""

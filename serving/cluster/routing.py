"""Which worker takes a request: length-aware routing, blended with Dynamo's KV-overlap and load terms.

Dynamo's KV router prices a worker as `overlap_weight * prefill_blocks + decode_blocks`: the
prompt blocks the worker would have to compute (those of its requests not through prefill yet,
and the newcomer's that it does not hold already, from the workers' KV events) and the blocks it
would then be decoding, the new request's among them
(docs.nvidia.com/dynamo/v1.6.0/knowledge-base/modular-components/router/router-design; Dynamo
tracks the pending prefill with `router_track_prefill_tokens`, on by default), and takes the
cheapest. No router in the field looks at how long the requests will run.

Length-aware routing prices a worker's decode step as the kernel that does not split long KV
pays for it (this project's padded attention, vLLM's paged_attention v1, FlashAttention-2 when it
picks one split): every sequence of the batch padded to the longest. With the request added, a
worker whose requests reach the expected KV lengths e_1..e_n (prompt + max_tokens: what they
reach if they run to the end) and the newcomer's L pads

    (n + 1) * max(e_1, ..., e_n, L) - (e_1 + ... + e_n + L)

tokens per step. In blocks and weighted by `length_weight`, this padding joins Dynamo's cost, so
requests of close lengths gather on the same workers (each worker's batches are aligned from the
start, the cluster-level analogue of the paper's batching, as CascadeInfer's instance groups).
It is the worker's padding *after* the request joins, not only what the request adds: a first
version priced only the added padding, `n * max(0, L - M) + max(0, M - L)`, and in the
simulator (`bench/results/cluster-routing-sim-v1-marginal/`) it sent every long prompt to one
replica (no load term could outweigh n * (L - M)), which doubled azure-conv's TTFT p99. Priced
as a level, a worker already holding mixed lengths costs more whatever joins, and a worker of
long requests takes another one only while its padded step stays below the others'. With
`length_weight` 0 it is Dynamo's `kv` cost; that is the right weight for kernels that split
long KV (FlashInfer, FlashDecoding, TensorRT-LLM's XQA multi-block), where padding costs nothing.

Pure: the length router (`length_router.py`) and the simulated cluster (`bench/cluster_routing.py`)
call the same `choose`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

MODES = ("length", "kv", "round-robin")
"""`length`: this module's cost; `kv`: Dynamo's cost (length_weight 0); `round-robin`: in turn."""


def expected_len(prompt_len: int, max_tokens: int | None, max_seq_len: int) -> int:
    """The KV length a request reaches if it runs to max_tokens (the whole context where none is
    given): what length-aware routing groups by."""
    return min(prompt_len + (max_tokens if max_tokens is not None else max_seq_len), max_seq_len)


def device_overlap(scores: dict) -> dict[int, int]:
    """Worker id -> prompt blocks it holds on its device, from Dynamo's `KvRouter.get_overlap_scores`."""
    out: dict[int, int] = {}
    for row in scores.get("workers", ()):
        wid = int(row["worker_id"])
        out[wid] = max(out.get(wid, 0), int(row.get("device_blocks") or 0))
    return out


@dataclass(frozen=True)
class Weights:
    overlap: float = 1.0
    """Dynamo's `--router-kv-overlap-score-weight` (default 1): prefill blocks against decode blocks."""
    length: float = 1.0
    """Blocks of padding per block of load: 1 where the kernel pays for padding as for KV (no
    split), 0 where it pays nothing (split-KV kernels); 0 turns length-awareness off."""

    def __post_init__(self) -> None:
        if self.overlap < 0 or self.length < 0:
            raise ValueError(f"router weights must be >= 0, got overlap {self.overlap}, length {self.length}")


@dataclass
class WorkerLoad:
    """What the router knows of one worker: the requests it sent there and still streaming."""

    worker_id: int
    expected: dict[str, int] = field(default_factory=dict)
    """Request key -> expected KV length (prompt + max_tokens)."""
    tokens: dict[str, int] = field(default_factory=dict)
    """Request key -> tokens of KV it holds, or will once prefilled (prompt + generated so far)."""
    prefill: dict[str, int] = field(default_factory=dict)
    """Request key -> prompt tokens still to prefill (until its first token comes back)."""

    def blocks(self, block_size: int) -> int:
        """Blocks the worker is decoding now (the router's count, as Dynamo's active blocks)."""
        return sum(-(-t // block_size) for t in self.tokens.values())

    def prefill_blocks(self, block_size: int) -> int:
        """Prompt blocks the worker still has to compute for the requests it holds."""
        return sum(-(-t // block_size) for t in self.prefill.values())

    def add(self, key: str, prompt_len: int, expected_len: int) -> None:
        self.expected[key] = expected_len
        self.tokens[key] = prompt_len
        self.prefill[key] = prompt_len

    def grow(self, key: str, new_tokens: int) -> None:
        """`new_tokens` came back for `key`: its prefill is over (Dynamo's mark_prefill_complete)."""
        self.prefill.pop(key, None)
        if key in self.tokens:
            self.tokens[key] += new_tokens

    def remove(self, key: str) -> None:
        self.expected.pop(key, None)
        self.tokens.pop(key, None)
        self.prefill.pop(key, None)


def padding(expected_lens: Iterable[int], length: int) -> int:
    """Tokens of padding per decode step on a worker whose requests reach `expected_lens`, once a
    request reaching `length` joins (every sequence padded to the longest)."""
    lens = [*expected_lens, length]
    return len(lens) * max(lens) - sum(lens)


def cost(load: WorkerLoad, prompt_len: int, expected_len: int, overlap_blocks: int, block_size: int,
         weights: Weights) -> float:
    """The worker's price for this request, in blocks (lower is better)."""
    prefill = load.prefill_blocks(block_size) + max(-(-prompt_len // block_size) - overlap_blocks, 0)
    decode = load.blocks(block_size) + -(-prompt_len // block_size)
    padded = padding(load.expected.values(), expected_len) / block_size
    return weights.overlap * prefill + decode + weights.length * padded


@dataclass
class Router:
    """Chooses a worker per request and keeps each worker's requests in flight.

        router = Router(block_size=16)
        worker = router.choose([1, 2], key, prompt_len=300, expected_len=556)
        ... router.grow(key, n) as tokens stream ...
        router.finish(key)
    """

    block_size: int
    mode: str = "length"
    weights: Weights = field(default_factory=Weights)
    loads: dict[int, WorkerLoad] = field(default_factory=dict)
    _where: dict[str, int] = field(default_factory=dict)
    _turn: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"router mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def choose(self, workers: Sequence[int], key: str, prompt_len: int, expected_len: int,
               overlap: dict[int, int] | None = None) -> int:
        """Pick one of `workers` for request `key` and count it there until `finish(key)`.
        overlap: worker -> prompt blocks it already holds (Dynamo's KV index); none if absent."""
        if not workers:
            raise LookupError("no worker is registered yet")
        live = sorted(workers)
        if self.mode == "round-robin":
            chosen = live[self._turn % len(live)]
            self._turn += 1
        else:
            weights = self.weights if self.mode == "length" else Weights(self.weights.overlap, 0.0)
            overlap = overlap or {}

            def price(w: int) -> tuple[float, int, int]:
                load = self.loads.setdefault(w, WorkerLoad(w))
                return (cost(load, prompt_len, expected_len, overlap.get(w, 0), self.block_size, weights),
                        len(load.tokens), w)
            chosen = min(live, key=price)
        self.loads.setdefault(chosen, WorkerLoad(chosen)).add(key, prompt_len, expected_len)
        self._where[key] = chosen
        return chosen

    def grow(self, key: str, new_tokens: int) -> None:
        """`key` generated `new_tokens` more (its KV grows)."""
        worker = self._where.get(key)
        if worker is not None:
            self.loads[worker].grow(key, new_tokens)

    def finish(self, key: str) -> None:
        """`key` ended (however): it no longer counts on its worker."""
        worker = self._where.pop(key, None)
        if worker is not None:
            self.loads[worker].remove(key)

    def forget(self, worker: int) -> None:
        """`worker` left the cluster."""
        self.loads.pop(worker, None)
        self._where = {k: w for k, w in self._where.items() if w != worker}

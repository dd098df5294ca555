"""What the soak sends: a fixed set of distinct requests (each checked against its reference),
the bad requests mixed in, and the draw of one stream's job.

Everything is drawn from one seed, so a rerun with the same options sends the same mix."""
from __future__ import annotations

import random
from dataclasses import dataclass

PROTOCOLS = ("grpc", "http", "openai")
"""Triton gRPC streaming, Triton HTTP generate_stream (SSE), the OpenAI API (streaming)."""

WORDS = ("the river ran past an old mill where seven lanterns hung from a wooden beam and the "
         "miller counted grain by candle light while rain tapped on slate roofs above quiet streets "
         "merchants argued over copper coins and a violin played somewhere beyond the bridge").split()


SAMPLED_TOP_K = (20, 50)
"""Seeded sampling draws within the top k tokens. Over the whole vocabulary (top_k 0) the draw
lands now and then among thousands of near-tied tail tokens, whose order the engine's sorted CDF
follows and a batch's float rounding (1e-5 in log probability) permutes: the same seed then gives
another token beside other requests than alone (docs/reliability.md)."""


@dataclass(frozen=True)
class Spec:
    """One distinct request: every stream of it must give the tokens its reference gave.

    api: "triton" (aligned_llm, over gRPC and HTTP alike) or "openai" (chat or completions);
    temperature 0 is greedy, above 0 it samples with `seed` (the same draw every time)."""

    id: int
    api: str
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    top_k: int = 0
    chat: bool = False

    @property
    def label(self) -> str:
        mode = "greedy" if self.temperature == 0 else f"T={self.temperature:g} seed={self.seed}"
        return f"#{self.id} {self.api}{'/chat' if self.chat else ''} {len(self.prompt)} chars, {self.max_tokens} tokens, {mode}"


@dataclass(frozen=True)
class BadRequest:
    """A request the server must refuse (4xx, or a gRPC error) with a message naming `field`."""

    name: str
    field: str
    change: dict
    """Fields set on top of a good request (None removes one)."""


def bad_requests(protocol: str, max_seq_len: int) -> list[BadRequest]:
    """The malformed requests mixed into `protocol`'s streams: out-of-range values and a prompt
    longer than the model's window."""
    too_long = " ".join(WORDS[i % len(WORDS)] for i in range(max_seq_len * 2))
    if protocol == "openai":
        return [BadRequest("max_tokens < 1", "max_tokens", {"max_tokens": -1}),
                BadRequest("temperature > 2", "temperature", {"temperature": 3.5}),
                BadRequest("top_p > 1", "top_p", {"top_p": 2}),
                BadRequest("unsupported field", "logit_bias", {"logit_bias": {"1": 2}}),
                BadRequest("prompt too long", "prompt", {"prompt": too_long})]
    return [BadRequest("max_tokens < 1", "max_tokens", {"max_tokens": 0}),
            BadRequest("max_tokens > window", "max_tokens", {"max_tokens": max_seq_len * 4}),
            BadRequest("top_p > 1", "top_p", {"top_p": 1.5}),
            BadRequest("empty prompt", "text_input", {"text_input": ""}),
            BadRequest("prompt too long", "text_input", {"text_input": too_long})]


def make_specs(n: int, max_seq_len: int, max_output: int, seed: int) -> list[Spec]:
    """n distinct requests, a third of them OpenAI's (half of those chat), the rest aligned_llm's;
    short, medium and long prompts and outputs; half greedy, half seeded sampling (top k: SAMPLED_TOP_K). Prompts are
    sized in characters, which is at least their token count for a byte-level or BPE tokenizer,
    so prompt + output always fits max_seq_len."""
    rng = random.Random(seed)
    cap = max(8, min(max_output, max_seq_len // 2))
    specs = []
    for i in range(n):
        api = "openai" if i % 3 == 2 else "triton"
        chat = api == "openai" and (i // 3) % 2 == 1
        out_lo, out_hi = rng.choice([(4, 16), (24, 64), (cap // 2, cap)])
        max_tokens = rng.randint(min(out_lo, cap), min(out_hi, cap))
        room = max_seq_len - max_tokens - (96 if chat else 16)  # the chat template's own tokens
        lo, hi = rng.choice([(8, 40), (80, 300), (300, 800)])
        chars = max(8, min(rng.randint(lo, hi), room))
        greedy = i % 2 == 0
        specs.append(Spec(i, api, _text(rng, chars, i), max_tokens,
                          0.0 if greedy else rng.choice([0.7, 0.9, 1.0]),
                          None if greedy else rng.randrange(1, 2**31), 0 if greedy else rng.choice(SAMPLED_TOP_K), chat))
    return specs


def _text(rng: random.Random, chars: int, i: int) -> str:
    words, size = [f"Story {i}:"], len(f"Story {i}:")
    while size < chars:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:chars]


@dataclass(frozen=True)
class Job:
    """One stream: a spec (or a bad request), and where the client cancels it.

    cancel_after: cancel once this many tokens arrived (0: after `cancel_delay_s`, perhaps
    before the first token); None: read it to the end."""

    protocol: str
    spec: Spec
    bad: BadRequest | None = None
    cancel_after: int | None = None
    cancel_delay_s: float = 0.0


class JobDraw:
    """Draws each worker's next job: ~bad_fraction bad requests, ~cancel_fraction cancelled at
    a random point of their reference's length."""

    def __init__(self, specs: list[Spec], reference_len: dict[int, int], max_seq_len: int,
                 cancel_fraction: float, bad_fraction: float, seed: int):
        self.by_api = {api: [s for s in specs if s.api == api] for api in ("triton", "openai")}
        self.reference_len = reference_len
        self.bad = {p: bad_requests(p, max_seq_len) for p in PROTOCOLS}
        self.cancel_fraction, self.bad_fraction = cancel_fraction, bad_fraction
        self.seed = seed

    def rng(self, worker: int) -> random.Random:
        return random.Random(f"{self.seed}-{worker}")

    def next(self, protocol: str, rng: random.Random) -> Job:
        spec = rng.choice(self.by_api["openai" if protocol == "openai" else "triton"])
        if rng.random() < self.bad_fraction:
            return Job(protocol, spec, bad=rng.choice(self.bad[protocol]))
        if rng.random() < self.cancel_fraction:
            n = self.reference_len.get(spec.id, spec.max_tokens)
            if n <= 1 or rng.random() < 0.15:  # some before the first token
                return Job(protocol, spec, cancel_after=0, cancel_delay_s=rng.uniform(0.0, 0.5))
            return Job(protocol, spec, cancel_after=rng.randint(1, n - 1))
        return Job(protocol, spec)

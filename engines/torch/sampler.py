"""Choosing next tokens from logits: penalties, minimum length and bad words shape the logits
(as transformers' logits processors do), then greedy, temperature, top-k, top-p.

Each request draws from its own `torch.Generator`, seeded from its SamplingParams, and draws
exactly one number per step; so its tokens depend on its seed and its logits only, never on
which other requests share the batch.
"""
from __future__ import annotations

import secrets
from typing import Sequence

import torch

from engines.base import SamplingParams
from engines.torch.cpu_kernels import fused_ops


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    """The request's generator: seeded from params.seed, or from fresh entropy when it has none."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k and top-p, sorted by descending logit.

    logits [B, V] float; params must all be non-greedy. Returns (probs [B, V] renormalised, with
    filtered tokens at 0; token ids [B, V] in the same order).
    """
    V = logits.shape[-1]
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    top_k = torch.tensor([p.top_k or V for p in params], device=device)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    sorted_logits, token_ids = (logits.float() / temperature).sort(dim=-1, descending=True)
    rank = torch.arange(V, device=device)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Nucleus: keep a token while the mass before it is still short of p; the top token always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((mass_before >= top_p) & (rank > 0), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), token_ids


def shape_logits(row: torch.Tensor, p: SamplingParams, tokens: Sequence[int], prompt_len: int) -> torch.Tensor:
    """One row of logits [V] after p's penalties, minimum length and bad words, for a sequence of
    `tokens` so far (prompt, then the generated ones, the last fed this step). A new tensor."""
    row = row.float().clone()
    generated = tokens[prompt_len:]
    if p.repetition_penalty != 1.0 and tokens:
        ids = torch.tensor(sorted(set(tokens)), device=row.device)
        seen = row[ids]
        row[ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and generated:
        ids, counts = torch.unique(torch.tensor(list(generated), device=row.device), return_counts=True)
        row[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(row.dtype)
    if p.min_tokens and len(generated) < p.min_tokens and p.stop_ids:
        row[list(p.stop_ids)] = float("-inf")
    for word in p.bad_words:
        if len(word) == 1 or tuple(tokens[len(tokens) - len(word) + 1:]) == tuple(word[:-1]):
            row[word[-1]] = float("-inf")
    return row


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None],
           histories: Sequence[tuple[Sequence[int], int] | None] | None = None) -> list[int]:
    """Next token of each row of logits [B, V] (`sample_with_logprobs` without the log probabilities)."""
    return sample_with_logprobs(logits, params, generators, histories)[0]


def sample_with_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams],
                         generators: Sequence[torch.Generator | None],
                         histories: Sequence[tuple[Sequence[int], int] | None] | None = None,
                         ) -> tuple[list[int], list[float | None]]:
    """Next token of each row of logits [B, V]; generators[i] may be None for greedy rows.
    histories[i]: (the row's tokens so far, its prompt length), needed where params[i] shapes
    the logits (`SamplingParams.shapes_logits`). Also each chosen token's log probability where
    params[i].logprobs asks (else None), as `SamplingParams.logprobs` defines it."""
    shaped = [i for i, p in enumerate(params) if p.shapes_logits]
    if shaped:
        if histories is None or any(histories[i] is None for i in shaped):
            raise ValueError("sample: a request with penalties, min_tokens or bad words needs its tokens so far")
        logits = logits.float().clone()
        for i in shaped:
            logits[i] = shape_logits(logits[i], params[i], *histories[i])
    ops = fused_ops(logits) if logits.dtype == torch.float32 else None
    # On CPU the kernel: aten::argmax was 6% of a profiled 32-row decode step (docs/benchmarks.md).
    tokens = ops.argmax_rows(logits) if ops is not None else logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        probs, token_ids = filtered_probs(logits[rows], [params[i] for i in rows])
        # Inverse-CDF draw with one uniform per request from its own generator (multinomial
        # would take a single generator for the whole batch).
        u = torch.stack([torch.rand((), generator=generators[i], device=logits.device) for i in rows])
        cdf = probs.cumsum(dim=-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
        # searchsorted can land on a zero-probability tail token only through rounding at the
        # very top of the CDF; step back to the last kept token in that case.
        kept = (probs > 0).sum(dim=-1, keepdim=True) - 1
        pick = torch.minimum(pick, kept)
        tokens[rows] = token_ids.gather(1, pick)[:, 0]
    logprobs: list[float | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs]
    if want:
        temperature = torch.tensor([1.0 if params[i].greedy else params[i].temperature for i in want],
                                   device=logits.device)
        chosen = (logits[want].float() / temperature[:, None]).log_softmax(dim=-1).gather(1, tokens[want][:, None])
        for i, lp in zip(want, chosen[:, 0].tolist()):
            logprobs[i] = lp
    return tokens.tolist(), logprobs

"""Fitting trace lengths into a small engine's window (max_seq_len), for real engines on a CPU.

The sim engine runs at the trace's own lengths and needs none of this. The code trace's prompts
reach 7,437 tokens (its p99 is 7,436) while a CPU benchmark engine holds ~1k. Prompts are scaled by
one factor

    s = (max_seq_len - output_reserve) / trace_max_context

taken over the whole trace, not the sample, so it depends on neither `n` nor the seed; the
longest prompt of the trace then leaves `output_reserve` tokens of room. Outputs are NOT scaled:
the code trace's outputs are short (mean 28, p50 13, p99 251) and scaling them by s (~0.1)
would leave most requests one or two tokens, i.e. no decode phase to schedule. A generated
token is one decode iteration a request takes part in, so keeping output counts keeps how long
requests stay in the batch and how fast the batch turns over; scaling prompts keeps the
relative spread of KV lengths, which is what length alignment acts on. The default
`output_reserve` is the trace's p99 output length (capped at half of max_seq_len), so about 99%
of requests keep their exact output length; the others are clamped to fit
(prompt_len + max_tokens - 1 <= max_seq_len, the KV the last token never needs) and counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from bench.workloads.azure import TraceRow


@dataclass(frozen=True, slots=True)
class WindowFit:
    """How a workload's lengths were fitted to an engine's window."""

    max_seq_len: int
    scale: float
    """Factor applied to context lengths (outputs are kept)."""
    output_reserve: int
    clamped: int
    """Requests whose max_tokens was cut to fit max_seq_len."""

    def describe(self) -> dict:
        return {"max_seq_len": self.max_seq_len, "context_scale": self.scale, "output_reserve": self.output_reserve,
                "outputs": "unscaled, clamped to fit max_seq_len", "clamped": self.clamped}


def default_output_reserve(trace: Sequence[TraceRow], max_seq_len: int) -> int:
    """The trace's p99 output length, at most half the window (so prompts keep the other half)."""
    p99 = float(np.percentile([r.generated_tokens for r in trace], 99))
    return min(math.ceil(p99), max_seq_len // 2)


def context_scale(trace: Sequence[TraceRow], max_seq_len: int, output_reserve: int) -> float:
    """s such that the trace's longest context becomes max_seq_len - output_reserve tokens."""
    if not 0 <= output_reserve < max_seq_len - 1:
        raise ValueError(f"output_reserve {output_reserve} must be in [0, max_seq_len - 1 = {max_seq_len - 1})")
    return (max_seq_len - output_reserve) / max(r.context_tokens for r in trace)


def fit_lengths(row: TraceRow, scale: float, max_seq_len: int) -> tuple[int, int, bool]:
    """(prompt_len, max_tokens, clamped): the scaled prompt and the kept output, cut so that
    prompt_len < max_seq_len and prompt_len + max_tokens - 1 <= max_seq_len."""
    prompt_len = min(max(1, round(row.context_tokens * scale)), max_seq_len - 1)
    room = max_seq_len - prompt_len + 1
    want = max(1, row.generated_tokens)
    return prompt_len, min(want, room), want > room


def fit_rows(rows: Sequence[TraceRow], trace: Sequence[TraceRow], max_seq_len: int,
             output_reserve: int | None) -> tuple[list[int], list[int], WindowFit]:
    """(prompt_lens, output_lens, fit) of `rows`, scaled by the factor of the whole `trace`."""
    if not (isinstance(max_seq_len, int) and max_seq_len >= 2):
        raise ValueError(f"max_seq_len = {max_seq_len!r}: the window must hold at least 2 tokens")
    if output_reserve is None:
        output_reserve = default_output_reserve(trace, max_seq_len)
    scale = context_scale(trace, max_seq_len, output_reserve)
    prompts, outputs, clamped = [], [], 0
    for row in rows:
        p, o, cut = fit_lengths(row, scale, max_seq_len)
        prompts.append(p)
        outputs.append(o)
        clamped += cut
    return prompts, outputs, WindowFit(max_seq_len, scale, output_reserve, clamped)

"""Two variants of the default policy that were measured against issue 16's criteria and not taken.

    python -m bench.rejected_variants one-step-chunks [--model OPT-6.7B] [--workload azure-code]
        [--dispatch greedy] [--loads 0.5 1.2]
    python -m bench.rejected_variants wave-fill [--model OPT-13B] [--workload synthetic-80-short]
        [--dispatch waves] [--loads 0.5 0.8 1.2]

Each runs one (model, workload) point of `bench.simulate`'s paper matrix (its requests, rates, 8
GPUs and settings) with the baselines, `adaptive` as it is, and the variant; prints markdown.
The variants live here, not in `orchestrator/policies/`, so that the figures in
docs/benchmarks.md ("Issue 16: what else was tried") can be reproduced; `registered()` adds them
to the policy registry of this process while a run needs them.

- **one-step-chunks**: `adaptive` with prompts in chunks, each step carrying the most prompt
  tokens whose chunks add at most one decode step of the running batch (priced with the step
  cost, as the TPOT target is), and whole prompts when nothing decodes (no one's TPOT to
  protect). It was meant to size the budget from the hardware instead of a fixed 512 tokens:
  ~300 tokens where a small batch's step is the weight read (`split`), more where its attention
  is latency-bound (`greedy`).
- **wave-fill**: under in-order waves (`waves`), a waiting prompt longer than every running
  sequence waits, up to `max_wait_s / 2`, until as many such prompts wait as one wave holds
  sequences (SMs / KV heads), so that the long ones decode together in the batch's first wave
  instead of each holding a wave of short ones. Grouping by holding is what the in-order
  kernel's bound leaves room for (`bench.attention_bound`); this is its simplest form. It reads
  the wave size from the sim engine's cost model, so it runs on the simulator only.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from bench import simulate as sim
from engines.sim.step_cost import SimStepCost
from orchestrator.core import Request
from orchestrator.draft import Draft
from orchestrator.policies import REGISTRY
from orchestrator.policies.adaptive import AdaptivePolicy


class OneStepChunks(AdaptivePolicy):
    """`adaptive` whose chunk budget is one decode step of the running batch (module docstring)."""

    name = "adaptive-one-step-chunks"

    def _chunk_budget(self, draft: Draft) -> int:
        if self.config.tpot_slo_s or self.cost is None:
            return super()._chunk_budget(draft)
        if not draft.running:
            return self.config.max_prefill_tokens
        return self._tokens_within(draft, self.cost.step_seconds([r.kv_len for r in draft.running]))


class WaveFill(AdaptivePolicy):
    """`adaptive` that holds long prompts until they fill a wave together (module docstring)."""

    name = "adaptive-wave-fill"

    def _order(self, draft: Draft, window: list[Request], cap: int | None) -> list[Request]:
        order = super()._order(draft, window, cap)
        if not isinstance(self.cost, SimStepCost) or not self.cost.order_matters or not draft.running:
            return order
        model = self.cost.cost
        per_wave = max(1, model.hardware.sm_count // model.model.kv_heads)
        top = max(r.kv_len for r in draft.running)
        longer = [r for r in order if r.prompt_len > top]
        if len(longer) >= per_wave:
            return order
        held = {id(r) for r in longer if draft.now - r.arrival_time < self.config.max_wait_s / 2}
        return [r for r in order if id(r) not in held]


VARIANTS = {"one-step-chunks": (OneStepChunks, 1), "wave-fill": (WaveFill, 2)}
"""Each variant's policy class and the GPUs a replica takes: wave-fill is measured deployed as
DistServe is (prefill + decode pairs), where issue 16 asks for 1.15x decode tok/s per decode GPU."""


@contextmanager
def registered():
    """The variants in the policy registry (config validation reads it afresh) while inside,
    taken out again after, so that nothing else in the process sees them."""
    added = [cls.name for cls, _ in VARIANTS.values() if cls.name not in REGISTRY]
    REGISTRY.update({cls.name: cls for cls, _ in VARIANTS.values()})
    try:
        yield
    finally:
        for name in added:
            del REGISTRY[name]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", choices=sorted(VARIANTS))
    p.add_argument("--model", default="OPT-6.7B")
    p.add_argument("--workload", default="azure-code")
    p.add_argument("--dispatch", default="greedy")
    p.add_argument("--loads", nargs="+", type=float, default=[0.5, 1.2])
    p.add_argument("--requests", type=int, default=sim.MATRICES["paper"].requests)
    a = p.parse_args(argv)
    with registered():
        return _run(a)


def _run(a: argparse.Namespace) -> int:
    cls, gpus = VARIANTS[a.variant]
    args = dict(hardware="H100-SXM", gpus=8, host_share=0.9, dispatch=a.dispatch, slo_ttft=2.0, slo_tpot=0.1, seed=0,
                dashboard=None)
    args, base, cap = sim.prepare(args, a.model, a.workload, a.requests)
    pair = gpus == 2
    labels = [sim.BASELINE, "disagg-fcfs (DistServe-like)", "adaptive, disaggregated" if pair else "adaptive (default)"]
    variants = [sim.VARIANTS[label] for label in labels]
    variants.append(sim.Variant(f"{a.variant}{', disaggregated' if pair else ''}", cls.name, gpus,
                                dict(sim._PAIR) if pair else {}))
    print(f"{a.model}, {a.workload}, dispatch {a.dispatch}, {len(base)} requests, 8 GPUs; ratios to "
          f"{'DistServe-like' if pair else 'fcfs'}\n")
    print("| load | variant | output tok/s | decode tok/s per decode GPU | TPOT p99 (ms) | TTFT p50 / p99 (s) "
          "| mean decode batch |")
    print("|---|---|---|---|---|---|---|")
    for load in a.loads:
        workload = sim.with_load(base, load * cap, args["seed"])
        runs = {v.label: sim.run_variant(args, v, workload) for v in variants}
        ref = runs[labels[1] if pair else labels[0]]
        for label, m in runs.items():
            print(f"| {load} | {label} | {m['output_tok_s'] / ref['output_tok_s']:.3f}x "
                  f"| {m['decode_tok_s'] / ref['decode_tok_s']:.3f}x | {m['tpot_s']['p99'] * 1e3:.1f} "
                  f"| {m['ttft_s']['p50']:.2f} / {m['ttft_s']['p99']:.2f} | {m['mean_batch']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench.attention_bound on a small point: the bound is near 1 where the kernel reads near its
bytes roofline (split-KV), above 1 under in-order waves on mixed lengths, and a scheduler that
decodes the same requests longest first (the default policy, disaggregated) stays under it."""
from __future__ import annotations

from bench import attention_bound as ab
from bench import simulate


def job(dispatch: str, variant: str) -> dict:
    args = dict(hardware="H100-SXM", gpus=2, host_share=0.9, dispatch=dispatch, slo_ttft=2.0, slo_tpot=0.1, seed=0,
                dashboard=None)
    return dict(args=args, model="OPT-13B", workload="synthetic-80-short", requests=150, loads=(1.0,),
                variant=variant)


def test_the_bound_is_one_at_the_roofline_and_holds_the_default_policy_under_waves():
    split = ab.point(job("split", ab.DISAGG))[0]
    # Split-KV reads near its bytes roofline (each sequence's short last chunk holds a wave open).
    assert 1.0 <= split["bound"] < 1.1
    waves = ab.point(job("waves", ab.DISAGG))[0]
    assert waves["attention_s"] > 2 * waves["roofline_s"] and waves["bound"] > 1.5
    # The default policy deployed the same way, same requests: its decode tok/s per decode GPU
    # gains on DistServe-like's, but no more than the bound allows.
    runs = {r["variant"]: r["metrics"] for r in simulate.experiment(dict(
        job("waves", ab.DISAGG), variants=(ab.DISAGG, ab.DEFAULT_DISAGG)))}
    gain = runs[ab.DEFAULT_DISAGG]["decode_tok_s"] / runs[ab.DISAGG]["decode_tok_s"]
    assert 1.0 < gain <= waves["bound"]

"""The orchestrator's sampling settings as TensorRT-LLM's `SamplingParams`."""
from __future__ import annotations

from engines.base import SamplingParams


def sampling_params(api, s: SamplingParams, max_tokens: int):
    """TensorRT-LLM sampling for one request. The orchestrator decides when a request stops, so
    TensorRT-LLM ignores EOS and stops only at max_seq_len; tokens are not detokenized."""
    if s.greedy:
        return api.SamplingParams(max_tokens=max_tokens, temperature=None, top_k=1, top_p=None, seed=s.seed,
                                  ignore_eos=True, detokenize=False)
    return api.SamplingParams(max_tokens=max_tokens, temperature=s.temperature, top_k=s.top_k or None,
                              top_p=s.top_p, seed=s.seed, ignore_eos=True, detokenize=False)

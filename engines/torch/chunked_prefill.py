"""Chunked prefill on the torch engine: what `TorchEngine.mixed_step` checks before it runs, and
what it records after.

A prompt may be prefilled in chunks, each in a mixed step beside decoding requests. The first
chunk registers the request; every later one must continue its prompt exactly where the KV ends,
on the decode device. Only the last chunk samples (the first token); a failed step gives back
every block it reserved, so a refused or failed step changes nothing.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from engines.base import IN_FLIGHT, EngineError, PrefillChunk, SamplingParams, check_new_prompts, check_vocab
from engines.torch.kv_cache import PagedKVCache
from engines.torch.sampler import make_generator
from engines.torch.sequence import SequenceState


def check_chunks(chunks: list[PrefillChunk], seqs: dict[str, SequenceState], tier_of: Callable[[str], str],
                 tier: str, max_seq_len: int, vocab_size: int) -> None:
    """Refuse, before anything changes, chunks that do not continue their prompts exactly.

    seqs: the engine's requests; tier_of: where a request's KV is; tier: the decode device's tier."""
    ids = [c.request.request_id for c in chunks]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise EngineError(f"mixed_step: requests {repeated[:5]} have more than one chunk in the call; "
                          "send one chunk per request per step")
    check_new_prompts([c.request for c in chunks if c.start == 0], seqs, max_seq_len, vocab_size, "mixed_step")
    for c in chunks:
        if c.start > 0:
            _check_continues(c, seqs, tier_of, tier, vocab_size)


def _check_continues(chunk: PrefillChunk, seqs: dict[str, SequenceState], tier_of: Callable[[str], str],
                     tier: str, vocab_size: int) -> None:
    """A later chunk must pick up exactly where its request's KV ends, on the decode device."""
    rid, span = chunk.request.request_id, f"[{chunk.start}, {chunk.end})"
    seq = seqs.get(rid)
    if seq is None:
        raise EngineError(f"mixed_step: chunk {span} of unknown request {rid!r} must start at 0: the first "
                          "chunk registers the request (or it was freed)")
    if seq.last_token is not None:
        raise EngineError(f"mixed_step: request {rid!r} has prefilled its whole {seq.prompt_len}-token prompt "
                          f"already; decode it instead of sending chunk {span}")
    n = len(chunk.request.prompt_ids)
    if n != seq.prompt_len:
        raise EngineError(f"mixed_step: chunk {span} of {rid!r} has a {n}-token prompt, but its first chunk had "
                          f"{seq.prompt_len} tokens; send the same prompt with every chunk")
    if chunk.start != seq.kv_len:
        kind = "a gap" if chunk.start > seq.kv_len else "an overlap"
        raise EngineError(f"mixed_step: chunk {span} of {rid!r} starts at {chunk.start} but the request holds "
                          f"{seq.kv_len} tokens of KV ({kind}); its next chunk must start at {seq.kv_len}")
    where = tier_of(rid)
    if where != tier:
        raise EngineError(f"mixed_step: KV must be on {tier!r} to prefill chunk {span} of {rid!r}, but it is "
                          f"{'in ' + repr(where) if where != IN_FLIGHT else IN_FLIGHT}; move it back first")
    check_vocab(rid, chunk.request.prompt_ids[chunk.start:chunk.end], vocab_size, "mixed_step")


def chunk_sampling(chunk: PrefillChunk, seqs: dict[str, SequenceState],
                   device: torch.device) -> tuple[SamplingParams, torch.Generator | None]:
    """The chunk's request's sampling and generator: kept from its first chunk, or new (on the
    decode device `device`, as `prefill` makes it) for a first chunk."""
    seq = seqs.get(chunk.request.request_id) if chunk.start > 0 else None
    if seq is not None:
        return seq.sampling, seq.generator
    params = chunk.request.sampling
    return params, None if params.greedy else make_generator(params, device)


def commit_mixed(seqs: dict[str, SequenceState], ids: list[str], decoding: list[SequenceState],
                 chunks: list[PrefillChunk], states: list[tuple[SamplingParams, torch.Generator | None]],
                 tokens: list[int]) -> dict[str, int]:
    """Record a finished mixed step: decoded requests grow by one, chunked ones by their chunk
    (a first chunk registers its request), and finished prompts get their first token. Returns
    the tokens by request id."""
    out = dict(zip(ids, tokens))
    for s, tok in zip(decoding, tokens):
        s.kv_len += 1
        s.record(tok)
    first_tokens = iter(tokens[len(ids):])
    for c, (params, generator) in zip(chunks, states):
        rid = c.request.request_id
        if c.start == 0:
            seqs[rid] = SequenceState(0, None, params, generator, len(c.request.prompt_ids),
                                      list(c.request.prompt_ids) if params.shapes_logits else [])
        seq = seqs[rid]
        seq.kv_len = c.end
        if c.last:
            out[rid] = next(first_tokens)
            seq.record(out[rid])
    return out


def undo_reservations(cache: PagedKVCache, held: dict[str, int], new: Sequence[str]) -> None:
    """Give back what a failed step reserved in `cache`: the whole tables of the requests it was
    registering (`new`), and the blocks it added to the others' tables beyond `held` (their KV
    past the old length was never recorded, so those blocks hold nothing the engine knows of)."""
    for rid in new:
        cache.release(rid)
    for rid, n in held.items():
        table = cache.tables[rid]
        grown = table[n:]
        if grown:
            del table[n:]
            cache.allocator.free(grown)

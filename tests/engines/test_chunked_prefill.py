"""Chunked prefill in the torch engine (`mixed_step`): a prompt prefilled in pieces, alone or
beside decoding requests, ends with the same KV, first token and later tokens as one whole
`prefill`; a call that does not continue a prompt exactly is refused and changes nothing; a
failed step gives back every block it reserved. The numerical checks run on every attention
path (`PATHS`)."""
from __future__ import annotations

import pytest
import torch
import transformers

from engines.base import EngineError, OutOfKVBlocks, PrefillChunk, PrefillRequest, SamplingParams
from engines.torch import attention as attention_module
from engines.torch.engine import TorchEngine
from tests.engines.torch_probe import (
    decode_with_logits, kv_contents, kv_len, mixed_step_with_logits, prefill_with_logits,
)

ATOL = 1e-5
"""float32: a chunked forward and a whole one differ only in summation order."""
PATHS = ("varlen", "padded")


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def chunk(rid: str, prompt: list[int], start: int, end: int, sampling: SamplingParams = SamplingParams()):
    return PrefillChunk(PrefillRequest(rid, prompt, sampling), start, end)


def engine_for(model_dir, **kwargs) -> TorchEngine:
    # Small blocks, so chunk boundaries fall inside blocks as well as on their edges.
    return TorchEngine(model_dir, device="cpu", block_size=4, **kwargs)


def prefill_in_chunks(engine: TorchEngine, rid: str, prompt: list[int], ends: list[int],
                      sampling: SamplingParams = SamplingParams()) -> tuple[int, torch.Tensor]:
    """Prefill `prompt` in one mixed step per chunk [previous end, end); return the first token
    and the logits it was sampled from."""
    start = 0
    for end in ends:
        result, logits = mixed_step_with_logits(engine, [], [chunk(rid, prompt, start, end, sampling)])
        assert kv_len(engine, rid) == end
        if end < len(prompt):
            assert result.tokens == {}, "an unfinished prompt must not return a token"
        start = end
    return result.tokens[rid], logits[0]


# -- chunked equals whole ----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ends", [[23], [12, 23], [8, 16, 23], [1, 8, 9, 22, 23]],
                         ids=["one", "two", "three", "uneven"])
def test_chunked_prefill_matches_whole_prefill(model_dir, ends, path):
    engine = engine_for(model_dir, attention=path)
    prompt = tokens(1, 23)
    whole, whole_logits = prefill_with_logits(engine, [PrefillRequest("whole", prompt)])
    first, last_logits = prefill_in_chunks(engine, "chunked", prompt, ends)

    assert first == whole.tokens["whole"]
    torch.testing.assert_close(last_logits, whole_logits[0], rtol=0, atol=ATOL)
    kv_whole, kv_chunked = kv_contents(engine, "whole"), kv_contents(engine, "chunked")
    assert kv_chunked.shape == kv_whole.shape
    torch.testing.assert_close(kv_chunked, kv_whole, rtol=0, atol=ATOL)
    for step in range(6):
        result, logits = decode_with_logits(engine, ["whole", "chunked"])
        assert result.tokens["chunked"] == result.tokens["whole"], f"decode step {step}"
        torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("path", PATHS)
def test_mixed_step_decodes_like_decode_and_prefills_like_prefill(model_dir, path):
    running = [PrefillRequest("a", tokens(1, 13)), PrefillRequest("b", tokens(2, 5))]
    c, d = tokens(3, 10), tokens(4, 17)
    plan = [  # each step decodes a and b, and carries these chunks
        [chunk("c", c, 0, 6), chunk("d", d, 0, 3)],
        [chunk("c", c, 6, 10), chunk("d", d, 3, 11)],
        [chunk("d", d, 11, 17)],
    ]
    ref, mixed = engine_for(model_dir, attention=path), engine_for(model_dir, attention=path)
    ref.prefill(running)
    mixed.prefill(running)
    firsts, first_logits = {}, {}
    for step, chunks in enumerate(plan):
        want, want_logits = decode_with_logits(ref, ["a", "b"])
        got, logits = mixed_step_with_logits(mixed, ["a", "b"], chunks)
        assert {k: got.tokens[k] for k in ("a", "b")} == want.tokens, f"step {step}"
        torch.testing.assert_close(logits[:2], want_logits, rtol=0, atol=ATOL)
        for k, ch in enumerate(chunks):
            rid = ch.request.request_id
            assert (rid in got.tokens) == ch.last, f"step {step}: {rid} token only when its prompt is done"
            if ch.last:
                firsts[rid], first_logits[rid] = got.tokens[rid], logits[2 + k]

    whole, whole_logits = prefill_with_logits(ref, [PrefillRequest("c", c), PrefillRequest("d", d)])
    assert firsts == whole.tokens
    torch.testing.assert_close(first_logits["c"], whole_logits[0], rtol=0, atol=ATOL)
    torch.testing.assert_close(first_logits["d"], whole_logits[1], rtol=0, atol=ATOL)
    for rid in ("c", "d"):
        torch.testing.assert_close(kv_contents(mixed, rid), kv_contents(ref, rid), rtol=0, atol=ATOL)
    everyone = ["a", "b", "c", "d"]
    for step in range(5):
        want, want_logits = decode_with_logits(ref, everyone)
        got, logits = decode_with_logits(mixed, everyone)
        assert got.tokens == want.tokens, f"decode step {step}"
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=ATOL)


def test_mixed_step_timing_counts_the_work(model_dir):
    engine = engine_for(model_dir)
    assert engine.describe().capabilities.can_chunk_prefill
    engine.prefill([PrefillRequest("a", tokens(1, 7))])
    t = engine.mixed_step(["a"], [chunk("b", tokens(2, 9), 0, 5), chunk("c", tokens(3, 3), 0, 3)]).timing
    # decode a: 1 token over 8 of KV; b: 5 tokens up to 5; c: 3 tokens up to 3.
    assert (t.op, t.num_seqs, t.num_tokens, t.kv_tokens, t.max_kv) == ("mixed", 3, 9, 16, 8)
    assert t.seconds > 0
    empty = engine.mixed_step([], [])
    assert empty.tokens == {} and (empty.timing.op, empty.timing.num_seqs) == ("mixed", 0)


def test_seeded_sampling_is_the_same_chunked_or_whole(model_dir):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    neighbour = SamplingParams(temperature=0.8, seed=99)
    prompt, steps = tokens(5, 19), 12

    whole = engine_for(model_dir)
    whole.prefill([PrefillRequest("n", tokens(6, 4), neighbour)])
    n_want = [whole.decode(["n"]).tokens["n"] for _ in range(3)]
    out = [whole.prefill([PrefillRequest("s", prompt, seeded)]).tokens["s"]]
    out += [whole.decode(["s"]).tokens["s"] for _ in range(steps)]

    chunked = engine_for(model_dir)
    chunked.prefill([PrefillRequest("n", tokens(6, 4), neighbour)])
    n_got, got = [], []
    for start, end in [(0, 5), (5, 11), (11, 19)]:  # a seeded neighbour decodes in the same steps
        result = chunked.mixed_step(["n"], [chunk("s", prompt, start, end, seeded)])
        n_got.append(result.tokens["n"])
    got.append(result.tokens["s"])
    got += [chunked.decode(["s"]).tokens["s"] for _ in range(steps)]

    assert got == out
    assert n_got == n_want
    greedy = engine_for(model_dir)
    greedy.prefill([PrefillRequest("g", prompt)])
    greedy_out = [greedy.decode(["g"]).tokens["g"] for _ in range(steps)]
    assert got[1:] != greedy_out, "temperature 1 should not follow the argmax: sampling is not exercised"


@pytest.mark.parametrize("path", PATHS)
def test_chunked_prefill_matches_transformers(model_dir, path):
    hf_model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokens(7, 33)
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0].float()
    engine = engine_for(model_dir, attention=path)
    start = 0
    for end in (10, 11, 26, 33):
        _, logits = mixed_step_with_logits(engine, [], [chunk("p", prompt, start, end)])
        # The last position of each chunk predicts the token after it, as transformers' row end-1 does.
        torch.testing.assert_close(logits[0], ref[end - 1], rtol=0, atol=1e-4)
        start = end


@pytest.mark.parametrize("split", [False, True], ids=["varlen", "varlen-split"])
def test_mixed_steps_are_the_same_on_every_path(model_dir, split, monkeypatch):
    # Decodes of very different KV lengths (with split, varlen gives each length its own decode
    # group), first chunks of one token and of several, a one-token later chunk and a last chunk.
    long, short, c, d = tokens(1, 150), tokens(2, 3), tokens(3, 20), tokens(4, 9)
    steps = [
        (["long", "short"], [chunk("c", c, 0, 1), chunk("d", d, 0, 4)]),
        (["long", "short"], [chunk("c", c, 1, 2), chunk("d", d, 4, 9)]),
        (["long", "short", "d"], [chunk("c", c, 2, 20)]),
        (["long", "short", "c", "d"], []),
    ]
    if split:
        monkeypatch.setattr(attention_module, "GROUP_OVERHEAD_TOKENS", 0)
    results = {}
    for path in PATHS:
        engine = engine_for(model_dir, attention=path)
        first, prefill_logits = prefill_with_logits(engine, [PrefillRequest("long", long),
                                                             PrefillRequest("short", short)], all_positions=True)
        # Every prompt position; the padded layout leaves garbage past a prompt's end.
        got = [(first.tokens, torch.cat([prefill_logits[0], prefill_logits[1, :3]]))]
        for ids, chunks in steps:
            result, logits = mixed_step_with_logits(engine, ids, chunks)
            got.append((result.tokens, logits))
        results[path] = got
    for step, ((want, want_logits), (got_tokens, logits)) in enumerate(zip(results["padded"], results["varlen"])):
        assert got_tokens == want, f"step {step}"
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=ATOL)


# -- refused calls change nothing ----------------------------------------------------------------


def _prompt_p() -> list[int]:
    return tokens(11, 10)


@pytest.fixture
def engine(model_dir) -> TorchEngine:
    """'run' has a whole 6-token prompt; 'p' has prefilled 4 of its 10 prompt tokens."""
    engine = engine_for(model_dir, max_seq_len=32)
    engine.prefill([PrefillRequest("run", tokens(10, 6))])
    engine.mixed_step([], [chunk("p", _prompt_p(), 0, 4)])
    return engine


def _with(prompt: list[int], at: int, token: int) -> list[int]:
    return prompt[:at] + [token] + prompt[at + 1:]


REFUSED = {
    "gap": ([], lambda: [chunk("p", _prompt_p(), 6, 10)],
            r"\[6, 10\) of 'p' starts at 6 but the request holds 4 tokens of KV \(a gap\); .* must start at 4"),
    "overlap": ([], lambda: [chunk("p", _prompt_p(), 2, 6)],
                r"\[2, 6\) of 'p' starts at 2 but the request holds 4 tokens of KV \(an overlap\)"),
    "unknown not at 0": ([], lambda: [chunk("ghost", tokens(12, 8), 3, 5)],
                         r"chunk \[3, 5\) of unknown request 'ghost' must start at 0"),
    "start 0 of a prefilling id": ([], lambda: [chunk("p", _prompt_p(), 0, 2)], r"'p' is already in use"),
    "start 0 of a running id": ([], lambda: [chunk("run", tokens(10, 6), 0, 3)], r"'run' is already in use"),
    "one id twice in a call": ([], lambda: [chunk("new", [5, 6], 0, 1), chunk("new", [5, 6], 0, 2)],
                               r"\['new'\] have more than one chunk"),
    "chunk of a complete prompt": ([], lambda: [chunk("run", tokens(10, 6), 3, 6)],
                                   r"'run' has prefilled its whole 6-token prompt already"),
    "decode a prefilling request": (["run", "p"], lambda: [],
                                    r"\['p'\] are still prefilling .*'p' has 4 of 10 prompt tokens"),
    "prompt longer than max_seq_len": ([], lambda: [chunk("long", tokens(13, 33), 0, 4)],
                                       r"'long' has a 33-token prompt, longer than max_seq_len=32"),
    "token out of vocabulary": ([], lambda: [chunk("bad", [5, 128, 7], 0, 2)],
                                r"'bad' has token ids outside \[0, 128\): \[128\]"),
    "later chunk out of vocabulary": ([], lambda: [chunk("p", _with(_prompt_p(), 6, -1), 4, 10)],
                                      r"'p' has token ids outside \[0, 128\): \[-1\]"),
    "prompt changed between chunks": ([], lambda: [chunk("p", _prompt_p()[:9], 4, 9)],
                                      r"\[4, 9\) of 'p' has a 9-token prompt, but its first chunk had 10"),
    "good parts beside a bad one": (["run"], lambda: [chunk("new", [5, 6], 0, 2), chunk("p", _prompt_p(), 5, 10)],
                                    r"'p' starts at 5 .* holds 4"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_mixed_step_names_the_request_and_changes_nothing(engine, case):
    decode_ids, chunks, message = REFUSED[case]
    before = (engine.kv_blocks_used("cpu"), kv_len(engine, "run"), kv_len(engine, "p"))
    with pytest.raises(EngineError, match=message):
        engine.mixed_step(decode_ids, chunks())
    assert (engine.kv_blocks_used("cpu"), kv_len(engine, "run"), kv_len(engine, "p")) == before
    for rid in ("ghost", "new", "long", "bad"):
        with pytest.raises(EngineError, match="unknown request id"):
            engine.tier_of(rid)  # not registered
    engine.cache.check_consistency()
    # The engine goes on as if the call never came.
    result = engine.mixed_step(["run"], [chunk("p", _prompt_p(), 4, 10)])
    assert set(result.tokens) == {"run", "p"}


def test_decode_refuses_a_request_still_prefilling(engine):
    used = engine.kv_blocks_used("cpu")
    with pytest.raises(EngineError, match=r"decode: requests \['p'\] are still prefilling .*'p' has 4 of 10"):
        engine.decode(["run", "p"])
    assert engine.kv_blocks_used("cpu") == used and kv_len(engine, "run") == 6


# -- failed steps give back their blocks -------------------------------------------------------


def test_out_of_blocks_in_a_mixed_step_changes_nothing(model_dir):
    engine = engine_for(model_dir, kv_blocks=6)
    engine.prefill([PrefillRequest("run", tokens(1, 8))])  # 2 blocks; its next token needs a third
    p = tokens(2, 12)
    engine.mixed_step([], [chunk("p", p, 0, 4)])  # 1 block
    tables = {r: list(engine.cache.tables[r]) for r in ("run", "p")}
    # run +1 and p +2 blocks fit in the 3 free ones; q's 2 more do not.
    with pytest.raises(OutOfKVBlocks, match="out of blocks"):
        engine.mixed_step(["run"], [chunk("p", p, 4, 12), chunk("q", tokens(3, 8), 0, 8)])
    assert engine.kv_blocks_used("cpu") == 3
    assert {r: engine.cache.tables[r] for r in ("run", "p")} == tables
    assert (kv_len(engine, "run"), kv_len(engine, "p")) == (8, 4)
    with pytest.raises(EngineError, match="unknown request id"):
        engine.tier_of("q")
    engine.cache.check_consistency()
    result = engine.mixed_step(["run"], [chunk("p", p, 4, 12)])  # without q it fits
    assert set(result.tokens) == {"run", "p"} and engine.kv_blocks_used("cpu") == 6


def test_a_failing_forward_gives_back_what_the_step_reserved(model_dir, monkeypatch):
    engine, ref = engine_for(model_dir), engine_for(model_dir)
    p, q = tokens(2, 14), tokens(3, 9)
    for e in (engine, ref):
        e.prefill([PrefillRequest("run", tokens(1, 8))])
        e.mixed_step([], [chunk("p", p, 0, 5)])
    step = (["run"], [chunk("p", p, 5, 14), chunk("q", q, 0, 9)])
    used, tables = engine.kv_blocks_used("cpu"), {r: list(engine.cache.tables[r]) for r in ("run", "p")}

    real_model = engine.model

    def failing_model(batch, cache, **kwargs):
        real_model(batch, cache, **kwargs)  # writes this step's KV into the cache, then fails
        raise RuntimeError("injected model failure")

    monkeypatch.setattr(engine, "model", failing_model)
    with pytest.raises(RuntimeError, match="injected"):
        engine.mixed_step(*step)
    assert engine.kv_blocks_used("cpu") == used
    assert {r: engine.cache.tables[r] for r in ("run", "p")} == tables
    assert (kv_len(engine, "run"), kv_len(engine, "p")) == (8, 5)
    with pytest.raises(EngineError, match="unknown request id"):
        engine.tier_of("q")
    engine.cache.check_consistency()

    monkeypatch.setattr(engine, "model", real_model)
    got, want = mixed_step_with_logits(engine, *step), mixed_step_with_logits(ref, *step)
    assert got[0].tokens == want[0].tokens  # the failed attempt left nothing behind that matters
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=ATOL)


# -- freeing -----------------------------------------------------------------------------------


def test_blocks_return_to_zero_after_free_even_mid_prompt(model_dir):
    engine = engine_for(model_dir)
    p = tokens(1, 20)
    engine.prefill([PrefillRequest("whole", tokens(2, 6))])  # 2 blocks
    engine.mixed_step(["whole"], [chunk("p", p, 0, 5), chunk("q", tokens(3, 3), 0, 3)])  # p 2, q 1
    assert engine.kv_blocks_used("cpu") == 2 + 2 + 1
    engine.free(["p"])  # mid-prompt
    assert engine.kv_blocks_used("cpu") == 3
    with pytest.raises(EngineError, match=r"unknown request 'p' must start at 0"):
        engine.mixed_step([], [chunk("p", p, 5, 20)])
    engine.mixed_step([], [chunk("p", p, 0, 20)])  # a freed id starts again from 0
    assert kv_len(engine, "p") == 20
    engine.free(["whole", "p", "q"])
    assert engine.kv_blocks_used("cpu") == 0
    engine.cache.allocator.check_empty()


def test_a_prompt_can_be_offloaded_between_chunks(model_dir):
    engine = engine_for(model_dir, host_kv_blocks=16)
    prompt = tokens(4, 15)
    whole = engine.prefill([PrefillRequest("whole", prompt)]).tokens["whole"]
    engine.mixed_step([], [chunk("p", prompt, 0, 6)])
    engine.wait(engine.move(["p"], "cpu", "host"))
    where = r"KV must be on 'cpu' to prefill chunk \[6, 15\) of 'p', but it is in 'host'"
    with pytest.raises(EngineError, match=where):
        engine.mixed_step([], [chunk("p", prompt, 6, 15)])
    engine.wait(engine.move(["p"], "host", "cpu"))
    assert engine.mixed_step([], [chunk("p", prompt, 6, 15)]).tokens == {"p": whole}
    engine.free(["whole", "p"])
    assert engine.kv_blocks_used("cpu") == 0 and engine.kv_blocks_used("host") == 0

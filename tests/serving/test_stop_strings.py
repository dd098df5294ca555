"""Stop strings on the generated text: what is held back, where the text is cut, and that a stop
string is found however the tokens split it (the case token-id matching misses)."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models

from build_scripts.demo_checkpoint import byte_tokenizer
from orchestrator.core import FinishReason, TokenEvent
from serving.stop_strings import StopMatcher, TextOutput


def pushed(matcher: StopMatcher, pieces) -> list[str]:
    return [matcher.push(p) for p in pieces]


def test_text_that_may_start_a_stop_string_is_held_until_it_cannot():
    m = StopMatcher(["</answer>"])
    assert pushed(m, ["The end", " </an", "d more"]) == ["The end", " ", "</and more"]
    assert m.matched is None and m.flush() == ""


def test_the_text_stops_before_the_stop_string_or_after_it_with_keep_stop():
    drop, keep = StopMatcher(["\n\n"]), StopMatcher(["\n\n"], keep_stop=True)
    assert pushed(drop, ["one\n", "\ntwo"]) == ["one", ""] and drop.matched == "\n\n"
    assert pushed(keep, ["one\n", "\ntwo"]) == ["one", "\n\n"]
    assert drop.push("more") == "" and drop.flush() == ""  # nothing after a match


def test_the_first_stop_string_completed_wins_whatever_the_pieces():
    text = "say abcd now"
    for size in (1, 2, 3, len(text)):
        m = StopMatcher(["bcd", "abcx", "c"], keep_stop=True)
        out = "".join(m.push(text[i:i + size]) for i in range(0, len(text), size))
        assert (out, m.matched) == ("say abc", "c"), size
    m = StopMatcher(["abc", "bc"])  # both end at the same character: the longer one is cut
    assert m.push("xxabcyy") == "xx" and m.matched == "abc"


def test_a_tail_held_back_is_released_at_the_end():
    m = StopMatcher(["STOP"])
    assert m.push("almost ST") == "almost " and m.flush() == "ST"


def events(request_id, ids, reason=FinishReason.LENGTH):
    """One event per token, the last one final."""
    return [TokenEvent(request_id, (t,), reason if i == len(ids) - 1 else None) for i, t in enumerate(ids)]


def run(output: TextOutput, evs) -> tuple[str, list[int], str | None, int]:
    text, ids, reason, pieces = [], [], None, 0
    for e in evs:
        piece = output.feed(e)
        if piece is None:
            continue
        pieces += 1
        text.append(piece.text)
        ids.extend(piece.token_ids)
        reason = piece.finish_reason
    return "".join(text), ids, reason, pieces


def test_text_output_stops_across_token_boundaries_and_cancels_once():
    tok = byte_tokenizer()  # one token per byte: every multi-character stop string spans tokens
    ids = list("Hello world. Bye".encode())
    cancelled = []
    out = TextOutput(tok, ["world"], on_stop=cancelled.append)
    text, got, reason, _ = run(out, events("req-1", ids))
    assert (text, reason, cancelled) == ("Hello ", "stop", ["req-1"])
    assert got == ids[:11] and out.token_count == 11  # up to the token that completed "world"
    out = TextOutput(tok, ["world"], keep_stop=True, on_stop=cancelled.append)
    assert run(out, events("req-2", ids))[0] == "Hello world"


def test_text_output_without_a_match_passes_everything_and_the_finish_reason():
    tok = byte_tokenizer()
    ids = list("naïve café".encode())  # multi-byte characters are released whole
    out = TextOutput(tok, ["xyz"], on_stop=pytest.fail)
    text, got, reason, pieces = run(out, events("req-1", ids))
    assert (text, got, reason, pieces) == ("naïve café", ids, "length", len(ids))
    assert out.finished and out.feed(TokenEvent("req-1", (1,))) is None


def test_a_stop_string_in_the_last_token_finishes_with_stop_and_cancels_nothing():
    tok = byte_tokenizer()
    cancelled = []
    out = TextOutput(tok, ["END"], on_stop=cancelled.append)
    assert run(out, events("r", list(b"the END")))[::2] == ("the ", "stop") and cancelled == []


def test_cancelled_and_failed_requests_end_the_output():
    tok = byte_tokenizer()
    out = TextOutput(tok)
    assert out.feed(TokenEvent("r", (65,))).text == "A"
    piece = out.feed(TokenEvent("r", (), FinishReason.ERROR, "engine failed"))
    assert (piece.finish_reason, piece.error, out.finished) == ("error", "engine failed", True)


def merging_tokenizer() -> Tokenizer:
    """'ab' and 'bc' are tokens; 'abc' encodes as ab + c, so the stop string 'bc' (token 4 on its
    own) never appears as token 4 in that output."""
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4}, merges=[("a", "b"), ("b", "c")]))
    tok.decoder = decoders.Fuse()
    return tok


def test_a_stop_string_that_tokenizes_differently_in_context_is_still_found():
    tok = merging_tokenizer()
    assert tok.encode("bc").ids == [4] and tok.encode("abc").ids == [3, 2]
    cancelled = []
    out = TextOutput(tok, ["bc"], on_stop=cancelled.append)
    text, ids, reason, _ = run(out, events("r", [3, 2, 0, 0]))
    assert (text, ids, reason, cancelled) == ("a", [3, 2], "stop", ["r"])

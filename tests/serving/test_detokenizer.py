"""Streaming text never splits a multi-byte character, and the pieces add up to the whole."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from build_scripts.demo_checkpoint import byte_tokenizer
from serving.detokenizer import IncrementalDetokenizer

TOK = byte_tokenizer()
SPECIAL = ("<s>", "</s>", "<pad>")  # encoded as their special ids, which decoding skips


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=60).filter(lambda t: not any(s in t for s in SPECIAL)),
       chunk=st.integers(1, 4))
def test_streamed_pieces_concatenate_to_the_full_decode(text, chunk):
    ids = TOK.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(TOK)
    pieces = [detok.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_character_is_held_until_complete():
    ids = TOK.encode("é", add_special_tokens=False).ids
    assert len(ids) == 2  # two bytes, two byte-level tokens
    detok = IncrementalDetokenizer(TOK)
    assert detok.push(ids[:1]) == ""
    assert detok.push(ids[1:]) == "é"

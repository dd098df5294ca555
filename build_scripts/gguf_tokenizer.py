"""A GGUF file's tokenizer, rebuilt as Hugging Face tokenizer files.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, the merges, each token's type
and the special token ids as metadata (`tokenizer.ggml.*`), and the chat template as
`tokenizer.chat_template`. `write_tokenizer(meta, out_dir, where)` rebuilds a fast tokenizer from
them with the `tokenizers` library and writes tokenizer.json, tokenizer_config.json (special
tokens, add_bos_token, chat_template) and chat_template.jinja.

Two vocabularies (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE with merges (Llama 3, SmolLM, ...). How text is split before the merges
  is named by `tokenizer.ggml.pre`; `PRE_TOKENIZERS` lists the splits known here, each the one
  llama.cpp applies for that name (the model's own tokenizer.json split).
- "llama": SentencePiece BPE (Llama 1/2, Mistral, TinyLlama): pieces with scores, "▁" for a
  space, unknown characters as <0xXX> byte tokens. The merges are recovered from the scores: a
  pair merges before another when the piece it makes scores higher, which is the order llama.cpp
  merges in.

Tokens the file marks as control (like <|im_end|>) become special added tokens and user-defined
ones plain added tokens, so that they are matched whole in text; in a byte-level vocabulary a
control token spelled outside the byte alphabet is a llama.cpp mislabel and stays an ordinary
token (transformers' GGUF loader reads them the same way).
"""
from __future__ import annotations

import json
from pathlib import Path

from build_scripts.checkpoint import BuildError
from build_scripts.demo_checkpoint import bytes_to_unicode

CONTROL, USER_DEFINED = 3, 4
"""llama.cpp token types (tokenizer.ggml.token_type) that become added tokens."""

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": ("gpt2",),  # also a file without tokenizer.ggml.pre
    "gpt-2": ("gpt2",),
    "smollm": ("digits", "gpt2"),
    "llama-bpe": ("split", _LLAMA3_SPLIT),
    "llama3": ("split", _LLAMA3_SPLIT),
    "llama-v3": ("split", _LLAMA3_SPLIT),
    "smaug-bpe": ("split", _LLAMA3_SPLIT),
    "qwen2": ("split", _QWEN2_SPLIT),
    "deepseek-r1-qwen": ("split", _QWEN2_SPLIT),
    "tekken": ("split", _TEKKEN_SPLIT),
}
"""tokenizer.ggml.pre -> how byte-level text is split before the merges: GPT-2's regex ("gpt2"),
each digit on its own first ("digits", then GPT-2's), or one regex ("split", pattern). "default"
is read as GPT-2's split, as transformers does; llama.cpp's own fallback splits a little more."""

_IGNORES_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "tekken"}
"""Vocabularies whose tokenizer.json sets `ignore_merges`: a whole word that is a token stays one."""


def write_tokenizer(meta: dict, out_dir: Path, where: str, context_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and (when the file has one) chat_template.jinja
    into `out_dir`; BuildError naming `where` and the metadata key on any problem."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
        raise BuildError(f"{where}: metadata key {missing} is missing: the file carries no tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise BuildError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if model == "gpt2":
        tok, control = _byte_level(meta, tokens, types, where)
    elif model == "llama":
        tok, control = _sentencepiece(meta, tokens, types, where)
    else:
        raise BuildError(f"{where}: tokenizer.ggml.model {model!r} is not supported; supported: gpt2 "
                         "(byte-level BPE), llama (SentencePiece)")
    _add_tokens(tok, tokens, types, control)

    specials = {name: _special(meta, key, tokens, where) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))  # llama.cpp's defaults
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag and specials[name] is None:
            raise BuildError(f"{where}: tokenizer.ggml.add_{name} is set but tokenizer.ggml.{name}_id is missing")
    _post_processor(tok, specials["bos_token"] if add_bos else None, specials["eos_token"] if add_eos else None)
    tok.save(str(out_dir / "tokenizer.json"))

    config = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        **{name: special[0] for name, special in specials.items() if special is not None},
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise BuildError(f"{where}: tokenizer.chat_template must be a string")
        config["chat_template"] = template
        (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                                   encoding="utf-8")


def _byte_level(meta: dict, tokens: list[str], types: list[int], where: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise BuildError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                         f"{', '.join(sorted(PRE_TOKENIZERS))}")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise BuildError(f"{where}: metadata key tokenizer.ggml.merges is missing: a gpt2 (byte-level BPE) "
                         "vocabulary needs its merges")
    alphabet = bytes_to_unicode()
    spelled = set(alphabet.values())
    # A token outside the byte alphabet (an added token stored as raw text) is spelled byte by byte.
    vocab = {t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise BuildError(f"{where}: tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORES_MERGES))
    kind, *args = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "split")
    if kind == "split":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(args[0]), behavior="isolated"), byte_level])
    elif kind == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    control = {i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and set(t) <= spelled}
    return tok, control


def _sentencepiece(meta: dict, tokens: list[str], types: list[int], where: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise BuildError(f"{where}: a llama (SentencePiece) vocabulary needs tokenizer.ggml.scores, one per token")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(vocab, dict(zip(tokens, scores))),
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok, {i for i, ty in enumerate(types) if ty == CONTROL}


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary, best first: higher score of the
    piece it makes, then the longer left and right part; splits of one piece by their parts' ids."""
    found = []
    for piece, score in scores.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((score, len(left), len(right), left, right) for left, right in splits)
    found.sort(key=lambda m: m[:3], reverse=True)  # stable: equal keys keep the order above
    return [(left, right) for *_, left, right in found]


def _add_tokens(tok, tokens: list[str], types: list[int], control: set[int]) -> None:
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in sorted(control)])
    vocab = tok.get_vocab()
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab])


def _special(meta: dict, key: str, tokens: list[str], where: str) -> tuple[str, int] | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise BuildError(f"{where}: tokenizer.ggml.{key} is {token_id}, outside the {len(tokens)} tokens")
    return tokens[token_id], token_id


def _post_processor(tok, bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> None:
    """BOS before and EOS after each sequence, as llama.cpp's add_bos_token/add_eos_token say."""
    from tokenizers import processors

    if bos is None and eos is None:
        return

    def sequence(name: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in ([bos[0]] if bos else []) + [name] + ([eos[0]] if eos else [])]

    tok.post_processor = processors.TemplateProcessing(
        single=sequence("$A", 0), pair=sequence("$A", 0) + sequence("$B", 1),
        special_tokens=list(dict(s for s in (bos, eos) if s).items()),
    )

"""Load the engine directory's tokenizer (Hugging Face `tokenizers` JSON)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from engines.manifest import read_manifest


def load_tokenizer(engine_dir: str | Path) -> Tokenizer:
    manifest = read_manifest(engine_dir)
    path = Path(engine_dir) / manifest.tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path} is not a valid tokenizer.json ({e}); rebuild the engine") from e


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """UTF-8 bytes of the longest token of the vocabulary (special tokens included): a text of
    more than n times this many bytes takes more than n tokens. SmolLM2's: 81 (80 spaces and a
    newline)."""
    return max(len(tokenizer.decode([i], skip_special_tokens=False).encode()) for i in range(tokenizer.get_vocab_size()))


def max_prompt_bytes(tokenizer: Tokenizer, max_seq_len: int, configured: int = 0) -> int:
    """The most bytes a prompt can have and still fit max_seq_len tokens (`ServeConfig.max_prompt_bytes`
    when set): anything longer is refused before it is tokenized."""
    return configured or max_seq_len * max_token_bytes(tokenizer)

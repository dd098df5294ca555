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

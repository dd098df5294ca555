"""The engine directory's `manifest.json`: what `make build-engine` wrote and every loader reads.

An engine directory holds the checkpoint's config.json, its safetensors weights (one file or
shards with model.safetensors.index.json), tokenizer.json, and this manifest.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """The engine directory or its manifest is missing or unusable; the message says which file."""


@dataclass(frozen=True, slots=True)
class WeightFile:
    """One safetensors file of the engine and its checksum."""

    file: str
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a loader needs to know before it opens a weight file."""

    backend: str
    """Engine backend that serves this directory: "torch" (later also "tensorrt_llm", "sim")."""
    architecture: str
    """Hugging Face architecture, e.g. "LlamaForCausalLM"."""
    dtype: str
    """Compute dtype the engine runs in: "float32" or "bfloat16"."""
    max_seq_len: int
    """Longest KV (prompt + generated tokens) of one request."""
    kv_block_size: int
    """Tokens per KV block."""
    kv_blocks_device: int
    """KV blocks per device pool, sized from the build's memory budget."""
    kv_blocks_host: int
    """KV blocks in the host pool (0 until an engine can offload)."""
    bytes_per_block: int
    """Bytes of one KV block over all layers, K and V, in `dtype`."""
    tokenizer: str
    """Tokenizer file name inside the engine directory."""
    weights: tuple[WeightFile, ...]
    weights_sha256: str
    """Checksum over all weight files' checksums, in file-name order."""
    num_params: int
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    source: str = ""
    """Where the checkpoint came from (path, or "demo")."""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def kv_summary(self) -> str:
        """What the engine's KV pools hold (it allocates them when it loads), and, when the build
        sized them by default, why: for `make build-engine` and `make serve` to say."""
        gib = 2**30
        device = self.kv_blocks_device * self.bytes_per_block / gib
        host = self.kv_blocks_host * self.bytes_per_block / gib
        why = self.extra.get("kv_budget")
        return (f"KV cache: {device:.2f} GiB per device ({self.kv_blocks_device * self.kv_block_size} tokens), "
                f"{host:.2f} GiB host pool" + (f" ({why})" if why else ""))
    """Backend-specific settings."""

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST_NAME) -> "Manifest":
        if d.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format_version {d.get('format_version')!r} is not {FORMAT_VERSION}; "
                "rebuild the engine with `make build-engine`"
            )
        try:
            d = dict(d)
            d["weights"] = tuple(WeightFile(**w) for w in d["weights"])
            d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{where}: malformed manifest ({e}); rebuild the engine") from e


def read_manifest(engine_dir: str | Path) -> Manifest:
    """Read and check `engine_dir/manifest.json`, raising ManifestError with the path on failure."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise ManifestError(
            f"engine directory {engine_dir} does not exist; build one with "
            f"`make build-engine MODEL=<hf dir> OUT={engine_dir}` (or `make build-engine` for the demo)"
        )
    path = engine_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} is missing: {engine_dir} is not an engine directory; rebuild it")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); rebuild the engine") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    m = Manifest.from_dict(data, where=str(path))
    for w in m.weights:
        wp = engine_dir / w.file
        if not wp.is_file():
            raise ManifestError(f"{wp} named in {path} is missing; rebuild the engine")
        size = wp.stat().st_size
        if size != w.bytes:
            raise ManifestError(
                f"{wp} is {size} bytes but the manifest says {w.bytes}: truncated or replaced; rebuild the engine"
            )
    if not (engine_dir / m.tokenizer).is_file():
        raise ManifestError(f"{engine_dir / m.tokenizer} named in {path} is missing; rebuild the engine")
    return m

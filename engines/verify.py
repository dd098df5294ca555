"""`make verify-engine ENGINE=<dir>`: does an engine directory keep a request's tokens through every move?

Runs the engine contract directly (no server, no orchestrator) on one built engine directory and
compares greedy tokens of the same prompt:

- `uninterrupted`: prefill, then decode; the reference.
- `park-resume`: decode a few tokens, park the request in the host tier (device -> host), bring it
  back (host -> device), decode the rest. On TensorRT-LLM this checks the KV connector's save and
  load (LLM-API flavour) or the reuse of a cancelled request's cached blocks (Executor flavour).
- `hand-off` (with `--helper-device`): prefill on the helper, move the KV to the decode device
  (TensorRT-LLM: context-only / generation-only requests over the cache transceiver), decode the rest.
- `no-leak`: every request freed, no KV block left on any tier.

Each check prints PASS, FAIL (with the first differing position) or SKIP (the engine lacks the
capability); the exit code is 1 if any check failed. In bfloat16, recomputing the last partial
block on resume can change a late greedy token legitimately; float32 engines must match exactly.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from engines.base import HOST, Engine, EngineError, PrefillRequest, SamplingParams

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"


@dataclass(slots=True)
class Check:
    """One verification: its name, its outcome and what it saw."""

    name: str
    outcome: str
    """"PASS", "FAIL" or "SKIP"."""
    detail: str
    seconds: float = 0.0


def reference(engine: Engine, prompt: Sequence[int], n: int, rid: str = "verify-ref") -> list[int]:
    """Greedy tokens of `prompt`, prefilled and decoded on the decode device without interruption."""
    tokens = [engine.prefill([PrefillRequest(rid, list(prompt), SamplingParams())]).tokens[rid]]
    try:
        tokens += [engine.decode([rid]).tokens[rid] for _ in range(n - 1)]
    finally:
        engine.free([rid])
    return tokens


def park_resume(engine: Engine, prompt: Sequence[int], n: int, rid: str = "verify-park") -> list[int]:
    """The same, with a round trip through the host tier after a third of the tokens."""
    info = engine.describe()
    tokens = [engine.prefill([PrefillRequest(rid, list(prompt), SamplingParams())]).tokens[rid]]
    try:
        tokens += [engine.decode([rid]).tokens[rid] for _ in range(max(1, n // 3) - 1)]
        engine.wait(engine.move([rid], info.decode_device, HOST))
        engine.wait(engine.move([rid], HOST, info.decode_device))
        tokens += [engine.decode([rid]).tokens[rid] for _ in range(n - len(tokens))]
    finally:
        engine.free([rid])
    return tokens


def hand_off(engine: Engine, prompt: Sequence[int], n: int, helper: str, rid: str = "verify-handoff") -> list[int]:
    """Prefill on the helper device, move the KV to the decode device, decode there."""
    info = engine.describe()
    request = [PrefillRequest(rid, list(prompt), SamplingParams())]
    try:
        if info.capabilities.can_overlap_prefill:
            handle = engine.start_prefill(request, helper)
            engine.wait_any([handle])
            tokens = [engine.prefill_result(handle).tokens[rid]]
        else:
            tokens = [engine.prefill(request, device=helper).tokens[rid]]
        engine.wait(engine.move([rid], helper, info.decode_device))
        tokens += [engine.decode([rid]).tokens[rid] for _ in range(n - 1)]
    finally:
        engine.free([rid])
    return tokens


def compare(name: str, ref: list[int], run: Callable[[], list[int]]) -> Check:
    t0 = time.perf_counter()
    try:
        got = run()
    except EngineError as e:
        return Check(name, "FAIL", f"engine error: {e}", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if got == ref:
        return Check(name, "PASS", f"{len(got)} tokens identical to the uninterrupted run", seconds)
    at = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    return Check(name, "FAIL", f"token {at} differs: got {got[at:at + 4]}, expected {ref[at:at + 4]}", seconds)


def verify(engine: Engine, prompt: Sequence[int], n: int, helper: str | None = None) -> list[Check]:
    """Every check this engine's capabilities allow (see the module docstring)."""
    info = engine.describe()
    caps = info.capabilities
    t0 = time.perf_counter()
    try:
        ref = reference(engine, prompt, n)
    except EngineError as e:  # nothing to compare with: the engine does not serve at all
        return [Check("uninterrupted", "FAIL", f"engine error: {e}", time.perf_counter() - t0)]
    checks = [Check("uninterrupted", "PASS", f"{len(ref)} greedy tokens", time.perf_counter() - t0)]
    if caps.can_offload and info.host_blocks > 0:
        checks.append(compare("park-resume", ref, lambda: park_resume(engine, prompt, n)))
    else:
        checks.append(Check("park-resume", "SKIP", "the engine has no host tier (can_offload is off)"))
    if helper is None:
        checks.append(Check("hand-off", "SKIP", "no --helper-device given"))
    elif helper not in [d.name for d in info.devices[1:]] or not caps.can_peer_copy:
        checks.append(Check("hand-off", "FAIL", f"{helper} is not a helper device of this engine "
                                                f"(devices {[d.name for d in info.devices]}, "
                                                f"can_peer_copy={caps.can_peer_copy})"))
    else:
        checks.append(compare("hand-off", ref, lambda: hand_off(engine, prompt, n, helper)))
    tiers = [d.name for d in info.devices] + ([HOST] if info.host_blocks else [])
    leaked = {t: n for t in tiers if (n := engine.kv_blocks_used(t))}
    checks.append(Check("no-leak", "FAIL" if leaked else "PASS",
                        f"blocks still held: {leaked}" if leaked else "every tier back to 0 blocks"))
    return checks


def _prompt_ids(engine_dir: str, text: str) -> list[int]:
    from tokenizers import Tokenizer

    from engines.manifest import read_manifest

    manifest = read_manifest(engine_dir)
    ids = Tokenizer.from_file(f"{engine_dir}/{manifest.tokenizer}").encode(text).ids
    if manifest.bos_token_id is not None and (not ids or ids[0] != manifest.bos_token_id):
        ids = [manifest.bos_token_id, *ids]
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("engine_dir", help="an engine directory written by `make build-engine` (any backend)")
    p.add_argument("--device", default="auto", help="decode device: auto, cpu or cuda:N (default auto)")
    p.add_argument("--helper-device", default=None, help="also check the hand-off from this device, e.g. cuda:1")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per run (default 16)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (tokenized with the engine's tokenizer)")
    a = p.parse_args(argv)
    if a.tokens < 3:
        p.error(f"--tokens must be >= 3 (park-resume decodes before and after the move), got {a.tokens}")
    from engines.loader import load_engine

    try:
        prompt = _prompt_ids(a.engine_dir, a.prompt)
        engine = load_engine(a.engine_dir, device=a.device,
                             helper_devices=(a.helper_device,) if a.helper_device else ())
    except Exception as e:  # noqa: BLE001 - one line a user can act on, as build and serve do
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        info = engine.describe()
        print(f"{a.engine_dir}: backend {info.backend}, decode device {info.decode_device}, "
              f"{len(prompt)} prompt tokens, {a.tokens} greedy tokens per run")
        checks = verify(engine, prompt, a.tokens, a.helper_device)
    finally:
        engine.close()
    for c in checks:
        print(f"  {c.outcome:4}  {c.name:13} {c.seconds:7.3f}s  {c.detail}")
    return 1 if any(c.outcome == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

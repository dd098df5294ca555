"""The fake TensorRT-LLM offers every name the adapter uses, with the listed parameters; nothing
in the project imports tensorrt_llm at import time."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

from engines.tensorrt_llm.api_surface import API_SURFACE, ENGINE, LLM_API, SRC

REPO = Path(__file__).resolve().parents[3]
CHECKED_KINDS = ("class", "method", "enum", "attribute")


def _resolve(name: str):
    api = API_SURFACE_BY_NAME[name]
    obj = importlib.import_module(api.module)
    for part in api.name.split("."):
        obj = getattr(obj, part)
    return obj


API_SURFACE_BY_NAME = {a.qualname: a for a in API_SURFACE}


def _has_field(obj, name: str) -> bool:
    if hasattr(obj, name):
        return True
    if dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
        return True
    return any(name in getattr(k, "__annotations__", {}) for k in getattr(obj, "__mro__", ()))


def _mismatches(api) -> list[str]:
    """What is wrong with one listed name: its entry, or the fake's version of it."""
    found = []
    if api.kind not in (*CHECKED_KINDS, "env", "cli"):
        found.append(f"kind {api.kind!r} is not one of {(*CHECKED_KINDS, 'env', 'cli')}")
    if not api.source.startswith(("https://github.com/NVIDIA/TensorRT-LLM/", "https://nvidia.github.io/TensorRT-LLM/")):
        found.append(f"source {api.source!r} is not NVIDIA's public source or documentation")
    if not api.flavour or not set(api.flavour) <= {LLM_API, ENGINE}:
        found.append(f"flavour {api.flavour!r} is not a non-empty subset of {(LLM_API, ENGINE)}")
    if api.kind not in CHECKED_KINDS:
        return found
    try:
        obj = _resolve(api.qualname)
    except (ImportError, AttributeError) as e:
        return found + [f"the fake does not offer it ({type(e).__name__}: {e})"]
    if api.kind in ("class", "method"):
        params = inspect.signature(obj).parameters
        explicit = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        missing = [p for p in api.params if p not in explicit]
        if missing:
            found.append(f"the fake lacks parameters {missing}")
    elif api.kind == "attribute":
        missing = [p for p in api.params if not _has_field(obj, p)]
        if missing:
            found.append(f"the fake lacks fields {missing}")
    return found


def test_every_listed_name_is_documented_and_the_fake_offers_it(trtllm):
    """Every entry of api_surface has a kind, a link into NVIDIA's public source and a flavour, and
    the fake offers it with the listed parameters. Both sides are this project's own, so this keeps
    the fake and the list in step (the links are what tie the list to the real package); every
    mismatch is reported at once."""
    problems = [f"{api.qualname}: {m}" for api in API_SURFACE for m in _mismatches(api)]
    assert not problems, f"{len(problems)} mismatches between api_surface and the fake:\n" + "\n".join(problems)


def test_links_name_one_release():
    assert SRC.endswith("/v1.2.1/")


def test_adapter_uses_only_listed_names(trtllm):
    """Every `api.X` attribute the adapter reads is in the list (a crude but useful static check)."""
    import re

    for prefix, module in (("api", "tensorrt_llm.llmapi"), ("b", "tensorrt_llm.bindings.executor")):
        listed = {a.name.split(".")[0] for a in API_SURFACE if a.module.startswith(module)}
        used: set[str] = set()
        for path in (REPO / "engines" / "tensorrt_llm").glob("*.py"):
            used |= set(re.findall(rf"\b{prefix}\.([A-Z]\w+)", path.read_text()))
        assert used and used <= listed, f"{module}: not in api_surface: {sorted(used - listed)}"


def test_nothing_imports_tensorrt_llm_at_import_time():
    code = ("import sys, engines.tensorrt_llm.engine, engines.tensorrt_llm.instances, "
            "engines.tensorrt_llm.executor_llm, engines.tensorrt_llm.connector_classes, "
            "build_scripts.trtllm_build, engines.loader, build_scripts.build_engine; "
            "bad = [m for m in sys.modules if m == 'tensorrt_llm' or m.startswith('tensorrt_llm.')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

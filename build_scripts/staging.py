"""Write an output directory all at once or not at all.

The build writes into a hidden sibling of the output (`.<name>.building-<random>`), on the same
file system, and renames it into place only when everything succeeded; on any error, Ctrl-C
included, the sibling is removed. A reader therefore sees the old engine or the new one, never
half of one.

What may be replaced: nothing at the path, an empty directory, or an engine directory (one
holding manifest.json, i.e. an earlier build: rebuilding is the normal loop). Anything else — a
file, a directory of other things — is refused unless `force` is set, because replacing it
deletes it.
"""
from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from build_scripts.checkpoint import BuildError
from engines.manifest import MANIFEST_NAME


def check_replaceable(out: Path, force: bool) -> None:
    """Raise BuildError unless a finished build may take the place of `out`."""
    if force or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink():
        if (out / MANIFEST_NAME).is_file() or not any(out.iterdir()):
            return
        raise BuildError(
            f"{out} exists and is not an engine directory (no {MANIFEST_NAME}); "
            "choose another --out, or pass --force to delete and replace it"
        )
    raise BuildError(f"{out} exists and is not a directory; choose another --out, or pass --force to replace it")


@contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty directory to fill; on normal exit it becomes `out`, on error it is removed."""
    check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "building")
    tmp.mkdir()  # plain mkdir, not mkdtemp: the engine gets the user's usual permissions
    try:
        yield tmp
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sibling(out: Path, what: str) -> Path:
    return out.parent / f".{out.name}.{what}-{secrets.token_hex(4)}"


def _move_into_place(tmp: Path, out: Path) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    old = _sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()

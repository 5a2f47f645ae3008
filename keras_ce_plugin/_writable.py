"""Checking up front that an output directory can be written.

A command that writes a directory (``keras-ce export --out DIR``, and in time
``train``/``compare``) calls :func:`check_writable_dir` before any work, so that a
path under a regular file, an existing file or a folder it may not write in is
refused at once, in one line, and nothing is left behind.

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> check_writable_dir(d / "new" / "out")
>>> (d / "f").write_text("x")
1
>>> check_writable_dir(d / "f")
Traceback (most recent call last):
...
keras_ce_plugin.errors.KerasCEError: `--out` ... is an existing file; it must be a directory (or not exist). Choose another `--out`.
>>> sorted(p.name for p in d.iterdir())
['f']
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from keras_ce_plugin.errors import KerasCEError


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as any kind of file)."""
    current = path
    while not (current.exists() or current.is_symlink()):
        if current.parent == current:
            break
        current = current.parent
    return current


def check_writable_dir(path: Path, *, flag: str = "--out") -> None:
    """Raises :class:`KerasCEError` unless a directory can be written at ``path``.

    ``path`` may exist (as a directory) or not; the directory is written beside
    itself (a temporary sibling renamed into place), so the check is that its
    nearest existing ancestor -- the folder the missing parents would be created
    in -- accepts a new directory. That is tested by creating and removing an
    empty temporary directory there (permission bits do not stop root, a
    read-only or pseudo file system does). The error names ``flag``, the path and
    the cause. Nothing is left behind.
    """
    path = Path(path)
    name = f"`{flag}` {path}"
    if path.exists() and not path.is_dir():
        raise KerasCEError(
            f"{name} is an existing file; it must be a directory (or not exist). "
            f"Choose another `{flag}`."
        )
    if path.is_symlink() and not path.exists():
        raise KerasCEError(
            f"{name} is a broken symbolic link (to {os.readlink(path)}). Remove it or "
            f"choose another `{flag}`."
        )
    parent = path.absolute().parent
    ancestor = _nearest_existing(parent)
    if not ancestor.is_dir():
        raise KerasCEError(
            f"{name}: {ancestor} is a file, so no directory can be created under it. "
            f"Choose another `{flag}`."
        )
    try:
        probe = tempfile.mkdtemp(prefix=".keras-ce-write-check.", dir=ancestor)
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
        raise KerasCEError(
            f"{name}: cannot create a directory in {ancestor} ({cause}). Choose a "
            f"`{flag}` in a directory you can write to."
        ) from None
    os.rmdir(probe)

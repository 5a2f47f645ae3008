"""Helpers shared by the export modules: the overwrite rule, modes, error text."""

from __future__ import annotations

import os
from pathlib import Path

from keras_ce_plugin.errors import KerasCEError


class ArtifactExistsError(KerasCEError, FileExistsError):
    """An export target exists and ``overwrite`` was not given."""


def describe(exc: BaseException, limit: int = 400) -> str:
    """``exc`` as ``Type: message`` on one line, cut after ``limit`` characters.

    >>> describe(ValueError("bad\\n  value"))
    'ValueError: bad value'
    """
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def missing_export_extra(exc: ImportError) -> KerasCEError:
    """The error for a missing tf2onnx/onnx/onnxruntime."""
    return KerasCEError(
        f"ONNX export needs tf2onnx, onnx and onnxruntime ({describe(exc)}). Install them "
        'with `pip install "keras-ce-plugin[export]"`.'
    )


def require_tensorflow_backend(what: str) -> None:
    """Raises KerasCEError unless Keras runs on TensorFlow (both formats trace with it)."""
    import keras

    if keras.config.backend() != "tensorflow":
        raise KerasCEError(
            f"{what} traces the model with TensorFlow and needs the TensorFlow backend "
            f"(KERAS_BACKEND=tensorflow). Received: keras.config.backend()="
            f"{keras.config.backend()!r}"
        )


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Raises ArtifactExistsError if ``path`` exists and ``overwrite`` is False."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be a bool. Received: overwrite={overwrite!r}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ArtifactExistsError(
            f"{path} already exists. Pass overwrite=True (`--overwrite`) to replace it."
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(root: Path) -> None:
    """Gives ``root`` (and everything under it) the modes a plain write would have.

    The atomic writers create private temporaries (mode 0600/0700); a serving
    artifact must be readable by the server's user (e.g. a TF Serving container).
    """
    mask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)

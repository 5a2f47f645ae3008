"""Checkpoints: model + optimizer + epoch + seed, in one atomically written file.

With ``TrainConfig.checkpoint_every`` > 0 each epoch is its own ``fit`` call with a
data order seeded by :func:`epoch_seed`, and :func:`save_checkpoint` writes the
trained variables (dropout seed states included), the optimizer state, the epoch
and the seed to one file; a run resumed from it (:func:`load_checkpoint`,
``train(..., resume=...)``, :func:`restore`) ends with the same weights as the
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from keras_ce_plugin import files as kio
from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.training.config import HISTORY_KEYS

CHECKPOINT_FILE = "checkpoint.npz"
_CHECKPOINT_FORMAT = 1


@dataclasses.dataclass
class Checkpoint:
    """The state of a run after ``epoch`` completed epochs (see :func:`load_checkpoint`)."""

    epoch: int
    history: dict[str, list[float]]
    model_values: list[np.ndarray]
    optimizer_values: list[np.ndarray]
    meta: dict[str, Any]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order in a checkpointed run.

    >>> epoch_seed(0, 0), epoch_seed(0, 1) != epoch_seed(1, 0)
    (1, True)
    """
    return (seed * 1_000_003 + epoch + 1) % (2**31 - 1)


def save_checkpoint(
    path: str | os.PathLike,
    fit_model: keras.Model,
    *,
    epoch: int,
    history: dict[str, list[float]],
    meta: dict[str, Any],
) -> None:
    """Writes ``fit_model``'s variables (dropout seed states included), its optimizer's
    variables, the epoch and ``meta`` into one ``.npz``, atomically."""
    arrays: dict[str, np.ndarray] = {}
    for prefix, variables in (
        ("model", fit_model.variables),
        ("optimizer", fit_model.optimizer.variables),
    ):
        for i, v in enumerate(variables):
            arrays[f"{prefix}/{i:05d}"] = keras.ops.convert_to_numpy(v)
    info = {**meta, "format": _CHECKPOINT_FORMAT, "epoch": epoch, "history": history}
    arrays["meta"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    with kio.atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a :func:`save_checkpoint` file; a missing or damaged one raises
    :class:`KerasCEError`.

    >>> load_checkpoint("/nonexistent/checkpoint.npz")
    Traceback (most recent call last):
    ...
    keras_ce_plugin.errors.KerasCEError: There is no checkpoint to resume from: ...
    """
    path = Path(path)
    if not path.is_file():
        raise KerasCEError(
            f"There is no checkpoint to resume from: {path} does not exist. A run writes it "
            "with --checkpoint-every N and removes it once the run has finished."
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            names = sorted(k for k in z.files if k != "meta")
            values = {k: z[k] for k in names}
        if meta.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {meta.get('format')!r}")
        history = {k: [float(x) for x in meta["history"][k]] for k in HISTORY_KEYS}
        epoch = int(meta["epoch"])
    except Exception as exc:
        raise KerasCEError(
            f"Checkpoint {path} is damaged or not a keras-ce checkpoint "
            f"({type(exc).__name__}: {exc}). Start the run again with --overwrite."
        ) from None
    return Checkpoint(
        epoch=epoch,
        history=history,
        model_values=[values[k] for k in names if k.startswith("model/")],
        optimizer_values=[values[k] for k in names if k.startswith("optimizer/")],
        meta=meta,
    )


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The meta (epoch, history, arguments, ...) of the checkpoint at ``path`` without
    its arrays; ``None`` if it is missing or unreadable.

    >>> read_meta("/nonexistent/checkpoint.npz") is None
    True
    """
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
    except Exception:
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("epoch"), int) else None


def _assign_all(variables: Sequence[Any], values: Sequence[np.ndarray], what: str) -> None:
    got = [tuple(v.shape) for v in variables]
    want = [tuple(a.shape) for a in values]
    if got != want:
        raise KerasCEError(
            f"The checkpoint's {what} state does not fit this model ({len(want)} arrays, "
            f"expected {len(got)} with shapes {got[:3]}...). Resume with the same version "
            "and arguments that wrote it."
        )
    for v, a in zip(variables, values):
        v.assign(a)


def restore(fit_model: keras.Model, checkpoint: Checkpoint) -> None:
    """Puts ``checkpoint``'s model and optimizer state into the compiled ``fit_model``."""
    _assign_all(fit_model.variables, checkpoint.model_values, "model")
    fit_model.optimizer.build(fit_model.trainable_variables)
    _assign_all(fit_model.optimizer.variables, checkpoint.optimizer_values, "optimizer")

"""A run directory: its files (:data:`RUN_FILES`), written atomically, and the plots.

:func:`write_run` writes ``model.keras``, ``history.json``, ``metrics.json`` and
``curves.png``; :func:`prepare_out_dir` refuses to write into a non-empty
directory unless told to. Figures are built by functions that return a
``matplotlib`` ``Figure`` (:func:`curves_figure`) and turned into PNG bytes by
:func:`figure_png`, with integer epoch ticks (:func:`epoch_axis`).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from keras_ce_plugin import files as kio
from keras_ce_plugin._versions import versions
from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.files import LOCK_FILE
from keras_ce_plugin.training.config import TrainResult

RUN_FILES = ("model.keras", "history.json", "metrics.json", "curves.png")
VALIDATION_NOTE = (
    "validation_data is the test split, as in the tutorial: val_loss and val_accuracy are "
    "test-set numbers, and test_loss/test_accuracy are those of the last epoch"
)


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #
def new_figure(panels: int) -> tuple[Any, Any]:
    """A ``matplotlib`` figure (no GUI backend) with ``panels`` axes side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * panels, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels)


def epoch_axis(ax: Any) -> None:
    """Labels ``ax``'s x axis "epoch", with ticks on whole epochs only."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def figure_png(fig: Any) -> bytes:
    """``fig`` as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def curves_figure(history: dict[str, list[float]], title: str = "") -> Any:
    """Loss and accuracy per epoch (train and validation), one panel each."""
    fig, axes = new_figure(2)
    epochs = range(1, len(history["loss"]) + 1)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, history[key], "o-", label=f"train {key}")
        ax.plot(epochs, history[f"val_{key}"], "s--", label=f"validation (test) {key}")
        epoch_axis(ax)
        ax.set_ylabel(key)
        ax.set_title(f"{title} {key}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def curves_png(history: dict[str, list[float]], title: str = "") -> bytes:
    """:func:`curves_figure` as PNG bytes (``curves.png``)."""
    return figure_png(curves_figure(history, title))


# --------------------------------------------------------------------------- #
# The run directory
# --------------------------------------------------------------------------- #
def prepare_out_dir(path: Path, *, overwrite: bool, expected: Sequence[str]) -> None:
    """Creates ``path``; refuses a file, or a non-empty directory unless ``overwrite``.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()) / "run"
    >>> prepare_out_dir(d, overwrite=False, expected=RUN_FILES); d.is_dir()
    True
    """
    if path.exists() and not path.is_dir():
        raise KerasCEError(f"--out {path} exists and is not a directory.")
    names = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []
    if names and not overwrite:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise KerasCEError(
            f"--out {path} is not empty ({shown}); refusing to overwrite it. Choose another "
            f"directory or pass --overwrite to replace its {', '.join(expected)}."
        )
    path.mkdir(parents=True, exist_ok=True)


def remove_temporaries(run_dir: Path, names: Sequence[str]) -> None:
    """Deletes what killed writers of ``names`` left in ``run_dir``."""
    for name in names:
        kio.clean_stale(run_dir / name)


def save_model(model: keras.Model, target: Path) -> None:
    """``model.save(target)``, atomically."""
    with kio.atomic_path(target, suffix=".keras") as tmp:
        model.save(tmp)


def write_run(
    run_dir: str | os.PathLike,
    result: TrainResult,
    *,
    arguments: dict[str, Any],
    wall_time_s: float,
    loss_label: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes model.keras, history.json, metrics.json and curves.png; returns the metrics."""
    run_dir = Path(run_dir)
    t = time.perf_counter()
    save_model(result.model, run_dir / "model.keras")
    save_s = time.perf_counter() - t
    kio.write_json(run_dir / "history.json", result.history)
    kio.write_bytes(run_dir / "curves.png", curves_png(result.history, title=loss_label))
    total = wall_time_s + (time.perf_counter() - t)
    metrics = {
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "validation": VALIDATION_NOTE,
        "loss": loss_label,
        "base": {k: v for k, v in result.base.items() if k != "expectation"},
        "expectation": result.base.get("expectation"),
        "num_train": result.num_train,
        "num_test": result.num_test,
        "epochs": len(result.history["loss"]),
        "feature_cache": result.feature_cache,
        "assembled_model_max_abs_diff": result.assembly_max_abs_diff,
        "wall_time_s": total,
        "images_per_s": result.num_train * len(result.history["loss"]) / total,
        "images_per_s_note": "training images x epochs / wall time (loading, model "
        "building, feature extraction, training and saving included)",
        "timings_s": {**result.timings, "save_s": save_s},
        "initial_weights_sha256": result.initial_weights_sha256,
        "versions": versions(),
        "arguments": arguments,
        **(extra or {}),
    }
    kio.write_json(run_dir / "metrics.json", metrics)
    return metrics

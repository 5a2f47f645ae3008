"""The ``compare`` experiment: the same training with a loss and with Keras' built-in.

:func:`run_compare` trains twice from the same seed and initial weights (and the
same cached features), with a loss (default ``customloss>CategoricalCE``) and with
``keras.losses.CategoricalCrossentropy()``, and writes :data:`COMPARE_FILES`:
``compare.json`` (the summary), ``compare.png`` (:func:`compare_figure`) and
``report.md`` (:func:`report_md`). The default loss is expected to agree with the
built-in within :data:`DEFAULT_TOLERANCE`, so it gets a verdict; another loss gets
one only when a tolerance is given.

The summary also gives the first epoch's largest difference beside the largest
over all epochs: once the head learns (e.g. on a random base with its standardised
features), float rounding, amplified by training, makes two runs drift apart
epoch after epoch, so the first epoch is the like-for-like comparison of the losses.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import keras

from keras_ce_plugin import files as kio
from keras_ce_plugin._versions import versions
from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.training.artifacts import (
    VALIDATION_NOTE,
    epoch_axis,
    figure_png,
    new_figure,
    prepare_out_dir,
    remove_temporaries,
)
from keras_ce_plugin.training.config import (
    DEFAULT_LOSS,
    HISTORY_KEYS,
    DataSpec,
    TrainConfig,
    TrainResult,
    base_info,
    loss_label,
)
from keras_ce_plugin.training.loop import train

COMPARE_FILES = ("compare.json", "compare.png", "report.md")
CUSTOM, BUILTIN = "custom", "builtin"
DEFAULT_TOLERANCE = 1e-5
BUILTIN_LABEL = "keras.losses.CategoricalCrossentropy()"


def default_tolerance(loss: Any) -> float | None:
    """The tolerance of a verdict when none is given: :data:`DEFAULT_TOLERANCE` for the
    default loss (the built-in's counterpart), else ``None`` (no verdict).

    >>> default_tolerance("customloss>CategoricalCE"), default_tolerance("my>Focal")
    (1e-05, None)
    """
    return DEFAULT_TOLERANCE if loss == DEFAULT_LOSS else None


def builtin_loss() -> keras.losses.Loss:
    """Keras' built-in counterpart of ``customloss>CategoricalCE``, the reference of
    every comparison."""
    return keras.losses.CategoricalCrossentropy()


def compare_histories(
    a: dict[str, list[float]], b: dict[str, list[float]]
) -> dict[str, list[float]]:
    """Per-epoch absolute differences of two histories.

    >>> compare_histories({"loss": [1.0, 0.5]}, {"loss": [1.0, 0.25]})
    {'loss': [0.0, 0.25]}
    """
    return {k: [abs(x - y) for x, y in zip(a[k], b[k])] for k in a if k in b}


def compare_figure(
    histories: dict[str, dict[str, list[float]]], diffs: dict[str, list[float]]
) -> Any:
    """Loss and accuracy of both runs (``{CUSTOM: history, BUILTIN: history}``) and
    their per-epoch absolute differences, one panel each."""
    styles = {CUSTOM: ("-", "o"), BUILTIN: ("--", "x")}
    fig, axes = new_figure(3)
    for ax, key in zip(axes[:2], ("loss", "accuracy")):
        for name, history in histories.items():
            line, marker = styles[name]
            epochs = range(1, len(history[key]) + 1)
            ax.plot(epochs, history[key], line, marker=marker, label=f"{name} train")
            ax.plot(
                epochs,
                history[f"val_{key}"],
                line,
                marker=marker,
                label=f"{name} validation (test)",
            )
        epoch_axis(ax)
        ax.set_ylabel(key)
        ax.set_title(f"{key}: custom vs built-in")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes[2]
    for key, values in diffs.items():
        epochs = range(1, len(values) + 1)
        ax.plot(epochs, [max(v, 1e-12) for v in values], marker="o", label=key)
    ax.set_yscale("log")
    epoch_axis(ax)
    ax.set_ylabel("|custom - built-in| (floored at 1e-12)")
    ax.set_title("absolute difference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def report_md(summary: dict[str, Any]) -> str:
    """``report.md``: what was measured, the per-epoch table and the verdict."""
    c, b = summary["history"][CUSTOM], summary["history"][BUILTIN]
    diffs = summary["abs_diff"]
    custom_label = summary["losses"][CUSTOM]
    lines = [
        f"# {custom_label} vs {BUILTIN_LABEL}",
        "",
        "## What was measured",
        "",
        f"Two training runs of the tutorial's VGG16 + dense head (base: "
        f"{summary['base']['weights']}, "
        f"{'trainable' if summary['base']['trainable'] else 'frozen'}"
        + (
            ", with a fixed standardisation of its features"
            if summary["base"]["feature_standardization"]
            else ""
        )
        + f") on {summary['num_train']} CIFAR-10 training images for "
        f"{summary['epochs']} epochs (batch size {summary['batch_size']}, Adam, "
        f"learning rate {summary['learning_rate']}, seed {summary['seed']}), identical except "
        f"for the loss: `{custom_label}` (custom) and `{BUILTIN_LABEL}` (Keras' built-in). "
        "Both started from the "
        "same initial weights (SHA-256 of all weights: "
        f"`{summary['initial_weights_sha256'][CUSTOM][:16]}...` and "
        f"`{summary['initial_weights_sha256'][BUILTIN][:16]}...`), used the same data order "
        "and dropout masks (same seed), and "
        + (
            "trained the head on the same cached VGG16 features."
            if summary["feature_cache"]
            else "ran plain `model.fit` on the full model."
        ),
        f"Validation data is the {summary['num_test']} test images, as in the tutorial. "
        f"Backend: {summary['versions']['keras_backend']} (Keras "
        f"{summary['versions']['keras']}, TensorFlow {summary['versions']['tensorflow']}) on "
        f"{summary['versions']['platform']}.",
        f"Expectation: {summary['base']['expectation']}.",
        "",
        "## Per epoch",
        "",
        "| epoch | loss custom | loss built-in | abs diff | val_loss custom | val_loss "
        "built-in | abs diff | accuracy custom | accuracy built-in | abs diff | val_accuracy "
        "custom | val_accuracy built-in | abs diff |",
        "|---:" * 13 + "|",
    ]
    for i in range(summary["epochs"]):
        cells = [str(i + 1)]
        for key in HISTORY_KEYS:
            cells += [f"{c[key][i]:.7f}", f"{b[key][i]:.7f}", f"{diffs[key][i]:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    tol = summary["tolerance"]
    worst = summary["max_abs_diff_overall"]
    accuracy, loss = summary["test_accuracy"], summary["test_loss"]
    lines += [
        "",
        "## Test accuracy",
        "",
        f"| | custom (`{custom_label}`) | built-in (`{BUILTIN_LABEL}`) | abs diff |",
        "|---|---:|---:|---:|",
        f"| test accuracy | {accuracy[CUSTOM]:.4f} | {accuracy[BUILTIN]:.4f} | "
        f"{abs(accuracy[CUSTOM] - accuracy[BUILTIN]):.2e} |",
        f"| test loss | {loss[CUSTOM]:.6f} | {loss[BUILTIN]:.6f} | "
        f"{abs(loss[CUSTOM] - loss[BUILTIN]):.2e} |",
        "",
        "## Verdict" if tol is not None else "## Differences",
        "",
        f"Largest absolute difference over all epochs and all four curves: {worst:.3e} "
        f"(loss curves: {summary['max_abs_diff_loss']:.3e}; accuracy curves: "
        f"{summary['max_abs_diff_accuracy']:.3e})"
        + (f"; tolerance {tol:g}." if tol is not None else "."),
        f"First epoch: {summary['first_epoch_max_abs_diff']:.3e}.",
        "",
    ]
    if summary["base"]["feature_standardization"]:
        lines += [drift_note(summary), ""]
    if tol is None:
        lines.append(
            "No verdict: the two losses are not expected to agree. Give a tolerance "
            "(`keras-ce compare --tolerance T`) to get one."
        )
    elif summary["agree"]:
        lines.append(f"**AGREE**: the curves agree within {tol:g}.")
    else:
        lines.append(f"**DIFFER**: the curves differ by more than {tol:g}.")
    lines.append("")
    return "\n".join(lines)


def drift_note(summary: dict[str, Any]) -> str:
    """The sentence on the drift of two runs whose head learns, with the measured values."""
    return (
        "On this base the head learns, and once it does, float rounding (the two losses "
        "compute the same value in a different order), amplified by training, makes "
        "the two runs drift apart epoch after epoch. Here the largest difference is "
        f"{summary['first_epoch_max_abs_diff']:.3e} in the first epoch and "
        f"{summary['max_abs_diff_overall']:.3e} over all {summary['epochs']} epochs; the "
        "first-epoch difference is the like-for-like number. This is about the losses, "
        "not a bug."
    )


def run_compare(
    out: str | Path,
    config: TrainConfig,
    *,
    data: DataSpec,
    tolerance: float | None = None,
    arguments: dict[str, Any] | None = None,
    overwrite: bool = False,
    label: str | None = None,
) -> dict[str, Any]:
    """Trains ``config`` with ``config.loss`` (the custom loss: a name ``compile``
    accepts or a loss object) and with Keras' built-in, writes :data:`COMPARE_FILES`
    into ``out`` (under its run lock) and returns the summary.

    ``summary["agree"]``: every per-epoch difference is within ``tolerance``
    (``None``: :func:`default_tolerance`, i.e. no verdict and ``agree`` ``None`` for a
    loss other than the default). ``label`` names the custom loss in the report
    (default: :func:`~keras_ce_plugin.training.loss_label`).
    """
    start = time.perf_counter()
    if tolerance is None:
        tolerance = default_tolerance(config.loss)
    if tolerance is not None and not (
        isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0
    ):
        raise KerasCEError(f"--tolerance must be a number >= 0. Received: {tolerance!r}")
    config.validate()
    label = label or loss_label(config.loss)
    out = Path(out)
    prepare_out_dir(out, overwrite=overwrite, expected=COMPARE_FILES)
    with kio.run_lock(out):
        remove_temporaries(out, COMPARE_FILES)
        images = data.load()
        runs: dict[str, TrainResult] = {}
        features = None
        for name, loss, shown in (
            (CUSTOM, config.loss, label),
            (BUILTIN, builtin_loss(), BUILTIN_LABEL),
        ):
            if config.verbose:
                print(f"[compare] training with {shown}", file=sys.stderr, flush=True)
            runs[name] = train(dataclasses.replace(config, loss=loss), images, features=features)
            features = runs[name].features
        summary = _summary(runs, config, tolerance, arguments or {}, label)
        histories = {name: result.history for name, result in runs.items()}
        kio.write_bytes(
            out / "compare.png", figure_png(compare_figure(histories, summary["abs_diff"]))
        )
        kio.write_bytes(out / "report.md", report_md(summary).encode())
        summary["wall_time_s"] = time.perf_counter() - start
        kio.write_json(out / "compare.json", summary)
    return summary


def _summary(
    runs: dict[str, TrainResult],
    config: TrainConfig,
    tolerance: float | None,
    arguments: dict,
    label: str,
) -> dict[str, Any]:
    c, b = runs[CUSTOM], runs[BUILTIN]
    if c.initial_weights_sha256 != b.initial_weights_sha256:  # pragma: no cover
        raise RuntimeError("the two runs did not start from the same weights")
    diffs = compare_histories(c.history, b.history)
    max_diff = {k: max(v) for k, v in diffs.items()}
    worst = max(max_diff.values())
    base = base_info(config)
    summary = {
        "measured": "per-epoch loss, accuracy, val_loss and val_accuracy of two runs that "
        "differ only in the loss; abs_diff = |custom - builtin|; " + VALIDATION_NOTE,
        "losses": {CUSTOM: label, BUILTIN: BUILTIN_LABEL},
        "weights": "none (random)" if config.random_base else str(config.weights),
        "base": base,
        "num_train": c.num_train,
        "num_test": c.num_test,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.lr,
        "seed": config.seed,
        "feature_cache": c.feature_cache,
        "initial_weights_sha256": {
            CUSTOM: c.initial_weights_sha256,
            BUILTIN: b.initial_weights_sha256,
        },
        "history": {CUSTOM: c.history, BUILTIN: b.history},
        "test_accuracy": {CUSTOM: c.test_accuracy, BUILTIN: b.test_accuracy},
        "test_loss": {CUSTOM: c.test_loss, BUILTIN: b.test_loss},
        "abs_diff": diffs,
        "max_abs_diff": max_diff,
        "max_abs_diff_loss": max(max_diff["loss"], max_diff["val_loss"]),
        "max_abs_diff_accuracy": max(max_diff["accuracy"], max_diff["val_accuracy"]),
        "max_abs_diff_overall": worst,
        "first_epoch_max_abs_diff": max(v[0] for v in diffs.values()),
        "tolerance": tolerance,
        "agree": None if tolerance is None else worst <= tolerance,
        "versions": versions(),
        "arguments": arguments,
    }
    if base["feature_standardization"]:
        summary["drift_note"] = drift_note(summary)
    return summary

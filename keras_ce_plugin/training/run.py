"""The library side of ``keras-ce train``: a run directory, trained and written.

:func:`train_run` prepares ``out`` (refusing a non-empty one unless ``overwrite``),
holds its lock (:func:`keras_ce_plugin.files.run_lock`) while it trains (resuming
from a :class:`~keras_ce_plugin.training.Checkpoint` if given) and writes
:data:`~keras_ce_plugin.training.RUN_FILES`. With ``config.checkpoint_every`` it
keeps ``out/checkpoint.npz`` (written atomically every N epochs, removed when the
run has finished); a new run into a directory holding such a checkpoint is
refused with a hint to ``--resume`` (:func:`refuse_interrupted`). Everything here
takes plain values: a :class:`~keras_ce_plugin.training.TrainConfig`, a path, a
:class:`~keras_ce_plugin.training.DataSpec` and the dict of arguments to record.
"""

from __future__ import annotations

import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from keras_ce_plugin import files as kio
from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.training.artifacts import (
    RUN_FILES,
    prepare_out_dir,
    remove_temporaries,
    write_run,
)
from keras_ce_plugin.training.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    read_meta,
)
from keras_ce_plugin.training.config import DataSpec, TrainConfig, TrainResult, loss_label
from keras_ce_plugin.training.loop import train


def _say(config: TrainConfig, text: str) -> None:
    if config.verbose:
        print(text, file=sys.stderr, flush=True)


def distribution(
    strategy: str = "none", devices: int | None = None, mixed_precision: str | None = None
) -> Any:
    """The ``tf.distribute`` strategy (``None`` for ``"none"`` without devices) with
    the mixed precision policy set; call before any TensorFlow op.

    >>> distribution() is None
    True
    """
    if strategy == "none" and devices is None and mixed_precision is None:
        return None
    from keras_ce_plugin import distribute

    made = distribute.make_strategy(strategy, devices)
    distribute.set_mixed_precision(mixed_precision)
    return made


def distribution_info(strategy: Any = None) -> dict[str, Any]:
    """What a run trained on, for ``metrics.json``: the strategy's class, its number of
    replicas and the Keras dtype policy.

    >>> distribution_info()["replicas"]
    1
    """
    import keras

    return {
        "strategy": type(strategy).__name__ if strategy is not None else None,
        "replicas": int(strategy.num_replicas_in_sync) if strategy is not None else 1,
        "dtype_policy": keras.config.dtype_policy().name,
    }


def writes_out(strategy: str = "none") -> bool:
    """Whether this process writes the run directory: always, except a non-chief worker
    of the ``multiworker`` strategy.

    >>> writes_out("mirrored")
    True
    """
    if strategy != "multiworker":
        return True
    from keras_ce_plugin import distribute

    return distribute.is_chief()


def resume_checkpoint(out: str | Path) -> Checkpoint:
    """The checkpoint of the killed run in ``out``; :class:`KerasCEError` if there is none."""
    out = Path(out)
    if not out.is_dir():
        raise KerasCEError(f"--resume: --out {out} is not a directory of a run to resume.")
    return load_checkpoint(out / CHECKPOINT_FILE)


def refuse_interrupted(out: str | Path) -> None:
    """Raises :class:`KerasCEError` offering ``--resume`` when ``out`` holds the
    checkpoint of an interrupted run (epochs done, when it was written); a run still
    writing ``out`` is named instead (its lock)."""
    out = Path(out)
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        return
    with kio.run_lock(out):  # a run in progress: "Another keras-ce run ... is writing"
        pass
    meta = read_meta(path)
    when = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    if meta is None:
        done = "an unreadable checkpoint"
    else:
        total = meta.get("arguments", {}).get("epochs")
        done = f"a checkpoint after epoch {meta['epoch']}" + (f" of {total}" if total else "")
    raise KerasCEError(
        f"--out {out} holds {done} of an interrupted run (written {when}). Continue it "
        f"with `keras-ce train --resume {out}`, or pass --overwrite to start a new run there."
    )


def _train_into(
    run_dir: Path,
    config: TrainConfig,
    images: Any,
    strategy: Any,
    resume: Checkpoint | None,
    arguments: dict[str, Any],
) -> TrainResult:
    return train(
        config,
        images,
        strategy=strategy,
        resume=resume,
        checkpoint_path=run_dir / CHECKPOINT_FILE if config.checkpoint_every else None,
        checkpoint_meta={"arguments": arguments},
    )


def train_run(
    out: str | Path,
    config: TrainConfig,
    *,
    data: DataSpec,
    arguments: dict[str, Any],
    overwrite: bool = False,
    resume: Checkpoint | None = None,
    strategy: Any = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Trains ``config`` on ``data`` into the run directory ``out``; returns the result
    and the metrics written to ``metrics.json``.

    ``arguments`` (JSON values) are recorded in ``metrics.json`` and in the checkpoint,
    from which a resumed run takes them back. ``resume`` continues the run in ``out``.
    """
    start = time.perf_counter()
    out = Path(out)
    config.validate()
    if resume is None:
        if not overwrite:
            refuse_interrupted(out)
        prepare_out_dir(out, overwrite=overwrite, expected=RUN_FILES)
    with kio.run_lock(out):
        remove_temporaries(out, (*RUN_FILES, CHECKPOINT_FILE))
        if resume is None:
            (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # a finished or replaced run's
        t = time.perf_counter()
        images = data.load()
        load_s = time.perf_counter() - t
        if resume is not None:
            _say(config, f"resuming {out} after epoch {resume.epoch} of {config.epochs}")
        result = _train_into(out, config, images, strategy, resume, arguments)
        result.timings["load_data_s"] = load_s
        metrics = write_run(
            out,
            result,
            arguments=arguments,
            wall_time_s=time.perf_counter() - start,
            loss_label=loss_label(config.loss),
            extra={
                "resumed_after_epoch": resume.epoch if resume else None,
                "distribution": distribution_info(strategy),
            },
        )
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return result, metrics


def train_as_worker(
    config: TrainConfig,
    *,
    data: DataSpec,
    arguments: dict[str, Any],
    resume: Checkpoint | None = None,
    strategy: Any = None,
) -> TrainResult:
    """A non-chief worker of the ``multiworker`` strategy: trains in step with the
    chief, which alone writes the run directory; this worker writes the same files
    to a temporary directory (every worker must take part in saving) and removes it."""
    images = data.load()
    scratch = Path(tempfile.mkdtemp(prefix="keras-ce-worker-"))
    try:
        result = _train_into(scratch, config, images, strategy, resume, arguments)
        write_run(
            scratch,
            result,
            arguments=arguments,
            wall_time_s=0.0,
            loss_label=loss_label(config.loss),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def worker_name() -> str:
    """``"worker 1"``: this process' task in ``TF_CONFIG``."""
    from keras_ce_plugin import distribute

    task = distribute.parse_tf_config()["task"]
    return f"{task['type']} {task['index']}"

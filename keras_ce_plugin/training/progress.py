"""Training progress that reads well anywhere: Keras' bars on a terminal, one plain
line per epoch elsewhere (CI logs, ``| tee``, files).

>>> import io
>>> class Pipe(io.StringIO):
...     pass
>>> verbose, callbacks = progress_callbacks(True, epochs=3, stream=Pipe())
>>> verbose, [type(c).__name__ for c in callbacks]
(0, ['EpochLines'])
>>> progress_callbacks(False, epochs=3)
(0, [])
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import keras


def _order(key: str) -> tuple:
    """Training values before validation ones, the loss first in each."""
    name = key.removeprefix("val_")
    return (key.startswith("val_"), name != "loss", name)


class RunProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, numbering epochs out of the whole run's (a resumed or
    checkpointed run calls ``fit`` once per epoch)."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self._run_epochs = epochs

    def set_params(self, params: dict[str, Any]) -> None:
        super().set_params({**params, "epochs": self._run_epochs})


class EpochLines(keras.callbacks.Callback):
    """One line per epoch on ``stream`` (default: ``sys.stdout`` at the time of writing):
    ``Epoch 2/10 - loss: ... - accuracy: ... - val_loss: ... - val_accuracy: ... - S.S s``
    (S.S: the epoch's seconds).

    ``Epoch 2/10`` is written when the epoch begins, the rest when it ends, so a
    log shows which epoch is running; no carriage returns, no terminal codes.
    """

    def __init__(self, epochs: int, stream: TextIO | None = None) -> None:
        super().__init__()
        self._run_epochs = epochs
        self._stream = stream
        self._start = 0.0

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stdout
        stream.write(text)
        stream.flush()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        self._write(f"Epoch {epoch + 1}/{self._run_epochs}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._start
        logs = logs or {}
        values = "".join(f" - {key}: {float(logs[key]):.4f}" for key in sorted(logs, key=_order))
        self._write(f"{values} - {seconds:.1f} s\n")


def progress_callbacks(
    verbose: bool, *, epochs: int, stream: TextIO | None = None
) -> tuple[int, list[keras.callbacks.Callback]]:
    """``fit``'s ``verbose`` and the callbacks that show a run's progress: Keras' bar
    when ``stream`` (default ``sys.stdout``) is a terminal, :class:`EpochLines` otherwise."""
    if not verbose:
        return 0, []
    stream = stream or sys.stdout
    if stream.isatty():
        return 1, [RunProgbar(epochs)]
    return 0, [EpochLines(epochs, stream=None if stream is sys.stdout else stream)]

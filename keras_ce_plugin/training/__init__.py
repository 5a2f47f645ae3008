"""The tutorial's CIFAR-10 experiment: train, compare with Keras' built-in loss, write a run.

:func:`train` trains :func:`~keras_ce_plugin.models.build_vgg16_classifier` on
CIFAR-10 the way the tutorial does (Adam, batch 32, 10 epochs, one-hot labels,
pixels / 255, ``validation_data`` = the test split), on the frozen base's cached
features, and returns the full model with its history (:class:`TrainResult`).
:func:`train_run` and :func:`run_compare` are ``keras-ce train`` and
``keras-ce compare`` as library calls.

Modules, one concern each:

* :mod:`.config`: :class:`TrainConfig`, :class:`TrainResult`, :class:`DataSpec`;
* :mod:`.loop`: :func:`train`;
* :mod:`.features`: :func:`extract_features` (the feature cache);
* :mod:`.speedups`: the XLA Adam update, the XLA whole step, the fast input gradient;
* :mod:`.checkpoint`: :class:`Checkpoint`, :func:`save_checkpoint`, :func:`load_checkpoint`;
* :mod:`.progress`: Keras' bars on a terminal, one line per epoch elsewhere;
* :mod:`.artifacts`: the run directory (:func:`write_run`, :func:`curves_png`);
* :mod:`.compare`: :func:`run_compare`;
* :mod:`.run`: :func:`train_run`, the run directory trained and written under its lock.

>>> from keras_ce_plugin.training import TrainConfig, epoch_seed
>>> TrainConfig(epochs=2).epochs, epoch_seed(0, 0)
(2, 1)
"""

from __future__ import annotations

from keras_ce_plugin.training.artifacts import (
    RUN_FILES,
    curves_figure,
    curves_png,
    prepare_out_dir,
    write_run,
)
from keras_ce_plugin.training.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    epoch_seed,
    load_checkpoint,
    save_checkpoint,
)
from keras_ce_plugin.training.compare import (
    COMPARE_FILES,
    compare_figure,
    compare_histories,
    run_compare,
)
from keras_ce_plugin.training.config import (
    DEFAULT_LOSS,
    HISTORY_KEYS,
    DataSpec,
    TrainConfig,
    TrainResult,
    loss_label,
    resolve_loss,
)
from keras_ce_plugin.training.features import extract_features
from keras_ce_plugin.training.loop import train
from keras_ce_plugin.training.run import train_run

__all__ = [
    "CHECKPOINT_FILE",
    "COMPARE_FILES",
    "DEFAULT_LOSS",
    "HISTORY_KEYS",
    "RUN_FILES",
    "Checkpoint",
    "DataSpec",
    "TrainConfig",
    "TrainResult",
    "compare_figure",
    "compare_histories",
    "curves_figure",
    "curves_png",
    "epoch_seed",
    "extract_features",
    "load_checkpoint",
    "loss_label",
    "prepare_out_dir",
    "resolve_loss",
    "run_compare",
    "save_checkpoint",
    "train",
    "train_run",
    "write_run",
]

"""What a training run does (:class:`TrainConfig`), what it returns (:class:`TrainResult`)
and where its images come from (:class:`DataSpec`).

>>> TrainConfig().epochs, TrainConfig().batch_size, TrainConfig().loss
(10, 32, 'customloss>CategoricalCE')
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import keras
import numpy as np

from keras_ce_plugin.errors import KerasCEError

DEFAULT_LOSS = "customloss>CategoricalCE"
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
#: Adam's learning rate: the tutorial's, and the one for the head on a random base.
TUTORIAL_LEARNING_RATE = 1e-3
RANDOM_BASE_LEARNING_RATE = 1e-4


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What :func:`~keras_ce_plugin.training.train` does; the defaults are the tutorial's.

    The three speed mechanisms (:mod:`keras_ce_plugin.training.speedups`) apply to
    the feature-cache path on the TensorFlow backend in float32 without a
    distribution strategy; each has its own switch.

    With ``weights=None`` (a random base, He-initialised) the run departs from the
    tutorial in two ways, so that the head learns something: a fixed standardisation
    of the base's features (from the training images) sits between base and head,
    and ``learning_rate`` defaults to :data:`RANDOM_BASE_LEARNING_RATE`.
    """

    weights: str | os.PathLike | None = "imagenet"
    loss: Any = DEFAULT_LOSS
    epochs: int = 10
    batch_size: int = 32
    #: Adam's learning rate; ``None``: :data:`TUTORIAL_LEARNING_RATE`, or
    #: :data:`RANDOM_BASE_LEARNING_RATE` with a random base (:attr:`lr`).
    learning_rate: float | None = None
    seed: int = 0
    feature_cache: bool = True
    freeze_base: bool = True
    #: XLA-compile Adam's per-variable update step. XLA's fused multiply-adds round
    #: differently, so the curves match the tutorial's to float rounding, not bitwise.
    xla_optimizer: bool = True
    #: XLA-compile the head's whole train step (forward, loss, gradients, Adam). The
    #: dropout masks stay the tutorial's (drawn outside XLA), but XLA sums the large
    #: matmuls in another order, so the curves drift from the tutorial's by rounding.
    xla_step: bool = False
    #: Compute each large ``Dense`` layer's input gradient as ``(W @ dy^T)^T`` instead
    #: of ``dy @ W^T``: with ``xla_optimizer=False`` only where a probe at the run's
    #: batch sizes shows the very bits of TensorFlow's own gradient (the run stays
    #: bitwise the same); with the XLA update (not bitwise anyway) always, on any CPU.
    #: Not used with ``xla_step``.
    fast_input_grad: bool = True
    #: The batch size of the feature extraction; ``None``: ``batch_size``, with the
    #: last batch unpadded, so that the base sees the very batch shapes that plain
    #: ``fit`` (and its validation pass) gives it.
    extract_batch_size: int | None = None
    verbose: bool = True
    #: > 0: each epoch is its own ``fit`` with a per-epoch seeded data order, so that a
    #: run resumed from a checkpoint (written every N epochs) repeats the uninterrupted one.
    checkpoint_every: int = 0

    @property
    def random_base(self) -> bool:
        """Whether the VGG16 base is random (``weights`` ``None`` or ``"none"``)."""
        from keras_ce_plugin.models import is_random

        return is_random(self.weights)

    @property
    def lr(self) -> float:
        """The learning rate used: ``learning_rate``, or its default for these weights.

        >>> TrainConfig().lr, TrainConfig(weights=None).lr, TrainConfig(weights=None, learning_rate=0.01).lr
        (0.001, 0.0001, 0.01)
        """
        if self.learning_rate is not None:
            return self.learning_rate
        return RANDOM_BASE_LEARNING_RATE if self.random_base else TUTORIAL_LEARNING_RATE

    def validate(self) -> None:
        """Raises :class:`KerasCEError` for a setting :func:`train` cannot use."""
        for name in ("epochs", "batch_size", "extract_batch_size"):
            value = getattr(self, name)
            if name == "extract_batch_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KerasCEError(f"`{name}` must be a positive integer. Received: {value!r}")
        every = self.checkpoint_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise KerasCEError(f"`checkpoint_every` must be an integer >= 0. Received: {every!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise KerasCEError(f"`seed` must be an integer. Received: seed={self.seed!r}")
        lr = self.learning_rate
        if lr is None:
            pass
        elif (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise KerasCEError(
                f"`learning_rate` must be a positive number. Received: learning_rate={lr!r}"
            )
        resolve_loss(self.loss)


@dataclasses.dataclass
class TrainResult:
    """What :func:`~keras_ce_plugin.training.train` returns.

    ``speedups`` says which speed mechanisms were traced into the training step:
    ``{"xla_optimizer": bool, "xla_step": bool, "fast_input_grad": {layer: batch sizes}}``.
    """

    model: keras.Model
    history: dict[str, list[float]]
    test_loss: float
    test_accuracy: float
    feature_cache: bool
    timings: dict[str, float]
    num_train: int
    num_test: int
    initial_weights_sha256: str
    features: tuple[np.ndarray, np.ndarray] | None = None
    assembly_max_abs_diff: float | None = None
    speedups: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: :func:`base_info` of the run: which base, standardised or not, the learning rate.
    base: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The CIFAR-10 images of a run, as :func:`~keras_ce_plugin.data.load_cifar10` reads them."""

    data_dir: str | os.PathLike | None = None
    limit_train: int | None = None
    limit_test: int | None = None

    def load(self) -> Any:
        from keras_ce_plugin.data import load_cifar10

        return load_cifar10(self.data_dir, limit_train=self.limit_train, limit_test=self.limit_test)


def resolve_loss(loss: Any) -> Any:
    """Checks that ``loss`` is usable in ``compile``; raises :class:`KerasCEError` if not.

    >>> resolve_loss("customloss>CategoricalCE").name
    'categorical_ce'
    """
    if isinstance(loss, str):
        from keras_ce_plugin import get

        try:
            return get(loss)
        except (ValueError, TypeError) as exc:
            raise KerasCEError(
                f"Unknown loss {loss!r}: give a name that `model.compile(loss=...)` accepts, "
                f"e.g. {DEFAULT_LOSS!r} or 'categorical_crossentropy'. ({exc})"
            ) from None
    if isinstance(loss, keras.losses.Loss) or callable(loss):
        return loss
    raise KerasCEError(f"`loss` must be a name or a loss object. Received: {loss!r}")


def base_info(config: TrainConfig) -> dict[str, Any]:
    """What ``metrics.json`` and ``compare.json`` say about the base: its weights,
    whether it trains, whether the features are standardised, the learning rate and
    a one-line ``expectation``.

    >>> info = base_info(TrainConfig(weights=None))
    >>> info["weights"], info["feature_standardization"], info["learning_rate"]
    ('random (He-initialised)', True, 0.0001)
    """
    w = config.weights
    if config.random_base:
        weights = "random (He-initialised)"
        expectation = (
            "a random, frozen VGG16 base: expect far below ImageNet features (about 0.4 "
            "test accuracy on the 1,017-image sample)"
        )
    elif isinstance(w, str) and w.lower() == "imagenet":
        weights = "imagenet"
        expectation = "the tutorial's setup: a frozen VGG16 base with ImageNet weights"
    else:
        weights = f"file: {w}"
        expectation = (
            "the tutorial's setup with the VGG16 weights of that file: accuracy depends "
            "on those weights"
        )
    if not config.freeze_base:
        expectation = "a trainable VGG16 base (not the tutorial's frozen base): " + expectation
    return {
        "weights": weights,
        "trainable": not config.freeze_base,
        "feature_standardization": config.random_base,
        "learning_rate": config.lr,
        "expectation": expectation,
    }


def base_line(info: dict[str, Any]) -> str:
    """The console line about the base, printed before training.

    >>> base_line(base_info(TrainConfig()))[:40]
    'base: imagenet, frozen; learning rate 0.'
    """
    state = "trainable" if info["trainable"] else "frozen"
    standardised = "; features standardised" if info["feature_standardization"] else ""
    return (
        f"base: {info['weights']}, {state}{standardised}; learning rate "
        f"{info['learning_rate']:g}; {info['expectation']}"
    )


def loss_label(loss: Any) -> str:
    """A readable name: the string itself, or the public path of a loss object's class.

    >>> loss_label(keras.losses.CategoricalCrossentropy())
    'keras.losses.CategoricalCrossentropy()'
    """
    if isinstance(loss, str):
        return loss
    cls = type(loss)
    if getattr(keras.losses, cls.__name__, None) is cls:
        return f"keras.losses.{cls.__name__}()"
    return f"{cls.__module__}.{cls.__qualname__}()"

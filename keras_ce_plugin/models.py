"""The tutorial's model: a frozen VGG16 base and a dense head for CIFAR-10.

:func:`build_vgg16_classifier` returns ``Sequential([vgg16, Flatten, Dense(4096, relu),
Dropout(0.5), Dense(4096, relu), Dropout(0.5), Dense(num_classes, softmax)])`` on
32x32x3 inputs, with exactly the tutorial's head. :func:`split_base_and_head` gives
back the two parts (the same layer objects), which is what the feature cache in
:mod:`keras_ce_plugin.training` trains separately.

>>> head = build_head(3)
>>> [type(layer).__name__ for layer in head]
['Flatten', 'Dense', 'Dropout', 'Dense', 'Dropout', 'Dense']
>>> head[-1].units, head[-1].activation.__name__
(3, 'softmax')
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import keras
import numpy as np

from keras_ce_plugin.data import _download_timeout, _with_socket_timeout
from keras_ce_plugin.errors import KerasCEError

__all__ = ["INPUT_SHAPE", "build_head", "build_vgg16_classifier", "split_base_and_head"]

INPUT_SHAPE = (32, 32, 3)
BASE_NAME = "vgg16"
WEIGHT_SUFFIXES = (".weights.h5", ".h5")


def build_head(num_classes: int = 10) -> list[keras.layers.Layer]:
    """The tutorial's head, as fresh layers: Flatten, 2 x (Dense 4096 relu, Dropout 0.5), softmax."""
    return [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(4096, activation="relu", name="fc1"),
        keras.layers.Dropout(0.5, name="dropout1"),
        keras.layers.Dense(4096, activation="relu", name="fc2"),
        keras.layers.Dropout(0.5, name="dropout2"),
        # float32 even under a mixed precision policy: the probabilities feed the loss.
        keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions"),
    ]


def _vgg16(weights: str | None) -> keras.Model:
    return keras.applications.VGG16(
        include_top=False, weights=weights, input_shape=INPUT_SHAPE, name=BASE_NAME
    )


def _imagenet_base() -> keras.Model:
    timeout = _download_timeout()
    try:
        return _with_socket_timeout(lambda: _vgg16("imagenet"), timeout)
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise KerasCEError(
            "Could not get the ImageNet VGG16 weights (Keras downloads them once into "
            f"$KERAS_HOME/models, default ~/.keras/models; {reason}). Without internet, train from random weights "
            "with `--weights none` (weights=None), or pass a local copy of the weights: "
            "`--weights PATH` with a .h5 file such as "
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5, or a .weights.h5 file "
            "saved by `base.save_weights()`."
        ) from None


def _base_from_file(path: Path) -> keras.Model:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise KerasCEError(
            f"VGG16 weights file {path} {what}. `--weights` takes imagenet, none, or the "
            "path of a .h5/.weights.h5 file holding the weights of VGG16 without its top."
        )
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise KerasCEError(
            f"VGG16 weights file {path} must end in .weights.h5 (Keras 3 weights) or "
            f".h5 (legacy Keras weights). Received: {path.name!r}"
        )
    base = _vgg16(None)
    fresh = [layer.get_weights() for layer in base.layers]
    try:
        with warnings.catch_warnings():  # Keras warns per skipped layer; we check below.
            warnings.simplefilter("ignore")
            base.load_weights(path)
        # A file that matches only in part could leave layers at their random init.
        kept = [
            layer.name
            for layer, before in zip(base.layers, fresh)
            if before and all(np.array_equal(a, b) for a, b in zip(before, layer.get_weights()))
        ]
        if kept:
            raise ValueError(f"no weights for layers {kept}")
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        if len(reason) > 400:
            reason = reason[:400] + " ..."
        raise KerasCEError(
            f"Could not load VGG16 base weights from {path}: the file is not the weights "
            "of VGG16 without its top (include_top=False) or it is damaged "
            f"({reason})."
        ) from None
    return base


def build_vgg16_classifier(
    weights: str | os.PathLike | None = "imagenet",
    *,
    num_classes: int = 10,
    freeze_base: bool = True,
) -> keras.Sequential:
    """The tutorial's VGG16 + dense head classifier for 32x32 RGB images.

    Args:
        weights: ``"imagenet"`` (downloaded once through Keras' cache), ``None`` or
            ``"none"`` (random initialisation, seeded by ``keras.utils.set_random_seed``),
            or the path of a ``.h5``/``.weights.h5`` file with the weights of
            ``keras.applications.VGG16(include_top=False)``.
        num_classes: Units of the softmax output layer.
        freeze_base: Make the VGG16 base non-trainable (the tutorial does).

    Returns:
        An uncompiled ``keras.Sequential``: the VGG16 base (named ``"vgg16"``) followed
        by Flatten, Dense(4096, relu), Dropout(0.5), Dense(4096, relu), Dropout(0.5)
        and Dense(num_classes, softmax).

    Raises:
        KerasCEError: the ImageNet weights cannot be downloaded, or a weights file is
            missing or does not fit VGG16.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"`num_classes` must be a positive integer. Received: num_classes={num_classes!r}"
        )
    if not isinstance(freeze_base, bool):
        raise TypeError(f"`freeze_base` must be a bool. Received: freeze_base={freeze_base!r}")
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        base = _vgg16(None)
    elif isinstance(weights, str) and weights.lower() == "imagenet":
        base = _imagenet_base()
    elif isinstance(weights, (str, os.PathLike)):
        base = _base_from_file(Path(weights).expanduser())
    else:
        raise TypeError(
            '`weights` must be "imagenet", None or a path. '
            f"Received: weights={weights!r} of type {type(weights).__name__}"
        )
    base.trainable = not freeze_base
    return keras.Sequential(
        [keras.Input(INPUT_SHAPE), base, *build_head(num_classes)], name="vgg16_cifar10"
    )


def split_base_and_head(model: keras.Model) -> tuple[keras.Model, list[keras.layers.Layer]]:
    """``(base, head_layers)`` of a :func:`build_vgg16_classifier` model (same objects)."""
    layers = list(model.layers)
    if not layers or layers[0].name != BASE_NAME or not isinstance(layers[0], keras.Model):
        raise ValueError(
            "`model` must be built by build_vgg16_classifier (first layer: the "
            f"{BASE_NAME!r} base). Received layers: {[layer.name for layer in layers]}"
        )
    return layers[0], layers[1:]

"""The tutorial's model: a frozen VGG16 base and a dense head for CIFAR-10.

:func:`build_vgg16_classifier` returns ``Sequential([vgg16, Flatten, Dense(4096, relu),
Dropout(0.5), Dense(4096, relu), Dropout(0.5), Dense(num_classes, softmax)])`` on
32x32x3 inputs, with exactly the tutorial's head. :func:`split_base_and_head` gives
back the two parts (the same layer objects), which is what the feature cache in
:mod:`keras_ce_plugin.training` trains separately.

Without pretrained weights (``weights=None``) the base is He-initialised
(:func:`he_initialize`), and training inserts a fixed per-feature standardisation
between base and head (:func:`with_feature_standardization`): a random base's
features have scales the tutorial's head cannot learn from. That layer is the one
departure from the tutorial's architecture, and only for a random base.

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

__all__ = [
    "INPUT_SHAPE",
    "STANDARDIZATION_NAME",
    "build_head",
    "build_vgg16_classifier",
    "feature_standardization",
    "he_initialize",
    "split_base_and_head",
    "standardization_layer",
    "with_feature_standardization",
]

INPUT_SHAPE = (32, 32, 3)
BASE_NAME = "vgg16"
STANDARDIZATION_NAME = "feature_standardization"
# The smallest variance the standardisation divides by, relative to the median one.
VARIANCE_FLOOR = 0.01
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


def is_random(weights: str | os.PathLike | None) -> bool:
    """Whether ``weights`` asks for a random base (``None`` or ``"none"``).

    >>> is_random(None), is_random("None"), is_random("imagenet")
    (True, True, False)
    """
    return weights is None or (isinstance(weights, str) and weights.lower() == "none")


def he_initialize(base: keras.Model, seed: int) -> None:
    """Redraws every ``Conv2D`` kernel of ``base`` from N(0, 2 / fan_in) (He et al.,
    fan_in = kernel height x width x input channels) with NumPy's
    ``default_rng(seed)``, layer by layer in order, and sets every bias to zero.

    Keras' default Glorot-uniform kernels shrink the signal through VGG16's 13 ReLU
    convolutions; He's variance keeps it at a usable scale.
    """
    rng = np.random.default_rng(seed)
    for layer in base.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            fan_in = int(np.prod(kernel.shape[:3]))
            std = np.sqrt(2.0 / fan_in)
            layer.set_weights(
                [rng.normal(0.0, std, kernel.shape).astype("float32"), np.zeros_like(bias)]
            )


def feature_standardization(features: np.ndarray) -> keras.layers.Normalization:
    """A fixed ``Normalization`` layer (named ``"feature_standardization"``) that
    standardises each feature (last axis) with the mean and variance of ``features``
    (the base's outputs for the training images), computed in float64. A feature
    with zero variance gets variance 1, and no variance is below
    ``VARIANCE_FLOOR`` times the median variance: a near-constant feature (a ReLU
    that fires on a handful of images) would otherwise magnify float32 rounding in
    the base by the inverse of its tiny standard deviation, so that no float32
    runtime (Keras, SavedModel, ONNX Runtime) could agree with another to 1e-5. It
    has no weights and is not trainable.

    >>> layer = feature_standardization(np.array([[1.0, 5.0], [3.0, 5.0]]))
    >>> layer.input_mean.tolist(), layer.input_variance.tolist()
    ([2.0, 5.0], [1.0, 1.0])
    >>> x = np.array([[0.0, 0.0], [2.0, 1e-4], [4.0, 0.0], [6.0, 0.0]])
    >>> np.round(feature_standardization(x).input_variance, 6).tolist()  # 1% of the median, 2.5
    [5.0, 0.025]
    """
    features = np.asarray(features, dtype="float64")
    if features.ndim < 2 or len(features) == 0:
        raise ValueError(f"`features` must be a non-empty batch. Received shape {features.shape}")
    flat = features.reshape(-1, features.shape[-1])
    mean, var = flat.mean(axis=0), flat.var(axis=0)
    positive = var[var > 0]
    floor = VARIANCE_FLOOR * float(np.median(positive)) if positive.size else 0.0
    var = np.where(var > 0, np.maximum(var, floor), 1.0)
    return keras.layers.Normalization(
        axis=-1, mean=mean, variance=var, name=STANDARDIZATION_NAME, trainable=False
    )


def with_feature_standardization(model: keras.Model, features: np.ndarray) -> keras.Sequential:
    """``model`` (from :func:`build_vgg16_classifier`) with :func:`feature_standardization`
    of ``features`` between its base and its head: a new ``Sequential`` of the same
    layer objects (same weights, same dropout seed generators)."""
    base, head = split_base_and_head(model)
    if head and head[0].name == STANDARDIZATION_NAME:
        raise ValueError("`model` already has a feature standardisation layer.")
    layer = feature_standardization(features)
    return keras.Sequential(
        [keras.Input(model.input_shape[1:]), base, layer, *head], name=model.name
    )


def standardization_layer(model: keras.Model) -> keras.layers.Normalization | None:
    """The feature standardisation layer of ``model``, or ``None`` (the tutorial's model)."""
    _, head = split_base_and_head(model)
    return head[0] if head and head[0].name == STANDARDIZATION_NAME else None


def build_vgg16_classifier(
    weights: str | os.PathLike | None = "imagenet",
    *,
    num_classes: int = 10,
    freeze_base: bool = True,
    seed: int | None = None,
) -> keras.Sequential:
    """The tutorial's VGG16 + dense head classifier for 32x32 RGB images.

    Args:
        weights: ``"imagenet"`` (downloaded once through Keras' cache), ``None`` or
            ``"none"`` (a random base, He-initialised: :func:`he_initialize`), or the
            path of a ``.h5``/``.weights.h5`` file with the weights of
            ``keras.applications.VGG16(include_top=False)``.
        num_classes: Units of the softmax output layer.
        freeze_base: Make the VGG16 base non-trainable (the tutorial does).
        seed: The He initialisation's seed with ``weights=None``; ``None`` draws it
            from NumPy's global generator (seeded by ``keras.utils.set_random_seed``).
            The head is initialised by Keras' seeded generators either way.

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
    if is_random(weights):
        base = _vgg16(None)
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        he_initialize(base, seed)
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
    """``(base, head_layers)`` of a :func:`build_vgg16_classifier` model (same objects);
    the head starts with the feature standardisation layer where the model has one."""
    layers = list(model.layers)
    if not layers or layers[0].name != BASE_NAME or not isinstance(layers[0], keras.Model):
        raise ValueError(
            "`model` must be built by build_vgg16_classifier (first layer: the "
            f"{BASE_NAME!r} base). Received layers: {[layer.name for layer in layers]}"
        )
    return layers[0], layers[1:]

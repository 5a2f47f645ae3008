"""The serving signature both formats are traced from.

It takes ``images: float32[batch, H, W, C]`` (RGB pixels divided by 255, NHWC; the
shape comes from the model) and returns ``probabilities: float32[batch, classes]``,
calling the model with ``training=False``.

>>> default_class_names(3)
('class_0', 'class_1', 'class_2')
>>> check_class_names(["cat", "dog"], 2)
('cat', 'dog')
"""

from __future__ import annotations

from typing import Any

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
SIGNATURE_KEY = "serving_default"
PREPROCESSING = (
    "RGB pixels, NHWC, float32 = uint8 / 255 (values in [0, 1]); no mean/std normalisation"
)
#: The height and width of the images ``keras-ce predict`` feeds (CIFAR-10).
IMAGE_SIZE = (32, 32)


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """The CIFAR-10 names for 10 classes, else ``class_0`` ... ``class_{n-1}``."""
    from keras_ce_plugin.data import CIFAR10_CLASSES

    if num_classes == len(CIFAR10_CLASSES):
        return tuple(CIFAR10_CLASSES)
    return tuple(f"class_{i}" for i in range(num_classes))


def check_class_names(class_names: Any, num_classes: int | None) -> tuple[str, ...]:
    """``class_names`` as a tuple of ``num_classes`` strings (None: the defaults)."""
    if class_names is None:
        return default_class_names(num_classes or 0)
    names = tuple(class_names)
    if not all(isinstance(n, str) for n in names) or (
        num_classes is not None and len(names) != num_classes
    ):
        raise ValueError(
            f"`class_names` must be {num_classes} strings, one per model output. "
            f"Received: class_names={class_names!r}"
        )
    return names


def serving_signature(model: Any) -> dict[str, dict[str, Any]]:
    """Names, shapes and dtypes of the serving signature of ``model``.

    The shapes come from the model (batch axis always ``None``); the model must
    have exactly one input and one output.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
    ...                       keras.layers.Dense(10, activation="softmax")])
    >>> sig = serving_signature(m)
    >>> sig["input"]
    {'name': 'images', 'shape': [None, 32, 32, 3], 'dtype': 'float32'}
    >>> sig["output"]
    {'name': 'probabilities', 'shape': [None, 10], 'dtype': 'float32'}
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r} of type "
            f"{type(model).__name__}"
        )
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(
            "`model` must be built with a known input shape (a Functional or Sequential "
            f"model with an Input). Received: model={model.name!r} without inputs/outputs"
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            "`model` must have exactly one input and one output to be served as "
            f"{INPUT_NAME} -> {OUTPUT_NAME}. Received: {len(inputs)} inputs, "
            f"{len(outputs)} outputs"
        )
    in_shape = [None, *[None if d is None else int(d) for d in inputs[0].shape[1:]]]
    out_shape = [None, *[None if d is None else int(d) for d in outputs[0].shape[1:]]]
    return {
        "input": {"name": INPUT_NAME, "shape": in_shape, "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": out_shape, "dtype": "float32"},
    }


def serving_function(model: Any, signature: dict[str, dict[str, Any]]):
    """The ``tf.function`` both formats are made from: ``(function, concrete, spec)``."""
    import tensorflow as tf

    spec = tf.TensorSpec(signature["input"]["shape"], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec], autograph=False)
    def serve(images):
        return {OUTPUT_NAME: tf.cast(model(images, training=False), tf.float32)}

    return serve, serve.get_concrete_function(), spec

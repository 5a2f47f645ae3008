"""The serving signature both formats are traced from, for any Keras model.

An *image classifier* (one float input ``(batch, H, W, 3)``, one output
``(batch, classes)``) is served as ``images: float32[batch, H, W, 3]`` (RGB pixels
divided by 255, NHWC) -> ``probabilities: float32[batch, classes]``, the names
``keras-ce predict`` and the README use. Any other model keeps its own signature:
its inputs' names, shapes and dtypes (a ``keras.Input(name=...)``, the keys of a
dict input, else ``input``/``input_N``) and its outputs' names (dict keys, the
Functional model's output names, else ``output``/``output_N``). The model is
called with ``training=False``; floating outputs are served as float32.

>>> default_class_names(3)
('class_0', 'class_1', 'class_2')
>>> check_class_names(["cat", "dog"], 2)
('cat', 'dog')
>>> sig = {"kind": "generic", "inputs": [
...     {"name": "ids", "shape": [None, 4], "dtype": "int32", "range": [0, 97]}]}
>>> x = generate_inputs(sig, 2)
>>> x["ids"].shape, x["ids"].dtype, bool(x["ids"].max() < 97)
((2, 4), dtype('int32'), True)
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
SIGNATURE_KEY = "serving_default"
PREPROCESSING = (
    "RGB pixels, NHWC, float32 = uint8 / 255 (values in [0, 1]); no mean/std normalisation"
)
#: The height and width of the images ``keras-ce predict`` feeds (CIFAR-10).
IMAGE_SIZE = (32, 32)
#: ``kind`` of a signature: served as images -> probabilities, or with its own names.
IMAGE_CLASSIFIER, GENERIC = "image_classifier", "generic"
#: A dimension other than the batch that the model leaves open gets this size in
#: the inputs ``verify`` generates.
FREE_DIM_SIZE = 8
_AUTO_NAME = re.compile(r"^(keras_tensor|input_layer)(_\d+)?$")


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


def _clean(name: str) -> str:
    """``name`` as a valid TensorFlow/ONNX tensor name."""
    name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", str(name)) or "x"
    return name if re.match(r"[A-Za-z0-9.]", name) else "x" + name


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        new, i = name, 0
        while new in seen:
            i += 1
            new = f"{name}_{i}"
        seen[new] = 1
        out.append(new)
    return out


def _shape(shape: Any) -> list[int | None]:
    return [None, *[None if d is None else int(d) for d in tuple(shape)[1:]]]


def _sublayers(root: Any) -> list[Any]:
    """Every layer under ``root`` (nested models and layers held as attributes)."""
    import keras

    found, stack, seen = [], [root], {id(root)}
    while stack:
        layer = stack.pop()
        children = list(getattr(layer, "layers", []) or [])
        for value in vars(layer).values():
            items = value if isinstance(value, (list, tuple)) else [value]
            children.extend(v for v in items if isinstance(v, keras.layers.Layer))
        for child in children:
            if id(child) not in seen:
                seen.add(id(child))
                found.append(child)
                stack.append(child)
    return found


def _symbolic_inputs(model: Any) -> Any:
    """The model's input structure of KerasTensors (None when it cannot be known)."""
    import keras

    for getter in (lambda: model.input, lambda: model.inputs):
        try:
            struct = getter()
        except (AttributeError, ValueError):
            continue
        if isinstance(struct, (list, tuple, dict)) and not struct:
            continue
        if struct is not None:
            return struct[0] if isinstance(struct, list) and len(struct) == 1 else struct
    # A subclassed model: the shape it was built with; the dtype of a nested model
    # that takes the same shape (a backbone), else float32.
    build = model.get_build_config() if getattr(model, "built", False) else None
    shape = (build or {}).get("input_shape")
    if not isinstance(shape, (list, tuple)) or not all(
        d is None or isinstance(d, int) for d in shape
    ):
        return None
    dtype, name = "float32", None
    for layer in _sublayers(model):
        try:
            inner = layer.inputs
        except (AttributeError, ValueError):
            continue
        if isinstance(layer, keras.Model) and inner and len(inner) == 1:
            if _shape(inner[0].shape) == _shape(shape):
                dtype, name = str(inner[0].dtype), inner[0].name
                break
    return keras.KerasTensor(tuple(_shape(shape)), dtype=dtype, name=name)


def _int_range(model: Any) -> list[int]:
    """``[low, high)`` of the integers an int input may hold: token ids < vocabulary."""
    import keras

    sizes = [
        int(layer.input_dim)
        for layer in _sublayers(model)
        if isinstance(layer, keras.layers.Embedding)
    ]
    return [0, min(sizes) if sizes else 2]


def _path_names(paths: list[tuple], fallback: list[str | None], prefix: str) -> list[str]:
    names = []
    for i, path in enumerate(paths):
        if path and all(isinstance(p, str) for p in path):
            names.append("/".join(path))
        elif fallback[i] and not _AUTO_NAME.match(str(fallback[i])):
            names.append(str(fallback[i]))
        else:
            names.append(prefix if len(paths) == 1 else f"{prefix}_{i}")
    return _unique([_clean(n) for n in names])


def serving_signature(model: Any) -> dict[str, Any]:
    """Names, shapes and dtypes of the serving signature of ``model``.

    Returns ``{"kind", "inputs": [...], "outputs": [...]}`` (each entry ``name``,
    ``shape`` with batch axis ``None``, ``dtype``; an integer input also has
    ``range``, ``[0, vocabulary)`` when the model has an ``Embedding``), and for an
    image classifier also ``input`` and ``output`` (its one input and output).

    >>> import keras
    >>> m = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
    ...                       keras.layers.Dense(10, activation="softmax")])
    >>> sig = serving_signature(m)
    >>> sig["kind"], sig["input"]
    ('image_classifier', {'name': 'images', 'shape': [None, 32, 32, 3], 'dtype': 'float32'})
    >>> sig["output"]
    {'name': 'probabilities', 'shape': [None, 10], 'dtype': 'float32'}
    >>> ids = keras.Input((5,), dtype="int32", name="token_ids")
    >>> lm = keras.Model(ids, keras.layers.Embedding(50, 4)(ids))
    >>> serving_signature(lm)["inputs"]
    [{'name': 'token_ids', 'shape': [None, 5], 'dtype': 'int32', 'range': [0, 50]}]
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r} of type "
            f"{type(model).__name__}"
        )
    struct = _symbolic_inputs(model)
    if struct is None:
        raise ValueError(
            "`model` must be built with a known input shape (a Functional or Sequential "
            "model with an Input, or a subclassed model called once). Received: "
            f"model={model.name!r} without inputs"
        )
    try:
        out_struct = model.compute_output_spec(struct)
    except Exception as exc:  # a model that cannot be called symbolically
        raise ValueError(f"`model` could not be called on its inputs ({exc})") from None
    in_paths = [p for p, _ in keras.tree.flatten_with_path(struct)]
    ins = keras.tree.flatten(struct)
    outs = keras.tree.flatten(out_struct)
    out_paths = [p for p, _ in keras.tree.flatten_with_path(out_struct)]
    own_out = list(getattr(model, "output_names", None) or [])
    if len(own_out) != len(outs):
        own_out = [None] * len(outs)
    inputs: list[dict[str, Any]] = [
        {"name": n, "shape": _shape(t.shape), "dtype": str(t.dtype)}
        for n, t in zip(_path_names(in_paths, [t.name for t in ins], "input"), ins)
    ]
    outputs: list[dict[str, Any]] = [
        {"name": n, "shape": _shape(t.shape), "dtype": _served_dtype(str(t.dtype))}
        for n, t in zip(_path_names(out_paths, own_out, "output"), outs)
    ]
    for spec in inputs:
        if "int" in spec["dtype"]:
            spec["range"] = _int_range(model)
    image = (
        len(inputs) == 1
        and len(outputs) == 1
        and inputs[0]["dtype"].startswith(("float", "bfloat"))
        and len(inputs[0]["shape"]) == 4
        and inputs[0]["shape"][3] == 3
        and None not in inputs[0]["shape"][1:]
        and len(outputs[0]["shape"]) == 2
    )
    if not image:
        return {"kind": GENERIC, "inputs": inputs, "outputs": outputs}
    inputs[0].update(name=INPUT_NAME, dtype="float32")
    outputs[0].update(name=OUTPUT_NAME)
    return {
        "kind": IMAGE_CLASSIFIER,
        "inputs": inputs,
        "outputs": outputs,
        "input": inputs[0],
        "output": outputs[0],
    }


def _served_dtype(dtype: str) -> str:
    return "float32" if dtype.startswith(("float", "bfloat")) else dtype


def describe_signature(signature: dict[str, Any]) -> str:
    """``"token_ids int32[batch, 12] -> output float32[batch, 12, 97]"``."""

    def one(spec: dict[str, Any]) -> str:
        dims = ", ".join("batch" if i == 0 else str(d) for i, d in enumerate(spec["shape"]))
        return f"{spec['name']} {spec['dtype']}[{dims}]"

    ins = ", ".join(one(s) for s in signature["inputs"])
    return f"{ins} -> {', '.join(one(s) for s in signature['outputs'])}"


def serving_function(model: Any, signature: dict[str, Any]):
    """The ``tf.function`` both formats are made from: ``(function, concrete, specs)``.

    It takes the inputs of ``signature`` as positional tensors named after them
    and returns ``{output name: tensor}``.
    """
    import keras
    import tensorflow as tf

    struct = _symbolic_inputs(model)
    specs = [
        tf.TensorSpec(s["shape"], tf.as_dtype(s["dtype"]), name=s["name"])
        for s in signature["inputs"]
    ]
    names = [s["name"] for s in signature["outputs"]]

    @tf.function(input_signature=specs, autograph=False)
    def serve(*tensors):
        outputs = keras.tree.flatten(
            model(keras.tree.pack_sequence_as(struct, list(tensors)), training=False)
        )
        return {
            name: tf.cast(t, tf.float32) if t.dtype.is_floating else t
            for name, t in zip(names, outputs)
        }

    return serve, serve.get_concrete_function(), specs


def model_feed(model: Any, feeds: dict[str, np.ndarray], signature: dict[str, Any]) -> Any:
    """``feeds`` (by input name) in the structure ``model`` is called with."""
    import keras

    flat = [feeds[s["name"]] for s in signature["inputs"]]
    return keras.tree.pack_sequence_as(_symbolic_inputs(model), flat)


def generate_inputs(signature: dict[str, Any], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` seeded inputs of ``signature``, by name: floats uniform in [0, 1),
    integers in their ``range`` (token ids below the vocabulary), open dimensions
    :data:`FREE_DIM_SIZE` long."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in signature["inputs"]:
        shape = (n, *[FREE_DIM_SIZE if d is None else d for d in spec["shape"][1:]])
        dtype = np.dtype(spec["dtype"]) if spec["dtype"] != "bfloat16" else np.dtype("float32")
        if dtype == np.bool_:
            feeds[spec["name"]] = rng.integers(0, 2, shape).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            low, high = spec.get("range", [0, 2])
            feeds[spec["name"]] = rng.integers(low, high, shape).astype(dtype)
        else:
            feeds[spec["name"]] = rng.random(shape).astype(dtype)
    return feeds

"""What is checked: the loss under test, its names, and seeded input batches."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

TARGETS = ("categorical", "sparse", "binary")
BATCH = 6  # A full batch; PARTIAL is the last, partial one (fit on 8 samples, batch 6).
PARTIAL = 2
CLASSES = 4
FEATURES = 5
SEED = 1234


@dataclass
class Batch:
    y_true: np.ndarray
    y_pred: np.ndarray
    x: np.ndarray  # model inputs for the model-based checks (Dense -> y_pred's shape)


@dataclass
class Subject:
    """The loss under test, normalised."""

    obj: Any  # what the user passed
    loss: keras.losses.Loss  # an instance (functions wrapped in FunctionLoss)
    fn: Callable | None  # the function, when a function was given
    label: str  # e.g. "MyLoss(from_logits=True)"
    name: str | None  # "package>Name", or a built-in's class name; None if unnamed
    builtin: bool
    targets: str  # categorical | sparse | binary | example
    from_logits: bool
    batch: Batch
    partial: Batch
    reference: Callable | None = None
    module: str | None = None  # what a fresh process imports to get the loss
    tmpdir: str = ""  # a scratch directory for the checks that save files
    extra: dict[str, Any] = field(default_factory=dict)
    guessed: bool = False  # `targets` not given and the loss's kind not known: categorical

    @property
    def cls_or_fn(self) -> Any:
        return self.fn if self.fn is not None else type(self.loss)


def _is_keras_builtin(obj: Any) -> bool:
    return getattr(obj, "__module__", "").split(".")[0] == "keras"


def registered_name(obj: Any) -> str | None:
    """``package>Name`` if ``obj`` (a class or function) is registered, else None."""
    name = keras.saving.get_registered_name(obj)
    if ">" in name and keras.saving.get_registered_object(name) is obj:
        return name
    return None


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    try:
        params = inspect.signature(cls).parameters  # __init__'s, without self
    except (TypeError, ValueError):
        return {}
    return {
        n: p
        for n, p in params.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or (
            isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
        )
    except Exception:  # noqa: BLE001 - arrays and the like: show them
        return False


def describe(loss: Any) -> str:
    """``Name(arg=value, ...)`` with the arguments that differ from the defaults."""
    if not isinstance(loss, keras.losses.Loss):
        return getattr(loss, "__name__", type(loss).__name__)
    cls = type(loss)
    try:
        config = loss.get_config()
    except Exception:  # noqa: BLE001 - a broken get_config is reported by its check
        return f"{cls.__name__}()"
    args = []
    for name, param in _init_params(cls).items():
        if name in config and param.default is not inspect.Parameter.empty:
            value = config[name]
            if name == "name" or _same(value, param.default):
                continue
            args.append(f"{name}={value!r}")
    return f"{cls.__name__}({', '.join(args)})"


def _same_rank(x1: Any, x2: Any) -> tuple[Any, Any]:
    """Keras' rule for a loss function's arguments (``compile(loss=fn)`` applies it):
    where the ranks differ by one and the longer ends in 1, squeeze it (or expand a
    rank-1 other)."""
    r1, r2 = len(x1.shape), len(x2.shape)
    if r1 == r2 + 1 and x1.shape[-1] == 1:
        if r2 == 1:
            return x1, keras.ops.expand_dims(x2, -1)
        return keras.ops.squeeze(x1, -1), x2
    if r2 == r1 + 1 and x2.shape[-1] == 1:
        if r1 == 1:
            return keras.ops.expand_dims(x1, -1), x2
        return x1, keras.ops.squeeze(x2, -1)
    return x1, x2


class FunctionLoss(keras.losses.Loss):
    """A loss function as a Loss, as ``compile(loss=fn)`` wraps it (Keras' own
    wrapper is not public)."""

    def __init__(self, fn: Callable, reduction: str | None = "sum_over_batch_size") -> None:
        super().__init__(name=getattr(fn, "__name__", "loss"), reduction=reduction)
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(*_same_rank(y_true, y_pred))


def _as_loss(obj: Any) -> tuple[keras.losses.Loss, Callable | None]:
    if isinstance(obj, keras.losses.Loss):
        return obj, None
    if inspect.isclass(obj) and issubclass(obj, keras.losses.Loss):
        return obj(), None
    if callable(obj) and not inspect.isclass(obj):
        return FunctionLoss(obj), obj
    raise TypeError(
        "`loss` must be a keras.losses.Loss instance, a Loss subclass or a loss "
        f"function. Received: loss={obj!r}"
    )


def _from_logits(loss: keras.losses.Loss, fn: Callable | None) -> bool:
    if fn is not None:
        param = inspect.signature(fn).parameters.get("from_logits")
        return bool(param is not None and param.default is True)
    value = getattr(loss, "from_logits", None)
    if value is None:
        try:
            value = loss.get_config().get("from_logits", False)
        except Exception:  # noqa: BLE001
            value = False
    return bool(value)


def make_batch(targets: str, from_logits: bool, n: int, seed: int) -> Batch:
    """Seeded (y_true, y_pred, x) for a target kind; y_pred as the loss expects."""
    rng = np.random.default_rng(seed)
    width = 1 if targets == "binary" else CLASSES
    logits = rng.normal(0.0, 2.0, size=(n, width)).astype("float32")
    if from_logits:
        y_pred = logits
    elif targets == "binary":
        y_pred = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        y_pred = e / e.sum(axis=1, keepdims=True)
    labels = rng.integers(0, width if targets != "binary" else 2, size=n)
    if targets == "categorical":
        y_true = np.eye(CLASSES, dtype="float32")[labels]
    elif targets == "sparse":
        y_true = labels.astype("int32")
    else:
        y_true = labels.astype("float32").reshape(n, 1)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    return Batch(y_true, y_pred.astype("float32"), x)


def _example_batch(example: Any) -> tuple[Batch, Batch]:
    y_true, y_pred = (np.asarray(a) for a in example)
    if y_pred.ndim < 1 or y_pred.shape[0] < 2 or y_true.shape[0] != y_pred.shape[0]:
        raise ValueError(
            "`example` must be (y_true, y_pred) with the same batch size >= 2. "
            f"Received shapes: {y_true.shape}, {y_pred.shape}"
        )
    if np.issubdtype(y_pred.dtype, np.floating):
        y_pred = y_pred.astype("float32")
    if np.issubdtype(y_true.dtype, np.floating):
        y_true = y_true.astype("float32")
    half = max(1, y_pred.shape[0] // 2)
    full = Batch(y_true, y_pred, y_pred.copy())
    part = Batch(y_true[:half], y_pred[:half], y_pred[:half].copy())
    return full, part


def _label_kinds() -> dict[str, tuple[Any, ...]]:
    """The cross-entropies whose labels are known: Keras' and the plugin's."""
    from keras_ce_plugin import losses
    from keras_ce_plugin.large_vocab.loss import LinearCE

    k = keras.losses
    return {
        "categorical": (
            k.CategoricalCrossentropy,
            k.CategoricalFocalCrossentropy,
            k.categorical_crossentropy,
            k.categorical_focal_crossentropy,
            losses.CategoricalCE,
            losses.categorical_ce,
        ),
        "sparse": (
            k.SparseCategoricalCrossentropy,
            k.sparse_categorical_crossentropy,
            losses.SparseCategoricalCE,
            losses.sparse_categorical_ce,
            LinearCE,
        ),
        "binary": (
            k.BinaryCrossentropy,
            k.BinaryFocalCrossentropy,
            k.binary_crossentropy,
            k.binary_focal_crossentropy,
            losses.BinaryCE,
            losses.binary_ce,
        ),
    }


def label_kind(obj: Any) -> str | None:
    """The labels a known loss takes (``"categorical"``, ``"sparse"`` or ``"binary"``):
    Keras' cross-entropies and the plugin's, subclasses included; None for any other.

    >>> from keras_ce_plugin.large_vocab import LinearCE
    >>> label_kind(LinearCE()), label_kind(keras.losses.binary_crossentropy)
    ('sparse', 'binary')
    >>> label_kind(keras.losses.MeanSquaredError()) is None
    True
    """
    target = type(obj) if isinstance(obj, keras.losses.Loss) else obj
    for kind, known in _label_kinds().items():
        classes = tuple(c for c in known if inspect.isclass(c))
        if any(target is c for c in known) or (
            inspect.isclass(target) and issubclass(target, classes)
        ):
            return kind
    return None


def make_subject(
    obj: Any,
    *,
    targets: str | None = None,
    example: Any = None,
    reference: Callable | None = None,
    module: str | None = None,
) -> Subject:
    loss, fn = _as_loss(obj)
    from_logits = _from_logits(loss, fn)
    guessed = False
    if example is None and targets is None:
        targets = label_kind(fn if fn is not None else loss)
        guessed = targets is None
        targets = targets or "categorical"
    if example is not None:
        targets = "example"
        batch, partial = _example_batch(example)
    elif targets in TARGETS:
        batch = make_batch(targets, from_logits, BATCH, SEED)
        partial = make_batch(targets, from_logits, PARTIAL, SEED + 1)
    else:
        raise ValueError(
            f"`targets` must be one of {', '.join(TARGETS)}; pass `example=(y_true, y_pred)` "
            f"for any other kind of target. Received: targets={targets!r}"
        )
    target = fn if fn is not None else type(loss)
    builtin = _is_keras_builtin(target)
    name = registered_name(target)
    if name is None and builtin:
        name = target.__name__
    if module is None:
        module = getattr(target, "__module__", None)
    return Subject(
        obj=obj,
        loss=loss,
        fn=fn,
        label=describe(loss if fn is None else fn),
        name=name,
        builtin=builtin,
        targets=targets,
        from_logits=from_logits,
        batch=batch,
        partial=partial,
        reference=reference,
        module=module,
        guessed=guessed,
    )


def with_reduction(loss: keras.losses.Loss, reduction: str | None) -> keras.losses.Loss:
    """A shallow copy of ``loss`` whose ``__call__`` applies ``reduction``."""
    # Not copy.copy: Keras objects copy through their config, which is what the
    # config checks test (and fails for an unregistered class).
    other = object.__new__(type(loss))
    other.__dict__.update(loss.__dict__)
    other.reduction = reduction
    return other


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    a, b = np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64")
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))


def max_diff(a: Any, b: Any) -> str:
    a, b = np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64")
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    return f"max difference {float(np.max(np.abs(a - b), initial=0.0)):.3g}"


def value_and_grad(f: Callable[[Any], Any], y_pred: np.ndarray) -> tuple[Any, Any]:
    """``f(y_pred)`` (a scalar) and its gradient w.r.t. ``y_pred`` (None if absent)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(y_pred)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = f(x)
        grad = tape.gradient(value, x)
        return to_numpy(value), None if grad is None else to_numpy(grad)
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(lambda x: f(x))(jax.numpy.asarray(y_pred))
        if isinstance(value, jax.core.Tracer):  # inside jax.jit: no NumPy yet
            return value, grad
        return np.asarray(value), np.asarray(grad)
    if backend == "torch":
        import torch

        x = torch.tensor(y_pred, requires_grad=True)
        value = f(x)
        if not value.requires_grad:  # no path from y_pred to the value
            return to_numpy(value.detach()), None
        value.backward()
        return to_numpy(value.detach()), None if x.grad is None else x.grad.numpy()
    raise NotImplementedError(f"gradients on the {backend} backend")

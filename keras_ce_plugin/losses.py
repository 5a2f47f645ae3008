"""Cross-entropy losses written only with ``keras.ops``.

Each loss comes as a pure function returning per-sample values (never reduced
over the batch) and a thin :class:`keras.losses.Loss` subclass that stores its
arguments, validates them once and delegates ``call`` to the function. Both are
registered under the ``customloss`` package; the registered names are a
file-format contract and never change.

>>> import numpy as np
>>> y_true = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype="float32")
>>> y_pred = np.array([[0.05, 0.95, 0.0], [0.1, 0.8, 0.1]], dtype="float32")
>>> np.round(np.asarray(categorical_ce(y_true, y_pred)), 4)
array([0.0513, 2.3026], dtype=float32)
>>> round(float(CategoricalCE()(y_true, y_pred)), 4)
1.1769

Unlike the textbook ``-sum(y * log(p))``, a zero probability gives a finite loss:

>>> float(CategoricalCE()(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))) < 17
True
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, TypeVar, cast

import keras
from keras import ops

__all__ = [
    "BinaryCE",
    "CategoricalCE",
    "SparseCategoricalCE",
    "binary_ce",
    "categorical_ce",
    "sparse_categorical_ce",
]

PACKAGE = "customloss"

# Keras ships no type information: backend tensors (tf.Tensor, jax.Array,
# torch.Tensor, KerasTensor) are all `Any` to mypy. The alias documents intent.
Tensor = Any
_Registered = TypeVar("_Registered", bound=Callable[..., Any])


def _register(name: str) -> Callable[[_Registered], _Registered]:
    """``keras.saving.register_keras_serializable`` under ``PACKAGE``, typed.

    The Keras decorator returns the object it is given unchanged; the cast only
    tells mypy so (Keras is untyped), so decorated functions keep their signatures.
    """
    decorator = keras.saving.register_keras_serializable(package=PACKAGE, name=name)
    return cast(Callable[[_Registered], _Registered], decorator)


# A custom-gradient core: returns (loss, grad) where grad maps the upstream
# gradient to the gradients of the core's inputs.
_GradFn = Callable[..., Any]
_Core = Callable[..., tuple[Tensor, _GradFn]]


def _custom_gradient(core: _Core) -> Callable[..., Tensor]:
    """``keras.ops.custom_gradient``, typed (it is untyped in Keras)."""
    return cast(Callable[..., Tensor], ops.custom_gradient(core))


# Keras attaches the pre-softmax/pre-sigmoid input to the output of its
# softmax/sigmoid activations under this attribute (all backends set it where the
# tensor type allows it). Reading it is how the built-in losses stay exact for
# confident predictions; it is a plain attribute, not an internal module.
_LOGITS_ATTR = "_keras_logits"
# Likewise the Keras mask of a tensor (TensorFlow backend).
_MASK_ATTR = "_keras_mask"


# --------------------------------------------------------------------------- #
# Validation helpers (shared by the functions and the classes)
# --------------------------------------------------------------------------- #
def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return value


def _check_axis(axis: Any) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"`axis` must be an integer. Received: axis={axis!r}")
    return int(axis)


def _check_label_smoothing(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`label_smoothing` must be a float in [0, 1]. Received: label_smoothing={value!r}"
        )
    if not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"`label_smoothing` must be in [0, 1]. Received: label_smoothing={value}")
    return float(value)


def _check_class_weights(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):  # NumPy arrays and tensors with numpy().
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            "`class_weights` must be a 1-D sequence of non-negative floats, one per "
            f"class. Received: class_weights={value!r}"
        )
    weights = []
    for w in value:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(
                "`class_weights` must be a 1-D sequence of non-negative floats, one "
                f"per class. Received: class_weights={value!r}"
            )
        if not math.isfinite(w) or w < 0:
            raise ValueError(
                "`class_weights` must be finite and non-negative. "
                f"Received: class_weights={list(value)!r}"
            )
        weights.append(float(w))
    if not weights:
        raise ValueError("`class_weights` must not be empty. Received: class_weights=[]")
    return tuple(weights)


def _check_ignore_class(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"`ignore_class` must be an integer or None. Received: ignore_class={value!r}"
        )
    return int(value)


def _normalize_axis(axis: int, rank: int, y_pred: Tensor) -> int:
    if rank < 1:
        raise ValueError(
            "`y_pred` must be at least rank 1 (a vector of class scores). "
            f"Received: y_pred.shape={tuple(y_pred.shape)}"
        )
    if not -rank <= axis < rank:
        raise ValueError(
            f"`axis`={axis} is out of range for y_pred of rank {rank} "
            f"(y_pred.shape={tuple(y_pred.shape)})."
        )
    return axis % rank


def _shape(x: Tensor) -> tuple[int | None, ...]:
    return tuple(x.shape)


def _check_same_shape(y_true: Tensor, y_pred: Tensor, loss_name: str, hint: str = "") -> None:
    st, sp = _shape(y_true), _shape(y_pred)
    mismatch = len(st) != len(sp) or any(
        a is not None and b is not None and a != b for a, b in zip(st, sp)
    )
    if mismatch:
        raise ValueError(
            f"`{loss_name}`: `y_true` and `y_pred` must have the same shape. "
            f"Received: y_true.shape={st}, y_pred.shape={sp}.{hint}"
        )


def _looks_sparse(
    y_true_shape: tuple[int | None, ...], y_pred_shape: tuple[int | None, ...], axis: int
) -> bool:
    """True if y_true looks like integer class indices for y_pred."""
    if len(y_true_shape) == len(y_pred_shape) - 1:
        return True
    if len(y_true_shape) == len(y_pred_shape):
        a, b = y_true_shape[axis], y_pred_shape[axis]
        return a == 1 and b not in (None, 1)
    return False


def _check_num_weights(class_weights: tuple[float, ...], axis: int, n: int | None) -> None:
    if n is not None and len(class_weights) != n:
        raise ValueError(
            f"`class_weights` must have one entry per class: y_pred has {n} classes along "
            f"axis {axis}. Received: class_weights={list(class_weights)} "
            f"({len(class_weights)} entries)"
        )


def _weights_along(
    class_weights: tuple[float, ...], axis: int, rank: int, n: int | None, dtype: str
) -> Tensor:
    _check_num_weights(class_weights, axis, n)
    w = ops.convert_to_tensor(class_weights, dtype=dtype)
    shape = [1] * rank
    shape[axis] = len(class_weights)
    return ops.reshape(w, shape)


def _compute_dtype(x: Tensor) -> str:
    """float32 for half precision (and non-float input), else the input's float dtype."""
    dtype: str = keras.backend.standardize_dtype(x.dtype)
    if not keras.backend.is_float_dtype(dtype):
        dtype = keras.config.floatx()
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _prepare(y_pred: Tensor, from_logits: bool, fn_name: str) -> tuple[Tensor, str, Tensor | None]:
    """Returns (y_pred as a tensor, its dtype, logits to use or None).

    Like Keras' built-ins on the TensorFlow backend, the output of a Keras
    softmax/sigmoid carries the logits behind it; those are used instead of the
    (possibly saturated) probabilities.
    """
    keras_logits = getattr(y_pred, _LOGITS_ATTR, None)
    y_pred = ops.convert_to_tensor(y_pred)
    out_dtype: str = keras.backend.standardize_dtype(y_pred.dtype)
    if not keras.backend.is_float_dtype(out_dtype):
        out_dtype = keras.config.floatx()
    dtype = _compute_dtype(y_pred)
    if keras_logits is not None:
        if from_logits:
            warnings.warn(
                f"`{fn_name}` received `from_logits=True`, but `y_pred` was produced by a "
                "Keras softmax/sigmoid activation and thus does not hold logits; the "
                "logits behind it are used. Was this intended?",
                stacklevel=3,
            )
        return ops.cast(y_pred, dtype), out_dtype, ops.cast(keras_logits, dtype)
    y_pred = ops.cast(y_pred, dtype)
    return y_pred, out_dtype, (y_pred if from_logits else None)


def _is_library_frame(module_name: str) -> bool:
    return any(
        module_name == pkg or module_name.startswith(pkg + ".")
        for pkg in ("keras", "keras_ce_plugin", "tensorflow.python.autograph")
    )


def _user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the calling function) of the
    first frame outside Keras and this plugin: the user's call site.

    TensorFlow's autograph call wrappers are skipped too, so that inside a
    ``tf.function`` the warning points at the user's line, not at autograph.
    """
    level = 1
    frame: FrameType | None = sys._getframe(1)  # The caller: stacklevel 1.
    while frame is not None and _is_library_frame(str(frame.f_globals.get("__name__", ""))):
        frame = frame.f_back
        level += 1
    return level


def _warn_single_class(y_pred: Tensor, axis: int) -> None:
    # Keras' built-in categorical_crossentropy warns for a last axis of size 1; this
    # warning has its category (SyntaxWarning) and the start of its words, so a
    # user's filter written for the built-in applies to it too, then the plugin's
    # advice. Issued while tracing, through Python's warnings, so the default filter
    # shows it once per call site (and message) rather than on every step of an
    # eager loop.
    warnings.warn(
        "In loss categorical_ce, expected y_pred.shape to be (batch_size, num_classes) "
        f"with num_classes > 1. Received: y_pred.shape={_shape(y_pred)} (class "
        f"axis={axis}): a single class, for which the loss is constant (0 up to the "
        "clipping epsilon) and has no useful gradient. Consider using BinaryCE "
        "(`customloss>BinaryCE`, or binary_ce) if you only have 2 classes.",
        SyntaxWarning,
        stacklevel=_user_stacklevel(),
    )


def _custom_gradient_ok() -> bool:
    # `ops.custom_gradient` is solid on TensorFlow and JAX; elsewhere the same
    # math runs through plain autodiff.
    return keras.backend.backend() in ("tensorflow", "jax")


def _upstream(args: tuple[Tensor, ...], upstream: Tensor | None) -> Tensor:
    if upstream is None:
        (upstream,) = args
    return upstream


# --------------------------------------------------------------------------- #
# Fused cores: forward plus a hand-written gradient with fewer full-size ops than
# autodiff produces (TensorFlow's clip_by_value and division gradients alone cost
# about ten passes over the (batch, classes) tensor). Each returns the per-sample
# loss with `ax` reduced; values and gradients equal the textbook composition.
# --------------------------------------------------------------------------- #
# On the torch backend of Keras 3.15, `ops.maximum` and `ops.mean` compute float64
# input in float32 (keras-team/keras#23704) and `ops.clip` rounds Python-float bounds
# to float32; these three keep the input's precision.
def _clip(x: Tensor, eps: float) -> Tensor:
    """``clip(x, eps, 1 - eps)`` with the bounds in ``x``'s dtype."""
    lo = ops.convert_to_tensor(eps, dtype=x.dtype)
    hi = ops.convert_to_tensor(1.0 - eps, dtype=x.dtype)
    return ops.clip(x, lo, hi)


def _at_least(x: Tensor, floor: float) -> Tensor:
    """``maximum(x, floor)`` in ``x``'s dtype, NaN kept."""
    return ops.where(x < floor, floor, x)  # a Python float: x's dtype, not floatx first


def _mean(x: Tensor, ax: int) -> Tensor:
    """``mean(x, axis=ax)`` in ``x``'s dtype."""
    if keras.backend.backend() == "torch" and keras.backend.standardize_dtype(x.dtype) == "float64":
        return ops.sum(x, axis=ax) / x.shape[ax]
    return ops.mean(x, axis=ax)


def _cce_probs(y: Tensor, p: Tensor, ax: int) -> Tensor:
    """-sum(y * log(clip(p / sum(p), eps, 1 - eps))) along ax."""
    eps = keras.config.epsilon()

    def forward(y: Tensor, p: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        total = ops.sum(p, axis=ax, keepdims=True)
        s = _at_least(total, eps)  # An all-zero row stays finite (0 / eps).
        q = p / s
        c = _clip(q, eps)
        log_c = ops.log(c)
        # `0 * total` is NaN for a row holding +-inf (which the clip would hide).
        loss = -ops.sum(y * log_c, axis=ax) + 0.0 * ops.squeeze(total, axis=ax)
        return loss, (total, s, q, c, log_c)

    if not _custom_gradient_ok():
        return forward(y, p)[0]

    @_custom_gradient
    def core(y: Tensor, p: Tensor) -> tuple[Tensor, _GradFn]:
        loss, (total, s, q, c, log_c) = forward(y, p)

        def grad(*args: Tensor, upstream: Tensor | None = None) -> tuple[Tensor, Tensor]:
            u = ops.expand_dims(_upstream(args, upstream), ax)
            # dL/dq = -y/q where q is not clipped, 0 where it is; through q = p/s:
            # dL/dp = (-y_m / c + [total >= eps] * sum(y_m)) / s.
            y_m = ops.where(ops.equal(q, c), y, 0.0)
            a = ops.where(total >= eps, ops.sum(y_m, axis=ax, keepdims=True), 0.0)
            return -u * log_c, (a - y_m / c) * (u / s)

        return loss, grad

    return core(y, p)


def _cce_logits(y: Tensor, x: Tensor, ax: int) -> Tensor:
    """-sum(y * log_softmax(x)) along ax."""

    def forward(y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        log_p = ops.log_softmax(x, axis=ax)
        return -ops.sum(y * log_p, axis=ax), log_p

    if not _custom_gradient_ok():
        return forward(y, x)[0]

    @_custom_gradient
    def core(y: Tensor, x: Tensor) -> tuple[Tensor, _GradFn]:
        loss, log_p = forward(y, x)

        def grad(*args: Tensor, upstream: Tensor | None = None) -> tuple[Tensor, Tensor]:
            u = ops.expand_dims(_upstream(args, upstream), ax)
            y_sum = ops.sum(y, axis=ax, keepdims=True)  # 1 for one-hot targets
            return -u * log_p, ops.exp(log_p) * (y_sum * u) - y * u

        return loss, grad

    return core(y, x)


def _sparse_logits(labels: Tensor, x: Tensor, ax: int) -> Tensor:
    """-log_softmax(x)[label] along ax; `labels` are valid int32 indices."""

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        log_p = ops.log_softmax(x, axis=ax)
        return -_take(log_p, labels, ax), log_p

    if not _custom_gradient_ok():
        return forward(x)[0]

    @_custom_gradient
    def core(x: Tensor) -> tuple[Tensor, _GradFn]:
        loss, log_p = forward(x)

        def grad(*args: Tensor, upstream: Tensor | None = None) -> Tensor:
            u = ops.expand_dims(_upstream(args, upstream), ax)
            n = x.shape[ax] if x.shape[ax] is not None else ops.shape(x)[ax]
            one_hot = ops.one_hot(labels, n, axis=ax, dtype=x.dtype)
            return (ops.exp(log_p) - one_hot) * u

        return loss, grad

    return core(x)


def _bce_probs(y: Tensor, p: Tensor, ax: int) -> Tensor:
    """mean(-(y log c + (1 - y) log(1 - c))) along ax, c = clip(p, eps, 1 - eps)."""
    eps = keras.config.epsilon()

    def forward(y: Tensor, p: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        c = _clip(p, eps)
        log_c = ops.log(c)
        log_1mc = ops.log1p(-c)
        per_label = -(y * log_c + (1.0 - y) * log_1mc)
        # `0 * sum(p)` is NaN for a row holding +-inf (which the clip would hide).
        loss = _mean(per_label, ax) + 0.0 * ops.sum(p, axis=ax)
        return loss, (c, log_c, log_1mc)

    if not _custom_gradient_ok():
        return forward(y, p)[0]

    @_custom_gradient
    def core(y: Tensor, p: Tensor) -> tuple[Tensor, _GradFn]:
        loss, (c, log_c, log_1mc) = forward(y, p)

        def grad(*args: Tensor, upstream: Tensor | None = None) -> tuple[Tensor, Tensor]:
            n = p.shape[ax] if p.shape[ax] is not None else ops.shape(p)[ax]
            u = ops.expand_dims(_upstream(args, upstream), ax) / ops.cast(n, p.dtype)
            dc = ops.where(ops.equal(p, c), (c - y) / (c * (1.0 - c)), 0.0)
            return (log_1mc - log_c) * u, dc * u

        return loss, grad

    return core(y, p)


def _bce_logits(y: Tensor, x: Tensor, ax: int) -> Tensor:
    """mean(softplus(x) - x y) along ax (the stable sigmoid cross-entropy)."""

    def forward(y: Tensor, x: Tensor) -> Tensor:
        return _mean(ops.softplus(x) - x * y, ax)

    if not _custom_gradient_ok():
        return forward(y, x)

    @_custom_gradient
    def core(y: Tensor, x: Tensor) -> tuple[Tensor, _GradFn]:
        loss = forward(y, x)

        def grad(*args: Tensor, upstream: Tensor | None = None) -> tuple[Tensor, Tensor]:
            n = x.shape[ax] if x.shape[ax] is not None else ops.shape(x)[ax]
            u = ops.expand_dims(_upstream(args, upstream), ax) / ops.cast(n, x.dtype)
            return -x * u, (ops.sigmoid(x) - y) * u

        return loss, grad

    return core(y, x)


def _sparse_probs(labels: Tensor, p: Tensor, ax: int) -> Tensor:
    """-log(clip(p[label] / sum(p), eps, 1 - eps)); `labels` are valid int32 indices."""
    eps = keras.config.epsilon()

    def forward(p: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        # Gather the true class first: one reduction over the classes instead of
        # a full-size division, clip, log and product.
        total = ops.sum(p, axis=ax)
        s = _at_least(total, eps)
        q = _take(p, labels, ax) / s
        c = _clip(q, eps)
        # `0 * total` is NaN for a row holding +-inf (which the clip would hide).
        return -ops.log(c) + 0.0 * total, (total, s, q, c)

    if not _custom_gradient_ok():
        return forward(p)[0]

    @_custom_gradient
    def core(p: Tensor) -> tuple[Tensor, _GradFn]:
        loss, (total, s, q, c) = forward(p)

        def grad(*args: Tensor, upstream: Tensor | None = None) -> Tensor:
            # dL/dp_k = m * ([total >= eps] - [k == label] / c) / s, m = not clipped.
            u = _upstream(args, upstream) * ops.cast(ops.equal(q, c), p.dtype) / s
            rest = ops.where(total >= eps, u, 0.0)
            is_label = ops.equal(_class_ids(p, ax), ops.expand_dims(labels, ax))
            rest = ops.expand_dims(rest, ax)
            return ops.where(is_label, rest - ops.expand_dims(u / c, ax), rest)

        return loss, grad

    return core(p)


def _class_ids(x: Tensor, ax: int) -> Tensor:
    """0, 1, ..., C-1 along `ax`, shaped to broadcast against x."""
    n = x.shape[ax] if x.shape[ax] is not None else ops.shape(x)[ax]
    shape = [1] * len(x.shape)
    shape[ax] = -1
    return ops.reshape(ops.arange(n, dtype="int32"), shape)


def _take(x: Tensor, labels: Tensor, ax: int) -> Tensor:
    idx = ops.expand_dims(labels, ax)
    return ops.squeeze(ops.take_along_axis(x, idx, axis=ax), axis=ax)


# --------------------------------------------------------------------------- #
# Pure functions
# --------------------------------------------------------------------------- #
@_register("categorical_ce")
def categorical_ce(
    y_true: Any,
    y_pred: Any,
    *,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    axis: int = -1,
    class_weights: Sequence[float] | None = None,
) -> Any:
    """Categorical cross-entropy ``-sum_c w_c * y_c * log(p_c)`` per sample.

    Probabilities are renormalised along ``axis`` and clipped to
    ``[epsilon, 1 - epsilon]`` as in Keras; an all-zero row gives ``-log(epsilon)``
    instead of NaN. Half-precision inputs are computed in float32 and the result
    is returned in the input dtype.

    Args:
        y_true: One-hot (or soft) targets, same shape as ``y_pred``.
        y_pred: Probabilities (or logits if ``from_logits``), classes along ``axis``.
        from_logits: Whether ``y_pred`` holds logits.
        label_smoothing: In [0, 1]; targets become ``y * (1 - s) + s / C`` where C
            is the number of classes along ``axis`` (not always the last axis).
        axis: The class axis, e.g. ``1`` for channels-first segmentation maps.
        class_weights: Optional non-negative weight per class.

    Returns:
        The loss per sample: ``y_pred``'s shape without ``axis``.

    >>> import numpy as np
    >>> y = np.array([[0.0, 0.0, 1.0]], dtype="float32")
    >>> logits = np.array([[200.0, 0.0, -200.0]], dtype="float32")
    >>> float(categorical_ce(y, logits, from_logits=True)[0])
    400.0
    """
    _check_bool("from_logits", from_logits)
    label_smoothing = _check_label_smoothing(label_smoothing)
    axis = _check_axis(axis)
    class_weights = _check_class_weights(class_weights)

    y_pred, out_dtype, logits = _prepare(y_pred, from_logits, "categorical_ce")
    y_true = ops.convert_to_tensor(y_true)
    rank = len(y_pred.shape)
    ax = _normalize_axis(axis, rank, y_pred)
    if _looks_sparse(_shape(y_true), _shape(y_pred), ax):
        hint = (
            " `y_true` looks like integer class indices: use SparseCategoricalCE "
            "(`customloss>SparseCategoricalCE`) for those, or one-hot encode them."
        )
    else:
        hint = ""
    _check_same_shape(y_true, y_pred, "categorical_ce", hint)
    if y_pred.shape[ax] == 1:
        _warn_single_class(y_pred, axis)
    y_true = ops.cast(y_true, y_pred.dtype)

    if label_smoothing:
        n = ops.cast(ops.shape(y_pred)[ax], y_pred.dtype)
        y_true = y_true * (1.0 - label_smoothing) + label_smoothing / n
    if class_weights is not None:
        y_true = y_true * _weights_along(class_weights, ax, rank, y_pred.shape[ax], y_pred.dtype)

    if logits is not None:
        res = _cce_logits(y_true, logits, ax)
    else:
        res = _cce_probs(y_true, y_pred, ax)
    return ops.cast(res, out_dtype)


@_register("sparse_categorical_ce")
def sparse_categorical_ce(
    y_true: Any,
    y_pred: Any,
    *,
    from_logits: bool = False,
    ignore_class: int | None = None,
    axis: int = -1,
    class_weights: Sequence[float] | None = None,
) -> Any:
    """Cross-entropy for integer class indices: ``-w[t] * log(p[t])`` per sample.

    Equals :func:`categorical_ce` on the one-hot encoded labels. A label that is
    NaN/Inf or outside ``[0, classes)`` (and not ``ignore_class``) gives a NaN loss
    instead of silently wrapping around.

    Args:
        y_true: Integer class indices, ``y_pred``'s shape without ``axis`` (a
            size-1 ``axis`` is accepted).
        y_pred: Probabilities (or logits if ``from_logits``), classes along ``axis``.
        from_logits: Whether ``y_pred`` holds logits.
        ignore_class: A label value (e.g. ``-1`` or ``255`` for "void" pixels)
            whose samples get loss 0; :class:`SparseCategoricalCE` also leaves
            them out of the mean.
        axis: The class axis.
        class_weights: Optional non-negative weight per class; a sample's loss is
            multiplied by the weight of its true class.

    >>> import numpy as np
    >>> p = np.array([[0.1, 0.9], [0.5, 0.5]], dtype="float32")
    >>> np.round(np.asarray(sparse_categorical_ce(np.array([1, 0]), p)), 4)
    array([0.1054, 0.6931], dtype=float32)
    """
    return _sparse_categorical_ce(
        y_true,
        y_pred,
        from_logits=from_logits,
        ignore_class=ignore_class,
        axis=axis,
        class_weights=class_weights,
        attach_mask=True,
    )


def _sparse_categorical_ce(
    y_true: Tensor,
    y_pred: Tensor,
    *,
    from_logits: bool,
    ignore_class: int | None,
    axis: int,
    class_weights: Sequence[float] | None,
    attach_mask: bool,
) -> Tensor:
    _check_bool("from_logits", from_logits)
    ignore_class = _check_ignore_class(ignore_class)
    axis = _check_axis(axis)
    class_weights = _check_class_weights(class_weights)

    y_pred, out_dtype, logits = _prepare(y_pred, from_logits, "sparse_categorical_ce")
    rank = len(y_pred.shape)
    ax = _normalize_axis(axis, rank, y_pred)
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == rank and y_true.shape[ax] == 1:
        y_true = ops.squeeze(y_true, axis=ax)
    expected = _shape(y_pred)[:ax] + _shape(y_pred)[ax + 1 :]
    st = _shape(y_true)
    if len(st) != len(expected) or any(
        a is not None and b is not None and a != b for a, b in zip(st, expected)
    ):
        raise ValueError(
            "`sparse_categorical_ce`: `y_true` must hold one class index per sample, "
            f"i.e. have shape {expected} for y_pred.shape={_shape(y_pred)} and "
            f"axis={axis}. Received: y_true.shape={st}."
            + (" For one-hot targets use CategoricalCE." if len(st) == rank else "")
        )
    num_classes = y_pred.shape[ax]
    if class_weights is not None:
        _check_num_weights(class_weights, axis, num_classes)

    # Labels: NaN/Inf and out-of-range values give NaN, `ignore_class` gives 0.
    finite = None
    if keras.backend.is_float_dtype(y_true.dtype):
        finite = ops.isfinite(y_true)
        y_true = ops.where(finite, y_true, 0)
    labels = ops.cast(y_true, "int32")
    n = num_classes if num_classes is not None else ops.shape(y_pred)[ax]
    ok = ops.logical_and(ops.greater_equal(labels, 0), ops.less(labels, n))
    if finite is not None:
        ok = ops.logical_and(ok, finite)
    valid = None
    if ignore_class is not None:
        valid = ops.not_equal(labels, ignore_class)
        if finite is not None:
            valid = ops.logical_or(valid, ops.logical_not(finite))
        ok = ops.logical_and(ok, valid)
    safe = ops.where(ok, labels, 0)

    if logits is not None:
        res = _sparse_logits(safe, logits, ax)
    else:
        res = _sparse_probs(safe, y_pred, ax)
    if class_weights is not None:
        w = ops.convert_to_tensor(class_weights, dtype=res.dtype)
        res = res * ops.take(w, safe)
    res = ops.where(ok, res, float("nan"))
    if valid is not None:
        res = ops.where(valid, res, 0.0)
    res = ops.cast(res, out_dtype)
    if valid is not None and attach_mask:
        # Like Keras' built-in function: a Keras loss wrapper reads this mask and
        # averages over the non-ignored entries only (where the tensor type takes
        # attributes). SparseCategoricalCE does the same through sample weights.
        try:
            setattr(res, _MASK_ATTR, valid)
        except AttributeError:
            pass
    return res


@_register("binary_ce")
def binary_ce(
    y_true: Any,
    y_pred: Any,
    *,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    axis: int = -1,
) -> Any:
    """Binary cross-entropy ``-[y log p + (1-y) log(1-p)]``, averaged over ``axis``.

    Args:
        y_true: Targets in [0, 1], same shape as ``y_pred``.
        y_pred: Probabilities (or logits if ``from_logits``).
        from_logits: Whether ``y_pred`` holds logits.
        label_smoothing: In [0, 1]; targets are squeezed towards 0.5.
        axis: The axis averaged over (the independent binary labels).

    >>> import numpy as np
    >>> y = np.array([[1.0, 0.0]], dtype="float32")
    >>> p = np.array([[0.9, 0.2]], dtype="float32")
    >>> round(float(binary_ce(y, p)[0]), 4)
    0.1643
    """
    _check_bool("from_logits", from_logits)
    label_smoothing = _check_label_smoothing(label_smoothing)
    axis = _check_axis(axis)

    y_pred, out_dtype, logits = _prepare(y_pred, from_logits, "binary_ce")
    y_true = ops.convert_to_tensor(y_true)
    rank = len(y_pred.shape)
    ax = _normalize_axis(axis, rank, y_pred)
    _check_same_shape(y_true, y_pred, "binary_ce")
    y_true = ops.cast(y_true, y_pred.dtype)
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing

    if logits is not None:
        res = _bce_logits(y_true, logits, ax)
    else:
        res = _bce_probs(y_true, y_pred, ax)
    return ops.cast(res, out_dtype)


# --------------------------------------------------------------------------- #
# Loss classes
# --------------------------------------------------------------------------- #
class _CrossEntropyLoss(keras.losses.Loss):
    """Shared plumbing: dtype in config, logits kept across the dtype cast."""

    def __init__(self, *, name: str, reduction: str | None, dtype: Any) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._dtype_arg = _dtype_to_config(dtype)

    def __call__(
        self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None
    ) -> Tensor:
        # Keras casts y_pred to the loss dtype (float32 under mixed precision),
        # which drops the logits Keras attached to a float16 softmax output (and
        # any Keras mask). Carry them over so the stable path survives mixed
        # precision.
        logits = getattr(y_pred, _LOGITS_ATTR, None)
        if logits is not None and y_pred.dtype != self.dtype:
            mask = getattr(y_pred, _MASK_ATTR, None)
            y_pred = ops.cast(y_pred, self.dtype)
            try:
                setattr(y_pred, _LOGITS_ATTR, ops.cast(logits, self.dtype))
                if mask is not None:
                    setattr(y_pred, _MASK_ATTR, mask)
            except AttributeError:  # pragma: no cover - C tensor types
                pass
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def _base_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reduction": self.reduction,
            "dtype": self._dtype_arg,
        }


def _dtype_to_config(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, str):
        return dtype
    if isinstance(dtype, keras.DTypePolicy):
        return dtype.name
    # numpy / backend dtypes.
    return keras.backend.standardize_dtype(dtype)


@_register("CategoricalCE")
class CategoricalCE(_CrossEntropyLoss):
    """Categorical cross-entropy loss for one-hot (or soft) targets.

    Same values and gradients as ``keras.losses.CategoricalCrossentropy`` for
    the same arguments, plus ``class_weights``, a correct class count for label
    smoothing on any ``axis``, finite values for all-zero prediction rows, and a
    complete ``get_config`` (including ``dtype``).

    ``class_weights`` multiplies each class' term inside the per-sample sum, and
    the default reduction divides by the batch size. Keras'
    ``fit(class_weight=...)`` instead turns the weight of the ``argmax`` class into
    a *sample* weight: the same numbers for one-hot targets, but it is not saved
    with the model, works only for single-output models, and mis-weights soft or
    smoothed targets. PyTorch's ``CrossEntropyLoss(weight=w)`` with
    ``reduction="mean"`` divides by the summed weight of the targets,
    ``sum_i w[y_i] l_i / sum_i w[y_i]``, for class-index targets (for probability
    targets it divides by the batch size, as here). To reproduce the former, pass
    ``sample_weight=w[labels]`` with ``reduction="mean_with_sample_weight"`` and no
    ``class_weights``.

    >>> loss = CategoricalCE(label_smoothing=0.1, class_weights=[1.0, 2.0])
    >>> loss.get_config()["class_weights"]
    [1.0, 2.0]
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        class_weights: Sequence[float] | None = None,
        reduction: str | None = "sum_over_batch_size",
        name: str = "categorical_ce",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = _check_bool("from_logits", from_logits)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.axis = _check_axis(axis)
        self.class_weights = _check_class_weights(class_weights)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return categorical_ce(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            label_smoothing=self.label_smoothing,
            axis=self.axis,
            class_weights=self.class_weights,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "from_logits": self.from_logits,
            "label_smoothing": self.label_smoothing,
            "axis": self.axis,
            "class_weights": None if self.class_weights is None else list(self.class_weights),
        }


@_register("SparseCategoricalCE")
class SparseCategoricalCE(_CrossEntropyLoss):
    """Categorical cross-entropy for integer class indices.

    With ``ignore_class``, ignored samples get loss 0 and are left out of the
    ``"sum_over_batch_size"``/``"mean"`` denominator, as in Keras' built-in.

    >>> import numpy as np
    >>> p = np.array([[0.1, 0.9], [0.5, 0.5]], dtype="float32")
    >>> round(float(SparseCategoricalCE(ignore_class=-1)(np.array([1, -1]), p)), 4)
    0.1054
    """

    def __init__(
        self,
        from_logits: bool = False,
        ignore_class: int | None = None,
        axis: int = -1,
        class_weights: Sequence[float] | None = None,
        reduction: str | None = "sum_over_batch_size",
        name: str = "sparse_categorical_ce",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = _check_bool("from_logits", from_logits)
        self.ignore_class = _check_ignore_class(ignore_class)
        self.axis = _check_axis(axis)
        self.class_weights = _check_class_weights(class_weights)

    def __call__(
        self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None
    ) -> Tensor:
        if self.ignore_class is not None:
            sample_weight = self._ignore_weights(y_true, y_pred, sample_weight)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def _ignore_weights(
        self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None
    ) -> Tensor | None:
        # Keras' mask rule, applied through the sample weights so that it works
        # the same on every backend. For "sum_over_batch_size"/"mean" valid
        # entries get weight total / valid (the mean runs over them only); for
        # "mean_with_sample_weight" weight 1 (the divisor becomes their weight
        # sum); ignored losses are already 0, so "sum"/"none" need nothing. A
        # Keras mask on y_pred (e.g. from `mask_zero=True`) is applied by Keras
        # itself afterwards; the weights here account for it so that the mean
        # runs over the entries that are both unmasked and not ignored.
        if self.reduction not in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):
            return sample_weight
        y_true = ops.convert_to_tensor(y_true)
        rank = len(y_pred.shape)
        if not rank:
            return sample_weight  # The call reports the rank error.
        ax = self.axis % rank
        if len(y_true.shape) == rank and y_true.shape[ax] == 1:
            y_true = ops.squeeze(y_true, axis=ax)
        labels = y_true
        if keras.backend.is_float_dtype(labels.dtype):
            labels = ops.where(ops.isfinite(labels), labels, 0)
        valid = ops.not_equal(ops.cast(labels, "int32"), self.ignore_class)
        weights = ops.cast(valid, self.dtype)
        if self.reduction != "mean_with_sample_weight":
            in_mask = getattr(y_pred, _MASK_ATTR, None)
            if in_mask is None:
                kept = ops.cast(ops.size(valid), self.dtype)
                both = ops.sum(weights)
            else:
                in_mask = ops.cast(in_mask, "bool")
                kept = ops.sum(ops.cast(in_mask, self.dtype))
                both = ops.sum(ops.cast(ops.logical_and(valid, in_mask), self.dtype))
            weights = weights * ops.divide_no_nan(kept, both)
        if sample_weight is None:
            return weights
        sample_weight = ops.convert_to_tensor(sample_weight, dtype=self.dtype)
        if len(sample_weight.shape) == len(weights.shape) + 1 and sample_weight.shape[-1] == 1:
            sample_weight = ops.squeeze(sample_weight, axis=-1)
        return sample_weight * weights

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return _sparse_categorical_ce(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            ignore_class=self.ignore_class,
            axis=self.axis,
            class_weights=self.class_weights,
            attach_mask=False,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "from_logits": self.from_logits,
            "ignore_class": self.ignore_class,
            "axis": self.axis,
            "class_weights": None if self.class_weights is None else list(self.class_weights),
        }


@_register("BinaryCE")
class BinaryCE(_CrossEntropyLoss):
    """Binary cross-entropy for independent 0/1 (or soft) labels.

    >>> import numpy as np
    >>> round(float(BinaryCE()(np.array([[1.0], [0.0]]), np.array([[0.9], [0.2]]))), 4)
    0.1643
    """

    def __init__(
        self,
        from_logits: bool = False,
        label_smoothing: float = 0.0,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str = "binary_ce",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = _check_bool("from_logits", from_logits)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.axis = _check_axis(axis)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        # Accept (batch,) targets for a (batch, 1) output, like Keras' built-in.
        if len(y_true.shape) == len(y_pred.shape) - 1 and y_pred.shape[-1] == 1:
            y_true = ops.expand_dims(y_true, -1)
        return binary_ce(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            label_smoothing=self.label_smoothing,
            axis=self.axis,
        )

    def get_config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "from_logits": self.from_logits,
            "label_smoothing": self.label_smoothing,
            "axis": self.axis,
        }

"""The in-process checks on values: each takes a Subject, returns (result, reason)."""

from __future__ import annotations

import json
import logging
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_ce_plugin.testing._inputs import (
    Batch,
    Subject,
    _init_params,
    close,
    max_diff,
    to_numpy,
    value_and_grad,
    with_reduction,
)
from keras_ce_plugin.testing._report import FAILED, PASSED, SKIPPED, WARNING, first_line

Outcome = tuple[str, str]

# Two float32 evaluations of the same math in another order (a reduction, a
# traced graph) differ by a few ulps: rtol 1e-5 covers that; atol 1e-6 keeps
# values near 0 (a confident correct prediction, loss ~1e-7) from failing on
# relative error alone.
RTOL, ATOL = 1e-5, 1e-6
# Another backend's kernels (log, exp, softmax) round differently: a few ulps more.
RTOL_BACKEND, ATOL_BACKEND = 1e-4, 1e-6
# A float32 loss against a float64 NumPy reference: float32 rounding (~1e-7
# relative per op) plus the usual clip at epsilon (1e-7) in absolute terms.
RTOL_REFERENCE, ATOL_REFERENCE = 1e-4, 1e-5

REDUCTIONS = ("sum", "sum_over_batch_size", "mean_with_sample_weight", None)


class _Given(keras.losses.Loss):
    """Returns ``y_pred`` as the per-sample values: Keras' own reduction of them."""

    def call(self, y_true, y_pred):
        return y_pred


def keras_reduce(values: np.ndarray, reduction: str | None, sample_weight=None) -> np.ndarray:
    """What Keras' ``Loss.__call__`` makes of per-sample ``values``."""
    v = np.asarray(values, dtype="float32")
    return to_numpy(_Given(reduction=reduction, name="given")(v, v, sample_weight=sample_weight))


def per_sample(s: Subject, batch: Batch) -> np.ndarray:
    """The unreduced values: ``__call__`` with ``reduction=None``."""
    return to_numpy(with_reduction(s.loss, None)(batch.y_true, batch.y_pred))


def sample_by_sample(s: Subject, batch: Batch) -> np.ndarray:
    """Each sample's values computed alone, stacked: what ``call`` should return."""
    rows = []
    none = with_reduction(s.loss, None)
    for i in range(batch.y_pred.shape[0]):
        out = to_numpy(none(batch.y_true[i : i + 1], batch.y_pred[i : i + 1]))
        rows.append(out.reshape(out.shape[1:]) if out.ndim and out.shape[0] == 1 else out)
    return np.stack(rows)


def _fmt(x: Any) -> str:
    a = np.asarray(x)
    return f"{float(a):.6g}" if a.ndim == 0 else str(np.round(a, 6).tolist())


def sample_weights(n: int) -> np.ndarray:
    w = np.random.default_rng(7).uniform(0.25, 2.0, size=n).astype("float32")
    w[0] = 0.0  # A zero weight must drop the sample.
    return w


# --------------------------------------------------------------------------- #
def check_registered(s: Subject) -> Outcome:
    target = s.cls_or_fn
    if s.builtin:
        return SKIPPED, f"a Keras built-in: Keras resolves it by its own name {s.name!r}"
    if s.name is None:
        return FAILED, (
            f"{target.__qualname__} is not registered under a `package>Name`, so neither "
            "compile(loss='...') nor load_model() can find it"
        )
    return PASSED, f"registered as {s.name!r}"


def _normalize(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_config_complete(s: Subject) -> Outcome:
    if s.fn is not None:
        return SKIPPED, "a function has no config (its arguments cannot be saved)"
    config = s.loss.get_config()
    params = _init_params(type(s.loss))
    if not params:
        return PASSED, "__init__ takes no arguments"
    missing = [n for n in params if n not in config]
    if missing:
        extra = ""
        if "dtype" in missing:
            extra = (
                " (Keras' base Loss.get_config() returns only name and reduction: "
                "a loss built with dtype='float64' reloads as float32)"
            )
        return FAILED, f"get_config() lacks __init__ argument(s) {', '.join(missing)}{extra}"
    return PASSED, f"get_config() has all {len(params)} __init__ arguments"


def check_config_roundtrip(s: Subject) -> Outcome:
    if s.fn is not None:
        return SKIPPED, "a function has no config to round-trip"
    config = s.loss.get_config()
    try:
        new = type(s.loss).from_config(config)
    except Exception as exc:  # noqa: BLE001 - the reason is the report
        return FAILED, f"from_config(get_config()) raised {first_line(exc)}"
    new_config = new.get_config()
    if _normalize(new_config) != _normalize(config):
        diff = sorted(
            k for k in set(config) | set(new_config) if config.get(k) != new_config.get(k)
        )
        return FAILED, f"from_config(get_config()) gives another config (keys {diff})"
    for batch in (s.batch, s.partial):
        a = to_numpy(s.loss(batch.y_true, batch.y_pred))
        b = to_numpy(new(batch.y_true, batch.y_pred))
        if not close(a, b, RTOL, ATOL):
            return FAILED, f"the reloaded loss gives other values ({max_diff(a, b)})"
    return PASSED, "same config and values after from_config(get_config())"


def check_config_json(s: Subject) -> Outcome:
    try:
        serialized = keras.saving.serialize_keras_object(s.obj if s.fn else s.loss)
        json.dumps(serialized)
    except Exception as exc:  # noqa: BLE001
        return FAILED, f"serialize_keras_object() is not JSON-serializable: {first_line(exc)}"
    return PASSED, "serialize_keras_object() is JSON-serializable"


def check_sample_weight(s: Subject) -> Outcome:
    b = s.batch
    w = sample_weights(b.y_pred.shape[0])
    actual = to_numpy(s.loss(b.y_true, b.y_pred, sample_weight=w))
    expected = keras_reduce(sample_by_sample(s, b), s.loss.reduction, w)
    if not close(actual, expected, RTOL, ATOL):
        return FAILED, (
            f"a weighted call gives {_fmt(actual)}, Keras' weighted reduction of the "
            f"per-sample values {_fmt(expected)}: the weights do not weight the samples"
        )
    return PASSED, f"weighted call equals Keras' {s.loss.reduction!r} reduction"


def _rebuilt(s: Subject, reduction: str | None) -> keras.losses.Loss:
    # Through the constructor (a reduction that __init__ drops is caught), where the
    # config round-trips; otherwise (config_roundtrip reports that) a patched copy.
    if s.fn is None and "reduction" in _init_params(type(s.loss)):
        try:
            config = {**s.loss.get_config(), "reduction": reduction}
            new = type(s.loss).from_config(config)
            if _normalize({**new.get_config(), "reduction": reduction}) == _normalize(config):
                return new
        except Exception:  # noqa: BLE001
            pass
    return with_reduction(s.loss, reduction)


def check_reduction(s: Subject) -> Outcome:
    b = s.batch
    n = b.y_pred.shape[0]
    values = per_sample(s, b)
    if values.ndim == 0 or values.shape[0] != n:
        return FAILED, (
            f"call() returns shape {values.shape} for a batch of {n}: it reduces over "
            "the batch axis, so Keras' reduction and sample weights have nothing to act on"
        )
    alone = sample_by_sample(s, b)
    if not close(values, alone, RTOL, ATOL):
        return FAILED, (
            "a sample's value depends on the other samples of the batch "
            f"({max_diff(values, alone)} from computing each sample alone)"
        )
    for reduction in REDUCTIONS:  # Unweighted: weights are `sample_weight`'s business.
        got = to_numpy(_rebuilt(s, reduction)(b.y_true, b.y_pred))
        want = keras_reduce(values, reduction)
        if not close(got, want, RTOL, ATOL):
            return FAILED, f"reduction={reduction!r} disagrees with call() ({max_diff(got, want)})"
    return PASSED, f"call() is per-sample {values.shape}; all {len(REDUCTIONS)} reductions agree"


def _shape_variants(s: Subject) -> list[tuple[str, np.ndarray, np.ndarray]]:
    yt, yp = s.batch.y_true, s.batch.y_pred
    n = yp.shape[0]
    if s.targets == "categorical":
        return [("int32 one-hot y_true", yt.astype("int32"), yp)]
    if s.targets == "sparse":
        return [
            (f"y_true {(n, 1)}", yt.reshape(n, 1), yp),
            ("int64 y_true", yt.astype("int64"), yp),
            ("float32 y_true", yt.astype("float32"), yp),
        ]
    return [
        (f"y_true {(n,)} with y_pred {yp.shape}", yt.reshape(n), yp),
        ("int32 y_true", yt.astype("int32"), yp),
    ]


def check_shapes(s: Subject) -> Outcome:
    if s.targets == "example":
        return SKIPPED, "no label shape variants are known for a custom `example`"
    base = per_sample(s, s.batch)
    base_red = to_numpy(s.loss(s.batch.y_true, s.batch.y_pred))
    none = with_reduction(s.loss, None)
    for what, yt, yp in _shape_variants(s):
        try:
            got = to_numpy(none(yt, yp))
            red = to_numpy(s.loss(yt, yp))
        except Exception as exc:  # noqa: BLE001
            return FAILED, f"{what} (accepted by Keras' built-ins) raises {first_line(exc)}"
        if got.shape != base.shape:
            n = yp.shape[0]
            how = " (a silent broadcast)" if got.shape[:2] == (n, n) else ""
            return FAILED, f"{what} gives per-sample shape {got.shape}, not {base.shape}{how}"
        if not (close(got, base, RTOL, ATOL) and close(red, base_red, RTOL, ATOL)):
            return FAILED, f"{what} gives other values ({max_diff(got, base)})"
    return PASSED, f"{len(_shape_variants(s))} label shape/dtype variants give the same values"


def _edge_batch(s: Subject) -> tuple[Any, np.ndarray, str]:
    """Labels and predictions at the edges of the valid inputs."""
    c = s.batch.y_pred.shape[-1]
    if s.targets == "binary":
        y = np.array([[0.0], [0.0], [1.0], [1.0]], "float32")
        p = np.array([[0.0], [1.0], [0.0], [1.0]], "float32")
        if s.from_logits:
            return y, (2.0 * p - 1.0) * 1e4, "logits of +-1e4"
        return y, p, "probabilities 0 and 1"
    labels = np.array([0, 1, 2, 0], "int32") % c
    eye = np.eye(c, dtype="float32")
    p = np.stack([eye[labels[0]], eye[(labels[1] + 1) % c], eye[labels[2]], eye[labels[3]]])
    p[3] = (1.0 - eye[labels[3]]) / (c - 1)  # true class 0, the others share the mass
    y = labels if s.targets == "sparse" else eye[labels]
    if s.from_logits:
        return y, (2.0 * p - 1.0) * 1e4, "logits of +-1e4"
    return y, p, "probabilities 0 and 1 for the true and the other classes"


def _finite(s: Subject, y: Any, p: np.ndarray) -> str | None:
    """Which of value and gradient is not finite (a missing gradient is `gradient`'s)."""
    value, grad = value_and_grad(lambda yp: ops.sum(s.loss(y, yp)), p)
    bad = [
        what
        for what, array in (("value", value), ("gradient", grad))
        if array is not None and not np.all(np.isfinite(array))
    ]
    return " and ".join(bad) if bad else None


def check_finite(s: Subject) -> Outcome:
    if s.targets == "example":
        bad = _finite(s, s.batch.y_true, s.batch.y_pred)
        if bad:
            return FAILED, f"{bad} not finite on the example batch"
        return PASSED, "finite on the example batch (edges unknown for a custom example)"
    y, p, what = _edge_batch(s)
    bad = _finite(s, y, p)
    if bad:
        return FAILED, f"{bad} not finite at {what}"
    note = ""
    if not s.from_logits and s.targets != "binary":
        zero = _finite(s, y[:1], np.zeros_like(p[:1]))
        note = f"; all-zero prediction row: {zero} not finite (informational)" if zero else ""
        note = note or "; all-zero prediction row finite"
    return PASSED, f"value and gradient finite at {what}{note}"


def check_gradient(s: Subject) -> Outcome:
    b = s.batch
    if not np.issubdtype(b.y_pred.dtype, np.floating):
        return SKIPPED, "y_pred is not floating point"
    _, grad = value_and_grad(lambda yp: ops.sum(s.loss(b.y_true, yp)), b.y_pred)
    if grad is None:
        return FAILED, "no gradient w.r.t. y_pred (a non-differentiable op or a NumPy round trip)"
    if not np.all(np.isfinite(grad)):
        return FAILED, "the gradient w.r.t. y_pred is not finite on random inputs"
    if not np.any(grad):
        return FAILED, "the gradient w.r.t. y_pred is identically zero on random inputs"
    return PASSED, "gradient w.r.t. y_pred exists, finite and non-zero"


def check_reference(s: Subject) -> Outcome:
    if s.reference is None:
        return SKIPPED, "no `reference=` function given"
    for batch in (s.batch, s.partial):
        want = np.asarray(s.reference(batch.y_true, batch.y_pred), dtype="float64")
        got = per_sample(s, batch)
        if not close(got, want, RTOL_REFERENCE, ATOL_REFERENCE):
            return FAILED, f"per-sample values differ from the reference ({max_diff(got, want)})"
    return PASSED, "per-sample values match the NumPy reference"


# --------------------------------------------------------------------------- #
def _traced(s: Subject, jit_compile: bool | None):
    """The per-sample and reduced values under tf.function/jax.jit."""
    none = with_reduction(s.loss, None)

    def both(yt, yp):
        return none(yt, yp), s.loss(yt, yp)

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(both)
    import tensorflow as tf

    b = s.batch
    signature = [
        tf.TensorSpec([None, *b.y_true.shape[1:]], b.y_true.dtype),
        tf.TensorSpec([None, *b.y_pred.shape[1:]], b.y_pred.dtype),
    ]
    return tf.function(both, input_signature=signature, jit_compile=jit_compile)


def _compare_traced(s: Subject, fn) -> str | None:
    # TensorFlow warns about "retracing" when several checks trace the same loss.
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        return _compare_traced_quietly(s, fn)
    finally:
        tf_logger.setLevel(level)


def _compare_traced_quietly(s: Subject, fn) -> str | None:
    for batch in (s.batch, s.partial):
        got = [to_numpy(v) for v in fn(batch.y_true, batch.y_pred)]
        want = [per_sample(s, batch), to_numpy(s.loss(batch.y_true, batch.y_pred))]
        for g, w in zip(got, want):
            if not close(g, w, RTOL, ATOL):
                return (
                    f"differs from eager on a batch of {batch.y_pred.shape[0]} ({max_diff(g, w)})"
                )
    return None


def check_graph(s: Subject) -> Outcome:
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        return SKIPPED, f"the {backend} backend runs eagerly"
    where = "jax.jit" if backend == "jax" else "tf.function with an unknown batch size"
    try:
        bad = _compare_traced(s, _traced(s, None if backend == "jax" else False))
    except Exception as exc:  # noqa: BLE001
        return FAILED, f"{where} raised {first_line(exc)}"
    if bad:
        return FAILED, f"{where} {bad}"
    return PASSED, f"{where}: same values as eager (full and partial batch)"


def check_xla(s: Subject) -> Outcome:
    backend = keras.backend.backend()
    if backend == "jax":
        return SKIPPED, "on JAX, `graph` already runs under jax.jit (XLA)"
    if backend != "tensorflow":
        return SKIPPED, f"no XLA compilation on the {backend} backend"
    try:
        bad = _compare_traced(s, _traced(s, True))
    except Exception as exc:  # noqa: BLE001
        bad = f"raised {first_line(exc)}"
    if bad:
        # TF's fit() does not XLA-compile on CPU by default: a warning, not a failure.
        return WARNING, f"tf.function(jit_compile=True) {bad}; fit(jit_compile=True) would fail"
    return PASSED, "XLA-compiled (jit_compile=True): same values"


def reason_if_raised(fn, s: Subject) -> Outcome:
    try:
        return fn(s)
    except Exception as exc:  # noqa: BLE001 - a check that raises is a failure
        return FAILED, f"raised {first_line(exc)}"

"""Property-based tests (hypothesis): random shapes, axes, dtypes and options.

For any probabilities in [0, 1] (zeros, ones and all-zero rows included) and any
finite logits up to +-1e4, in float16, bfloat16, float32 and float64:

* the per-sample loss agrees with the float64 NumPy reference of test_losses
  (computed on the same rounded inputs) within a bound from the dtype's precision;
* it is >= 0 and finite, and so are the gradients;
* the reductions agree with Keras' rule; the sparse loss equals the categorical
  loss of one-hot labels, gradients included.

Derandomized and bounded, so the run is fast and reproducible.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import ops
from test_losses import REDUCTIONS, _f64, ref_bce, ref_cce, ref_reduce, ref_scce, vjp

import keras_ce_plugin as kcp

SETTINGS = settings(
    # 30 cases on TensorFlow; the JAX and torch re-runs (tests/test_backend_suite.py)
    # take 10 derandomized cases each: JAX compiles every new shape.
    max_examples=30 if keras.backend.backend() == "tensorflow" else 10,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = ["float16", "bfloat16", "float32", "float64"]
# Relative rounding of the result, which is returned in the input dtype.
OUTPUT_RTOL = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 0.0, "float64": 0.0}


def _compute_eps(dtype: str) -> float:
    float64_ok = keras.backend.backend() != "jax"
    if dtype == "float64" and not float64_ok:
        import jax

        float64_ok = bool(jax.config.jax_enable_x64)
    return 2.0**-52 if dtype == "float64" and float64_ok else 2.0**-23


@st.composite
def cases(draw, kind: str):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    classes = draw(st.integers(2, 6)) if kind != "bce" else shape[axis]
    shape = shape[: axis % rank] + (classes,) + shape[axis % rank + 1 :]
    from_logits = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    if from_logits:
        bound = draw(st.sampled_from([5.0, 100.0, 1e4]))
        elements = st.floats(-bound, bound, allow_nan=False, width=64)
    else:
        elements = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, width=64))
    x = draw(hnp.arrays(np.float64, shape, elements=elements))
    if not from_logits and draw(st.booleans()):
        index = [slice(None)] * rank
        index[axis] = slice(None)
        x[tuple(i if k == axis % rank else 0 for k, i in enumerate(index))] = 0.0  # zero row
    # Round to the dtype: the reference sees exactly what the loss sees.
    x = _f64(ops.cast(ops.cast(x, dtype), "float64"))
    options = {"from_logits": from_logits, "axis": axis}
    if kind in ("cce", "bce") and draw(st.booleans()):
        options["label_smoothing"] = draw(st.floats(0.0, 1.0))
    if kind in ("cce", "scce") and draw(st.booleans()):
        weights = st.floats(0.0, 5.0, width=32)
        options["class_weights"] = draw(st.lists(weights, min_size=classes, max_size=classes))
    target_shape = shape[: axis % rank] + shape[axis % rank + 1 :]
    labels = draw(hnp.arrays(np.int64, target_shape, elements=st.integers(0, classes - 1)))
    if kind == "scce":
        if draw(st.booleans()):
            options["ignore_class"] = int(draw(st.integers(0, classes - 1)))
        y = labels
    elif kind == "cce":
        y = np.moveaxis(np.eye(classes)[labels], -1, axis % rank)
        if draw(st.booleans()):  # soft targets
            soft = draw(hnp.arrays(np.float64, shape, elements=st.floats(0.0, 1.0, width=32)))
            y = soft / np.maximum(soft.sum(axis=axis, keepdims=True), 1e-3)
    else:
        y = draw(hnp.arrays(np.float64, shape, elements=st.floats(0.0, 1.0, width=32)))
    return x, y, dtype, options


def _reference(kind, y, x, options, dtype="float64"):
    if kind == "cce":
        return ref_cce(y, x, **options), None
    if kind == "scce":
        return ref_scce(y, x, **options)
    upper = 1.0 - 1e-7
    if _compute_eps(dtype) > 2.0**-52:  # computed in float32
        upper = float(np.float32(upper))
    return ref_bce(y, x, upper=upper, **options), None


def _tolerance(kind, x, ref, dtype, options) -> np.ndarray:
    weight = max(1.0, sum(options.get("class_weights", [1.0]) or [1.0]))
    magnitude = float(np.max(np.abs(x))) if options["from_logits"] else 16.2
    scale = weight * (1.0 + 2.0 * magnitude + math.log(x.shape[options["axis"]]))
    return 64 * _compute_eps(dtype) * scale + OUTPUT_RTOL[dtype] * np.abs(ref)


FUNCTIONS = {"cce": kcp.categorical_ce, "scce": kcp.sparse_categorical_ce, "bce": kcp.binary_ce}
CLASSES = {"cce": kcp.CategoricalCE, "scce": kcp.SparseCategoricalCE, "bce": kcp.BinaryCE}


def _check(kind, case):
    x, y, dtype, options = case
    x_t = ops.cast(x, dtype)
    fn = FUNCTIONS[kind]
    value = _f64(ops.cast(fn(y, x_t, **options), "float64"))
    ref, _ = _reference(kind, y, x, options, dtype)
    assert value.shape == ref.shape
    assert np.all(np.isfinite(value)), (value, ref)
    assert np.all(value >= 0), value
    err = np.abs(value - ref)
    tol = _tolerance(kind, x, ref, dtype, options)
    assert np.all(err <= tol), (err.max(), tol, value, ref)
    # Gradients (computed in the input dtype): finite.
    _, grad = vjp(lambda t: fn(y, t, **options), x_t)
    assert grad.shape == x.shape
    # Finite wherever the exact gradient fits the dtype: a float16 row of subnormal
    # probabilities (sum 2e-6) has a gradient of ~1e6, past float16's 65504.
    _, wide = vjp(lambda t: fn(y, t, **options), ops.cast(x, "float64"))
    fits = np.abs(wide) < np.finfo(dtype).max / 2 if dtype != "bfloat16" else True
    assert np.all(np.isfinite(grad[fits])), (grad, wide)


@SETTINGS
@given(cases("cce"))
def test_categorical_properties(case):
    _check("cce", case)


@SETTINGS
@given(cases("scce"))
def test_sparse_properties(case):
    _check("scce", case)


@SETTINGS
@given(cases("bce"))
def test_binary_properties(case):
    _check("bce", case)


@SETTINGS
@given(cases("scce"))
def test_sparse_equals_categorical_of_one_hot(case):
    x, labels, dtype, options = case
    options = dict(options)
    ignore = options.pop("ignore_class", None)
    axis = options["axis"] % x.ndim
    one_hot = np.moveaxis(np.eye(x.shape[axis])[labels], -1, axis)
    if dtype not in ("float32", "float64"):
        dtype = "float32"
    x_t = ops.cast(x, dtype)
    v1, g1 = vjp(lambda t: kcp.sparse_categorical_ce(labels, t, **options), x_t)
    v2, g2 = vjp(lambda t: kcp.categorical_ce(one_hot, t, **options), x_t)
    eps = _compute_eps(dtype)
    np.testing.assert_allclose(v1, v2, rtol=64 * eps, atol=64 * eps)
    scale = 64 * eps * max(1.0, float(np.max(np.abs(g2))))
    np.testing.assert_allclose(g1, g2, rtol=64 * eps, atol=scale)
    if ignore is not None:
        v3 = kcp.sparse_categorical_ce(labels, x_t, ignore_class=ignore, **options)
        expected = np.where(labels == ignore, 0.0, v1)
        np.testing.assert_allclose(_f64(v3), expected, rtol=64 * eps, atol=1e-12)


@SETTINGS
@given(
    st.sampled_from(["cce", "scce", "bce"]).flatmap(
        lambda kind: st.tuples(
            st.just(kind),
            cases(kind),
            st.sampled_from(REDUCTIONS),
            st.booleans(),
        )
    )
)
def test_reductions_follow_keras_rule(args):
    kind, (x, y, dtype, options), reduction, weighted = args
    if dtype != "float64":
        dtype = "float32"
    rng = np.random.default_rng(0)
    per_sample_shape = _reference(kind, y, x, options)[0].shape
    sw = rng.uniform(0.0, 2.0, size=per_sample_shape) if weighted else None
    loss = CLASSES[kind](reduction=reduction, dtype=dtype, **options)
    value = _f64(loss(y, ops.cast(x, dtype), sample_weight=sw))
    ref, mask = _reference(kind, y, x, options, dtype)
    mask = mask if kind == "scce" and "ignore_class" in options else None
    expected = ref_reduce(ref, sw, reduction, mask=mask)
    assert np.all(np.isfinite(value))
    tol_dtype = dtype
    if keras.backend.backend() == "torch" and reduction in (
        "sum_over_batch_size",
        "mean",
        "mean_with_sample_weight",
    ):
        # Keras' own reduction on torch (`ops.divide_no_nan`) returns float32 for float64
        # input, as it does for the built-in losses: the dtype family of keras#23704.
        tol_dtype = "float32"
    tol = (
        64
        * _compute_eps(tol_dtype)
        * (1.0 + np.abs(expected))
        * (1.0 + 2.0 * float(np.max(np.abs(x))) + 16.2)
        * max(1.0, sum(options.get("class_weights", [1.0]) or [1.0]))
    )
    if isinstance(tol, np.ndarray) and sw is not None and tol.shape != value.shape:
        tol = np.max(tol)
    assert np.all(np.abs(value - expected) <= tol), (value, expected)

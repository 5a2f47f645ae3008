"""Numeric tests of the plugin losses.

Three oracles:

* Keras' built-ins (``CategoricalCrossentropy``, ``SparseCategoricalCrossentropy``,
  ``BinaryCrossentropy``): values and gradients must agree to 1e-5 (relative,
  float32) for every option, reduction and sample weight, eagerly and compiled.
* A float64 NumPy reference (below), also for what Keras lacks (``class_weights``)
  or gets wrong (label smoothing on a non-last axis, keras-team/keras#23451; an
  all-zero probability row, keras-team/keras#23552), and finite differences of it.
* Hand-computed golden numbers.

Backend-neutral (keras.ops / NumPy); TensorFlow-only behaviour is skipped elsewhere.
"""

from __future__ import annotations

import math
import os
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_ce_plugin import (
    BinaryCE,
    CategoricalCE,
    SparseCategoricalCE,
    binary_ce,
    categorical_ce,
    sparse_categorical_ce,
)

BACKEND = keras.backend.backend()
EPS = 1e-7
REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", None, "none"]
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow-backend behaviour")


# --------------------------------------------------------------------------- #
# float64 NumPy reference
# --------------------------------------------------------------------------- #
def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor: out of autograd; numpy has no bfloat16
        x = x.detach().cpu().double()
    return np.asarray(x, dtype=np.float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_cce(y, p, *, from_logits=False, label_smoothing=0.0, axis=-1, class_weights=None):
    """-sum_c w_c y_c log q_c along `axis`; q = clip(p / max(sum p, eps), eps, 1 - eps)."""
    y, p = np.moveaxis(_f64(y), axis, -1), np.moveaxis(_f64(p), axis, -1)
    n = p.shape[-1]
    if label_smoothing:
        y = y * (1.0 - label_smoothing) + label_smoothing / n
    if class_weights is not None:
        y = y * _f64(class_weights)
    if from_logits:
        log_q = _log_softmax(p)
    else:
        q = p / np.maximum(p.sum(-1, keepdims=True), EPS)
        log_q = np.log(np.clip(q, EPS, 1.0 - EPS))
    return -(y * log_q).sum(-1)


def ref_scce(labels, p, *, from_logits=False, ignore_class=None, axis=-1, class_weights=None):
    """Returns (per-sample loss, valid mask): cce of the one-hot labels, 0 where ignored."""
    p = _f64(p)
    labels = np.asarray(labels)
    if labels.ndim == p.ndim:
        labels = np.squeeze(labels, axis=axis)
    n = p.shape[axis]
    valid = np.ones(labels.shape, bool) if ignore_class is None else labels != ignore_class
    one_hot = np.eye(n)[np.where(valid, labels, 0).astype(int)]
    out = ref_cce(
        one_hot,
        np.moveaxis(p, axis, -1),
        from_logits=from_logits,
        class_weights=class_weights,
    )
    return np.where(valid, out, 0.0), valid


def ref_bce(y, p, *, from_logits=False, label_smoothing=0.0, axis=-1, upper=1.0 - EPS):
    """mean over `axis` of -(y log c + (1 - y) log(1 - c)), c = clip(p, eps, 1 - eps).

    `upper` is 1 - eps as the computing dtype rounds it (float32: 1 - 1.19e-7),
    which matters for log(1 - c) at p = 1.
    """
    y, p = _f64(y), _f64(p)
    if label_smoothing:
        y = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if from_logits:
        per = np.maximum(p, 0) - p * y + np.log1p(np.exp(-np.abs(p)))
    else:
        c = np.clip(p, EPS, upper)
        per = -(y * np.log(c) + (1.0 - y) * np.log1p(-c))
    return per.mean(axis=axis)


def ref_reduce(values, sample_weight=None, reduction="sum_over_batch_size", mask=None):
    """Keras 3's reduction rule (keras.losses.Loss), in float64."""
    values = _f64(values)
    sw = None if sample_weight is None else _f64(sample_weight)
    if sw is not None and sw.ndim == values.ndim + 1 and sw.shape[-1] == 1:
        sw = sw[..., 0]
    if mask is not None:
        mask = _f64(mask)
        if reduction in ("sum_over_batch_size", "mean"):
            mask = mask * (mask.size / mask.sum() if mask.sum() else 0.0)
        sw = mask if sw is None else sw * mask
    if sw is not None:
        values = values * sw
    if reduction in (None, "none") or values.shape in ((), (0,)):
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and sw is not None:
        divisor = sw.sum()
    else:
        divisor = values.size
    return total / divisor if divisor else 0.0


# --------------------------------------------------------------------------- #
# Backend helpers: value and vector-Jacobian product, eager or compiled
# --------------------------------------------------------------------------- #
def _cotangent(shape) -> np.ndarray:
    return np.random.default_rng(7).uniform(0.5, 1.5, size=tuple(shape))


def vjp(fn, x, *, graph=False):
    """(fn(x), d<fn(x), v>/dx) as float64 arrays for a fixed random cotangent v."""
    if BACKEND != "torch":
        x = np.asarray(x)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = fn(x)
            cot = tf.constant(_cotangent(out.shape), dtype=out.dtype)
            return out, tape.gradient(out, x, output_gradients=cot)

        out, grad = (tf.function(run) if graph else run)(tf.constant(x))
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def run(x):
            out, pull = jax.vjp(fn, x)
            return out, pull(jnp.asarray(_cotangent(out.shape), out.dtype))[0]

        out, grad = (jax.jit(run) if graph else run)(jnp.asarray(x))
    elif BACKEND == "torch" and not graph:
        import torch

        # A tensor stays one (numpy has no bfloat16 for torch to convert from).
        xt = x.detach().clone() if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x))
        xt.requires_grad_(True)
        out = fn(xt)
        (grad,) = torch.autograd.grad(out, xt, torch.tensor(_cotangent(out.shape), dtype=out.dtype))
        out, grad = out.detach().cpu(), grad.cpu()
    else:
        pytest.skip(f"no gradient helper for backend {BACKEND} (graph={graph})")
    return _f64(out), _f64(grad)


def assert_close(actual, expected, rtol=1e-5, what=""):
    """Relative error <= rtol, measured against the largest |expected| entry."""
    actual, expected = _f64(actual), _f64(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + 1e-10, err_msg=what)


# --------------------------------------------------------------------------- #
# Test data
# --------------------------------------------------------------------------- #
B, C = 6, 5


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def make_case(kind: str, from_logits: bool, shape=(B, C), axis=-1, seed=0, unnormalized=False):
    """(y_true, y_pred) float32 test data away from the clipping region."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=shape).astype("float32")
    if kind == "bce":
        y = (rng.uniform(size=shape) < 0.5).astype("float32")
        y.flat[::3] = rng.uniform(size=y.flat[::3].shape)  # some soft targets
        p = rng.uniform(0.02, 0.98, size=shape).astype("float32")
        return y, (logits if from_logits else p)
    n = shape[axis]
    labels = rng.integers(0, n, size=np.delete(np.array(shape), axis % len(shape)))
    p = _softmax(logits, axis).astype("float32")
    if unnormalized:  # rows that do not sum to 1: Keras renormalises them
        size = list(shape)
        size[axis] = 1
        p = (p * rng.uniform(0.5, 2.0, size=size)).astype("float32")
    if kind == "scce":
        return labels, (logits if from_logits else p)
    y = np.moveaxis(np.eye(n, dtype="float32")[labels], -1, axis)
    soft = _softmax(rng.normal(size=shape), axis).astype("float32")
    y[0] = soft[0]  # one soft target row
    return y, (logits if from_logits else p)


def builtin(kind: str, **kw):
    cls = {
        "cce": keras.losses.CategoricalCrossentropy,
        "scce": keras.losses.SparseCategoricalCrossentropy,
        "bce": keras.losses.BinaryCrossentropy,
    }[kind]
    return cls(**kw)


def plugin(kind: str, **kw):
    return {"cce": CategoricalCE, "scce": SparseCategoricalCE, "bce": BinaryCE}[kind](**kw)


PARITY_OPTIONS = [
    ("cce", {}),
    ("cce", {"label_smoothing": 0.1}),
    ("cce", {"unnormalized": True}),
    ("scce", {}),
    ("scce", {"ignore_class": -1}),
    ("scce", {"ignore_class": 2}),
    ("bce", {}),
    ("bce", {"label_smoothing": 0.2}),
]


def _ids(val):
    if isinstance(val, dict):
        return ",".join(f"{k}={v}" for k, v in val.items()) or "default"
    return None


# --------------------------------------------------------------------------- #
# Parity with the Keras built-ins: values and gradients
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("kind,options", PARITY_OPTIONS, ids=_ids)
def test_parity_with_builtin(kind, options, from_logits, reduction, weighted, graph):
    options = dict(options)
    unnormalized = options.pop("unnormalized", False)
    y, p = make_case(kind, from_logits, unnormalized=unnormalized)
    if kind == "scce" and "ignore_class" in options:
        y[[1, 4]] = options["ignore_class"]
    sw = (
        np.random.default_rng(3).uniform(0.0, 2.0, size=(B,)).astype("float32")
        if weighted
        else None
    )
    sw = None if sw is None else np.where(np.arange(B) == 2, 0.0, sw).astype("float32")
    ours = plugin(kind, from_logits=from_logits, reduction=reduction, **options)
    theirs = builtin(kind, from_logits=from_logits, reduction=reduction, **options)
    v_ours, g_ours = vjp(lambda x: ours(y, x, sample_weight=sw), p, graph=graph)
    v_theirs, g_theirs = vjp(lambda x: theirs(y, x, sample_weight=sw), p, graph=graph)
    assert_close(v_ours, v_theirs, what="value")
    assert_close(g_ours, g_theirs, what="gradient")
    # And the float64 reference agrees with both.
    if kind == "cce":
        per, mask = ref_cce(y, p, from_logits=from_logits, **options), None
    elif kind == "scce":
        per, mask = ref_scce(y, p, from_logits=from_logits, **options)
        mask = None if "ignore_class" not in options else mask
    else:
        per, mask = ref_bce(y, p, from_logits=from_logits, **options), None
    assert_close(v_ours, ref_reduce(per, sw, reduction, mask=mask), what="reference")


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize(
    "kind,options", [("cce", {}), ("cce", {"label_smoothing": 0.2}), ("bce", {})]
)
def test_gradient_wrt_soft_targets_matches_builtin(kind, options, from_logits, graph):
    # Distillation-style soft targets may themselves need gradients.
    y, p = make_case(kind, from_logits, seed=5)
    ours = plugin(kind, from_logits=from_logits, reduction=None, **options)
    theirs = builtin(kind, from_logits=from_logits, reduction=None, **options)
    v1, g1 = vjp(lambda t: ours(t, p), y, graph=graph)
    v2, g2 = vjp(lambda t: theirs(t, p), y, graph=graph)
    assert_close(v1, v2)
    assert_close(g1, g2)


@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize(
    "fn,kind", [(categorical_ce, "cce"), (sparse_categorical_ce, "scce"), (binary_ce, "bce")]
)
def test_functions_match_builtin_functions(fn, kind, from_logits):
    y, p = make_case(kind, from_logits, seed=11)
    keras_fn = {
        "cce": keras.losses.categorical_crossentropy,
        "scce": keras.losses.sparse_categorical_crossentropy,
        "bce": keras.losses.binary_crossentropy,
    }[kind]
    ours = fn(y, p, from_logits=from_logits)
    assert tuple(ours.shape) == (B,)  # per sample, never reduced over the batch
    assert_close(ours, keras_fn(y, p, from_logits=from_logits))


# --------------------------------------------------------------------------- #
# float64: the functions against the reference and its finite differences
# --------------------------------------------------------------------------- #
def _fd_grad(f, x, rel_step=1e-5):
    """Central differences with a step relative to each entry."""
    x = _f64(x)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = rel_step * max(abs(x[i]), 1e-3)
        g[i] = (f(x + e) - f(x - e)) / (2 * e[i])
    return g


FD_CASES = [
    ("cce", {}, -1),
    ("cce", {"label_smoothing": 0.3, "class_weights": [1.0, 2.0, 0.5, 0.0, 3.0]}, -1),
    ("cce", {"label_smoothing": 0.3}, 1),
    ("scce", {"class_weights": [1.0, 2.0, 0.5, 0.0, 3.0]}, -1),
    ("scce", {}, 1),
    ("bce", {"label_smoothing": 0.1}, -1),
    ("bce", {}, 1),
]


@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("kind,options,axis", FD_CASES, ids=str)
def test_float64_against_reference_and_finite_differences(kind, options, axis, from_logits):
    if BACKEND == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("JAX computes float64 input in float32 unless jax_enable_x64 is set")
    shape = (3, C, 2) if axis == 1 else (3, 2, C)
    y, p = make_case(kind, from_logits, shape=shape, axis=axis, seed=21)
    p = p.astype("float64")
    fn = {"cce": categorical_ce, "scce": sparse_categorical_ce, "bce": binary_ce}[kind]
    reference = {"cce": ref_cce, "scce": lambda *a, **k: ref_scce(*a, **k)[0], "bce": ref_bce}[kind]
    kw = dict(options, from_logits=from_logits, axis=axis)
    value, grad = vjp(lambda x: fn(y, x, **kw), p)
    np.testing.assert_allclose(value, reference(y, p, **kw), rtol=1e-12)
    cot = _cotangent(value.shape)
    expected = _fd_grad(lambda x: float((reference(y, x, **kw) * cot).sum()), p)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- #
# Golden numbers (computed by hand)
# --------------------------------------------------------------------------- #
def test_golden_categorical():
    y = np.array([[0, 1, 0], [0, 0, 1]], "float32")
    p = np.array([[0.05, 0.95, 0.0], [0.1, 0.8, 0.1]], "float32")
    np.testing.assert_allclose(categorical_ce(y, p), [-math.log(0.95), -math.log(0.1)], rtol=1e-6)
    mean = (-math.log(0.95) - math.log(0.1)) / 2
    assert float(CategoricalCE()(y, p)) == pytest.approx(mean, rel=1e-6)
    assert float(CategoricalCE(reduction="sum")(y, p)) == pytest.approx(2 * mean, rel=1e-6)


def test_golden_label_smoothing_and_class_weights():
    y = np.array([[0, 1, 0]], "float32")
    p = np.array([[0.2, 0.7, 0.1]], "float32")
    # s = 0.3, C = 3 -> targets [0.1, 0.8, 0.1]; weights [1, 2, 3].
    expected = -(0.1 * math.log(0.2) + 2 * 0.8 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    got = categorical_ce(y, p, label_smoothing=0.3, class_weights=[1, 2, 3])
    assert float(got[0]) == pytest.approx(expected, rel=1e-6)


def test_golden_sparse_class_weights_and_ignore():
    p = np.array([[0.25, 0.75], [0.6, 0.4], [0.5, 0.5]], "float32")
    labels = np.array([1, 0, -1])
    got = sparse_categorical_ce(labels, p, class_weights=[2.0, 3.0], ignore_class=-1)
    np.testing.assert_allclose(got, [-3 * math.log(0.75), -2 * math.log(0.6), 0.0], rtol=1e-6)
    # The class leaves the ignored sample out of the mean.
    loss = SparseCategoricalCE(class_weights=[2.0, 3.0], ignore_class=-1)(labels, p)
    expected = (-3 * math.log(0.75) - 2 * math.log(0.6)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_golden_binary():
    y = np.array([[1.0, 0.0]], "float32")
    p = np.array([[0.9, 0.2]], "float32")
    assert float(binary_ce(y, p)[0]) == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2, 1e-6)
    # Smoothing 0.2 -> targets [0.9, 0.1].
    t = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1) + 0.1 * math.log(0.2) + 0.9 * math.log(0.8))
    assert float(binary_ce(y, p, label_smoothing=0.2)[0]) == pytest.approx(t / 2, rel=1e-6)


def test_golden_logit_gap_of_200():
    logits = np.array([[200.0, 0.0, -200.0]], "float32")
    assert float(categorical_ce(np.array([[0.0, 0.0, 1.0]]), logits, from_logits=True)[0]) == 400.0
    assert float(sparse_categorical_ce(np.array([2]), logits, from_logits=True)[0]) == 400.0
    bce = binary_ce(np.array([[0.0]]), np.array([[200.0]], "float32"), from_logits=True)
    assert float(bce[0]) == 200.0


def test_zero_probability_is_finite_with_finite_gradient():
    y = np.array([[1.0, 0.0, 0.0]], "float32")
    p = np.array([[0.0, 0.3, 0.7]], "float32")
    value, grad = vjp(lambda x: CategoricalCE()(y, x), p)
    assert value == pytest.approx(-math.log(EPS), rel=1e-5)
    assert np.all(np.isfinite(grad))
    value, grad = vjp(lambda x: SparseCategoricalCE()(np.array([0]), x), p)
    assert value == pytest.approx(-math.log(EPS), rel=1e-5)
    assert np.all(np.isfinite(grad))
    value, grad = vjp(lambda x: BinaryCE()(np.ones((1, 3), "float32"), x), p)
    assert value == pytest.approx(ref_bce(np.ones((1, 3)), p)[0], rel=1e-5)
    assert np.all(np.isfinite(grad))


# --------------------------------------------------------------------------- #
# Where Keras 3.15 is wrong: follow the reference
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
def test_label_smoothing_on_non_last_axis_uses_class_count_along_axis(from_logits):
    # keras-team/keras#23451: Keras divides by shape[-1] (here 2), not by C = 5.
    y, p = make_case("cce", from_logits, shape=(3, C, 2), axis=1, seed=4)
    ours = CategoricalCE(from_logits=from_logits, label_smoothing=0.2, axis=1, reduction=None)
    value, grad = vjp(lambda x: ours(y, x), p)
    assert_close(value, ref_cce(y, p, from_logits=from_logits, label_smoothing=0.2, axis=1))
    # Moving the class axis last, where Keras is right, gives the same values and gradients.
    last = keras.losses.CategoricalCrossentropy(
        from_logits=from_logits, label_smoothing=0.2, reduction=None
    )
    v2, g2 = vjp(lambda x: last(np.moveaxis(y, 1, -1), x), np.moveaxis(p, 1, -1))
    assert_close(value, v2)
    assert_close(grad, np.moveaxis(g2, -1, 1))


@pytest.mark.parametrize("kind", ["cce", "scce"])
def test_all_zero_prediction_row_is_finite(kind):
    # keras-team/keras#23552: Keras renormalises 0 / 0 = NaN.
    p = np.array([[0.0, 0.0, 0.0], [0.2, 0.3, 0.5]], "float32")
    if kind == "cce":
        y = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "float32")
        loss, expected = CategoricalCE(reduction=None), ref_cce(y, p)
    else:
        y = np.array([1, 2])
        loss, expected = SparseCategoricalCE(reduction=None), ref_scce(y, p)[0]
    for graph in (False, True):
        if graph and BACKEND not in ("tensorflow", "jax"):
            continue
        value, grad = vjp(lambda x: loss(y, x), p, graph=graph)
        assert_close(value, expected)
        assert value[0] == pytest.approx(-math.log(EPS), rel=1e-6)
        assert np.all(np.isfinite(grad)), grad


def test_all_zero_row_with_soft_targets_and_smoothing():
    y = np.array([[0.3, 0.7, 0.0]], "float32")
    p = np.zeros((1, 3), "float32")
    value, grad = vjp(lambda x: CategoricalCE(label_smoothing=0.1)(y, x), p)
    assert_close(value, ref_cce(y, p, label_smoothing=0.1)[0])
    assert np.all(np.isfinite(grad))


# --------------------------------------------------------------------------- #
# Class weights
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
def test_class_weights_match_reference(from_logits):
    w = [0.5, 1.0, 2.0, 0.0, 4.0]
    y, p = make_case("cce", from_logits, seed=8)
    assert_close(
        categorical_ce(y, p, from_logits=from_logits, class_weights=w),
        ref_cce(y, p, from_logits=from_logits, class_weights=w),
    )
    labels = np.argmax(y, axis=-1)
    assert_close(
        sparse_categorical_ce(labels, p, from_logits=from_logits, class_weights=w),
        ref_scce(labels, p, from_logits=from_logits, class_weights=w)[0],
    )


def test_class_weights_equal_fit_class_weight_for_one_hot_targets():
    # fit(class_weight=...) becomes sample_weight = w[true class]; same numbers here.
    w = np.array([0.5, 1.0, 2.0, 0.25, 4.0], "float32")
    y, p = make_case("cce", False, seed=9)
    y = np.eye(C, dtype="float32")[np.argmax(y, -1)]
    ours = CategoricalCE(class_weights=w)(y, p)
    theirs = keras.losses.CategoricalCrossentropy()(y, p, sample_weight=w[np.argmax(y, -1)])
    assert_close(ours, theirs)


def test_pytorch_weighted_mean_recipe():
    # PyTorch CrossEntropyLoss(weight=w) with mean reduction = sum(w_y l) / sum(w_y):
    # here sample_weight=w[labels] with reduction="mean_with_sample_weight".
    w = np.array([0.5, 1.0, 2.0, 0.25, 4.0], "float32")
    labels, logits = make_case("scce", True, seed=10)
    nll = -_log_softmax(_f64(logits))[np.arange(B), labels]
    torch_style = (w[labels] * nll).sum() / w[labels].sum()
    loss = SparseCategoricalCE(from_logits=True, reduction="mean_with_sample_weight")
    assert float(loss(labels, logits, sample_weight=w[labels])) == pytest.approx(torch_style, 1e-5)


# --------------------------------------------------------------------------- #
# axis: channels-first and segmentation maps
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", None])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("kind", ["cce", "scce", "bce"])
def test_channels_first_segmentation_map(kind, from_logits, reduction):
    shape = (2, C, 3, 4)  # (batch, classes, height, width)
    y, p = make_case(kind, from_logits, shape=shape, axis=1, seed=12)
    sw = np.random.default_rng(2).uniform(0.5, 1.5, size=(2, 3, 4)).astype("float32")
    ours = plugin(kind, from_logits=from_logits, axis=1, reduction=reduction)
    v1, g1 = vjp(lambda x: ours(y, x, sample_weight=sw), p)
    # The built-in on channels-last data (its sparse loss only supports axis=-1).
    y_last = y if kind == "scce" else np.moveaxis(y, 1, -1)
    theirs = builtin(kind, from_logits=from_logits, reduction=reduction)
    v2, g2 = vjp(lambda x: theirs(y_last, x, sample_weight=sw), np.moveaxis(p, 1, -1))
    # (BinaryCrossentropy averages over its last axis: on channels-last data that is
    # the same labels BinaryCE(axis=1) averages over, so the built-in applies too.)
    assert_close(v1, v2)
    assert_close(g1, np.moveaxis(g2, -1, 1))
    if kind == "bce":
        # An independent float64 expectation, written out along axis 1 (not through
        # ref_bce's axis handling): mean over the classes of the per-label loss.
        y64, p64 = y.astype(np.float64), p.astype(np.float64)
        if from_logits:
            per_label = np.logaddexp(0.0, p64) - p64 * y64  # softplus(x) - x y
        else:  # make_case keeps p in [0.02, 0.98]: no clipping
            per_label = -(y64 * np.log(p64) + (1.0 - y64) * np.log(1.0 - p64))
        expected = per_label.sum(axis=1) / shape[1]
        assert expected.shape == (2, 3, 4)
        assert_close(binary_ce(y, p, from_logits=from_logits, axis=1), expected)
        assert_close(v1, ref_reduce(expected, sw, reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["cce", "scce"])
def test_channels_last_rank4_parity(kind, reduction):
    y, p = make_case(kind, True, shape=(2, 3, 4, C), seed=13)
    sw = np.random.default_rng(2).uniform(0.5, 1.5, size=(2, 3, 4)).astype("float32")
    options = {"ignore_class": 1} if kind == "scce" else {"label_smoothing": 0.1}
    ours = plugin(kind, from_logits=True, reduction=reduction, **options)
    theirs = builtin(kind, from_logits=True, reduction=reduction, **options)
    v1, g1 = vjp(lambda x: ours(y, x, sample_weight=sw), p)
    v2, g2 = vjp(lambda x: theirs(y, x, sample_weight=sw), p)
    assert_close(v1, v2)
    assert_close(g1, g2)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean_with_sample_weight", "sum"])
def test_ignore_class_combined_with_keras_mask_like_builtin(reduction):
    # A padded sequence (mask_zero=True) whose labels also hold "void" entries.
    rng = np.random.default_rng(18)
    inputs = keras.Input((6,), dtype="int32")
    hidden = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    outputs = keras.layers.Dense(C, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    x = rng.integers(1, 10, size=(4, 6))
    x[:, 4:] = 0
    x[0, 3:] = 0
    labels = rng.integers(0, C, size=(4, 6))
    labels[[0, 1, 2], [1, 2, 5]] = -1
    sw = rng.uniform(0.5, 1.5, size=(4, 6)).astype("float32")
    results = []
    for loss in (
        SparseCategoricalCE(ignore_class=-1, reduction=reduction),
        keras.losses.SparseCategoricalCrossentropy(ignore_class=-1, reduction=reduction),
    ):
        out = model(x)
        assert getattr(out, "_keras_mask", None) is not None  # the case under test
        eager = loss(labels, out, sample_weight=sw)
        model.compile(loss=loss)
        results.append((eager, model.evaluate(x, labels, sample_weight=sw, verbose=0)))
    assert_close(results[0][0], results[1][0])
    if BACKEND != "tensorflow":
        # Compiled JAX keeps the masks of traced arrays in a Keras-internal
        # registry that a loss cannot read through public APIs (known limitation).
        return
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


def test_sparse_accepts_size_one_class_axis_labels():
    labels, p = make_case("scce", False, shape=(2, C, 3), axis=1, seed=14)
    a = sparse_categorical_ce(labels[:, None, :], p, axis=1)
    assert_close(a, sparse_categorical_ce(labels, p, axis=1))
    assert_close(a, ref_scce(labels, p, axis=1)[0])


# --------------------------------------------------------------------------- #
# A Keras softmax/sigmoid output: use the logits behind it (TensorFlow backend)
# --------------------------------------------------------------------------- #
def _identity_model(n: int, activation: str):
    inputs = keras.Input((n,))
    outputs = keras.layers.Dense(
        n, activation=activation, use_bias=False, kernel_initializer="identity"
    )(inputs)
    return keras.Model(inputs, outputs)


@tf_only
@pytest.mark.parametrize(
    "loss_cls,y,activation,expected",
    [
        (CategoricalCE, np.array([[0.0, 0.0, 1.0]], "float32"), "softmax", 400.0),
        (SparseCategoricalCE, np.array([2]), "softmax", 400.0),
        (BinaryCE, np.array([[0.0, 1.0, 1.0]], "float32"), "sigmoid", (400 + math.log(2)) / 3),
    ],
    ids=["CategoricalCE", "SparseCategoricalCE", "BinaryCE"],
)
def test_keras_activation_output_is_exact_eager_and_in_fit(loss_cls, y, activation, expected):
    x = np.array([[200.0, 0.0, -200.0]], "float32")
    model = _identity_model(3, activation)
    assert float(loss_cls()(y, model(x))) == pytest.approx(expected, rel=1e-6)  # eager
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=loss_cls())
    assert model.evaluate(x, y, verbose=0) == pytest.approx(expected, rel=1e-6)  # graph
    history = model.fit(x, y, epochs=2, verbose=0)
    assert history.history["loss"] == pytest.approx([expected] * 2, rel=1e-6)


@tf_only
def test_keras_softmax_output_matches_builtin_in_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 30, size=(32, 4)).astype("float32")  # saturated softmax
    y = np.eye(4, dtype="float32")[rng.integers(0, 4, 32)]
    results = []
    for loss in (CategoricalCE(), keras.losses.CategoricalCrossentropy()):
        keras.utils.set_random_seed(1)
        model = _identity_model(4, "softmax")
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=loss)
        results.append(model.evaluate(x, y, verbose=0, batch_size=8))
    assert results[0] == pytest.approx(results[1], rel=1e-5)
    assert results[0] > 17  # beyond the clipped maximum -log(1e-7) = 16.1 per sample


@tf_only
def test_from_logits_true_on_softmax_output_warns_and_uses_logits():
    model = _identity_model(3, "softmax")
    out = model(np.array([[200.0, 0.0, -200.0]], "float32"))
    with pytest.warns(UserWarning, match="from_logits=True"):
        value = categorical_ce(np.array([[0.0, 0.0, 1.0]]), out, from_logits=True)
    assert float(value[0]) == 400.0


# --------------------------------------------------------------------------- #
# Mixed precision
# --------------------------------------------------------------------------- #
@pytest.fixture
def restore_policy():
    old = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(old)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("kind", ["cce", "scce", "bce"])
def test_mixed_precision(kind, policy, restore_policy):
    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 8)).astype("float32")
    labels = (x[:, :4] @ rng.normal(size=(4, 4))).argmax(-1)
    y = {
        "cce": np.eye(4, dtype="float32")[labels],
        "scce": labels,
        "bce": (x[:, :4] > 0).astype("float32"),
    }[kind]
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    logits = keras.layers.Dense(4)(h)
    outputs = keras.layers.Activation("sigmoid" if kind == "bce" else "softmax")(logits)
    model = keras.Model(inputs, outputs)
    loss = plugin(kind)
    assert loss.dtype == "float32"

    # The loss on the half-precision output is computed in float32 ...
    logits_model = keras.Model(inputs, logits)
    out, z = model(x[:16]), logits_model(x[:16])
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    value = loss(y[:16], out)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    # ... and equals float32 arithmetic on the same values (TensorFlow uses the
    # logits behind the softmax, like the built-in; elsewhere the probabilities).
    if BACKEND == "tensorflow":
        expected = plugin(kind, from_logits=True)(
            y[:16], ops.convert_to_numpy(ops.cast(z, "float32"))
        )
    else:
        expected = plugin(kind)(y[:16], ops.convert_to_numpy(ops.cast(out, "float32")))
    assert np.isfinite(float(value))
    assert float(value) == pytest.approx(float(expected), rel=1e-3)

    # A tiny model trains: finite, decreasing losses.
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=loss)
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@tf_only
def test_mixed_float16_softmax_output_keeps_exact_logit_path(restore_policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = _identity_model(3, "softmax")
    out = model(np.array([[200.0, 0.0, -200.0]], "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    assert float(CategoricalCE()(np.array([[0.0, 0.0, 1.0]]), out)) == 400.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["cce", "scce", "bce"])
def test_half_precision_inputs_computed_in_float32(kind, dtype):
    y, p = make_case(kind, False, seed=15)
    fn = {"cce": categorical_ce, "scce": sparse_categorical_ce, "bce": binary_ce}[kind]
    half = ops.cast(p, dtype)
    out = fn(y, half)
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    exact = fn(y, ops.convert_to_numpy(ops.cast(half, "float32")))
    # Only the final rounding to `dtype` differs from float32 arithmetic.
    assert_close(ops.cast(out, "float32"), exact, rtol=1e-2 if dtype == "bfloat16" else 1e-3)


# --------------------------------------------------------------------------- #
# Non-finite input propagates; empty batches behave like the built-ins
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("where", ["y_pred", "y_true"])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("kind", ["cce", "scce", "bce"])
def test_non_finite_input_propagates(kind, from_logits, where, bad):
    y, p = make_case(kind, from_logits, seed=16)
    y = y.astype("float32").copy()
    p = p.copy()
    if where == "y_pred":
        p[1, 2] = bad
    else:
        y[1] = bad if kind == "scce" else y[1]
        if kind != "scce":
            y[1, 2] = bad
    per_sample = ops.convert_to_numpy(plugin(kind, from_logits=from_logits, reduction=None)(y, p))
    if kind == "scce" and from_logits and where == "y_pred" and bad == -float("inf"):
        # A -inf logit is probability 0 for a class that is not the target: exact.
        assert np.all(np.isfinite(per_sample))
        return
    assert not np.isfinite(per_sample[1]), per_sample
    assert np.all(np.isfinite(np.delete(per_sample, 1)))
    assert not np.isfinite(float(plugin(kind, from_logits=from_logits)(y, p)))


@pytest.mark.parametrize("label", [5, -1, 99])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
def test_sparse_out_of_range_label_is_nan_not_wrapped(label, from_logits):
    y, p = make_case("scce", from_logits, seed=17)
    y[3] = label
    per_sample = ops.convert_to_numpy(sparse_categorical_ce(y, p, from_logits=from_logits))
    assert np.isnan(per_sample[3])
    assert np.all(np.isfinite(np.delete(per_sample, 3)))


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "kind,options",
    [("cce", {}), ("scce", {}), ("scce", {"ignore_class": -1}), ("bce", {})],
    ids=_ids,
)
def test_empty_batch_like_builtin(kind, options, reduction, weighted):
    y, p = make_case(kind, False)
    y, p = y[:0], p[:0]
    sw = np.zeros((0,), "float32") if weighted else None
    ours = plugin(kind, reduction=reduction, **options)(y, p, sample_weight=sw)
    theirs = builtin(kind, reduction=reduction, **options)(y, p, sample_weight=sw)
    assert tuple(ours.shape) == tuple(theirs.shape)
    assert_close(ours, theirs)
    assert np.all(np.isfinite(ops.convert_to_numpy(ours)))


# --------------------------------------------------------------------------- #
# Bad input: clear errors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["cce", "bce"])
def test_mismatched_shapes_name_both(kind):
    loss = plugin(kind)
    with pytest.raises(ValueError) as err:
        loss(np.zeros((4, 3), "float32"), np.full((4, 5), 0.2, "float32"))
    assert "(4, 3)" in str(err.value) and "(4, 5)" in str(err.value)


def test_sparse_mismatched_shapes_name_both():
    with pytest.raises(ValueError) as err:
        SparseCategoricalCE()(np.zeros((3,)), np.full((4, 5), 0.2, "float32"))
    assert "(3,)" in str(err.value) and "(4, 5)" in str(err.value)


@pytest.mark.parametrize("fn", [categorical_ce, sparse_categorical_ce, binary_ce])
def test_rank0_input(fn):
    with pytest.raises(ValueError, match="at least rank 1"):
        fn(np.float32(1.0), np.float32(0.5))


@pytest.mark.parametrize("labels", [np.array([0, 2, 1]), np.array([[0], [2], [1]])])
def test_integer_labels_to_categorical_suggest_sparse(labels):
    p = np.full((3, 4), 0.25, "float32")
    with pytest.raises(ValueError, match="SparseCategoricalCE"):
        CategoricalCE()(labels, p)
    with pytest.raises(ValueError, match="SparseCategoricalCE"):
        categorical_ce(labels, p)


@pytest.mark.parametrize("cls", [CategoricalCE, BinaryCE])
@pytest.mark.parametrize("value", [1.5, -0.1])
def test_label_smoothing_out_of_range(cls, value):
    with pytest.raises(ValueError) as err:
        cls(label_smoothing=value)
    assert str(err.value) == (
        f"`label_smoothing` must be in [0, 1]. Received: label_smoothing={value}"
    )


def test_label_smoothing_exact_message_in_function():
    with pytest.raises(ValueError) as err:
        categorical_ce(np.eye(3), np.eye(3), label_smoothing=1.5)
    assert str(err.value) == "`label_smoothing` must be in [0, 1]. Received: label_smoothing=1.5"


@pytest.mark.parametrize("cls", [CategoricalCE, SparseCategoricalCE])
def test_negative_class_weights(cls):
    with pytest.raises(ValueError, match="non-negative"):
        cls(class_weights=[1.0, -0.5, 2.0])


@pytest.mark.parametrize("weights", [[1.0, float("nan")], "abc", [[1.0, 2.0]], []])
def test_invalid_class_weights(weights):
    with pytest.raises((TypeError, ValueError), match="class_weights"):
        CategoricalCE(class_weights=weights)


@pytest.mark.parametrize("kind", ["cce", "scce"])
def test_wrong_length_class_weights(kind):
    y, p = make_case(kind, False)
    with pytest.raises(ValueError, match="one entry per class") as err:
        plugin(kind, class_weights=[1.0, 2.0])(y, p)
    assert "5 classes" in str(err.value)


@pytest.mark.parametrize("cls", [CategoricalCE, SparseCategoricalCE, BinaryCE])
def test_bool_axis(cls):
    with pytest.raises(TypeError, match="`axis` must be an integer. Received: axis=True"):
        cls(axis=True)


@pytest.mark.parametrize("fn", [categorical_ce, sparse_categorical_ce, binary_ce])
def test_bool_axis_and_out_of_range_axis_in_functions(fn):
    y, p = make_case("bce", False)
    with pytest.raises(TypeError, match="axis"):
        fn(y, p, axis=False)
    with pytest.raises(ValueError, match="out of range"):
        fn(y, p, axis=3)


@pytest.mark.parametrize("cls", [CategoricalCE, SparseCategoricalCE, BinaryCE])
def test_unknown_reduction(cls):
    with pytest.raises(ValueError, match="reduction") as err:
        cls(reduction="average")
    assert "average" in str(err.value)


@pytest.mark.parametrize("cls", [CategoricalCE, SparseCategoricalCE, BinaryCE])
def test_from_logits_must_be_bool(cls):
    with pytest.raises(TypeError, match="from_logits"):
        cls(from_logits="yes")


def test_ignore_class_must_be_int():
    with pytest.raises(TypeError, match="ignore_class"):
        SparseCategoricalCE(ignore_class=1.5)


def test_no_warning_for_plain_inputs():
    y, p = make_case("cce", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CategoricalCE()(y, p)


# --------------------------------------------------------------------------- #
# A single class along the class axis (like Keras' categorical_crossentropy)
# --------------------------------------------------------------------------- #
SINGLE_CLASS = "num_classes > 1"
# Keras' own words for a single-class y_pred (keras/src/losses/losses.py), where its
# built-in categorical_crossentropy warns with a SyntaxWarning.
KERAS_WORDS = r"In loss \w+, expected y_pred\.shape to be \(batch_size, num_classes\)"


def _single_class_case(shape=(4, 1)):
    rng = np.random.default_rng(21)
    return np.ones(shape, "float32"), rng.uniform(0.1, 0.9, size=shape).astype("float32")


@pytest.mark.parametrize("from_logits", [False, True], ids=["probs", "logits"])
def test_single_class_warns_eagerly_and_points_at_the_caller(from_logits):
    y, p = _single_class_case()
    with pytest.warns(SyntaxWarning, match=KERAS_WORDS) as record:
        CategoricalCE(from_logits=from_logits)(y, p)
    assert "BinaryCE" in str(record[0].message)
    assert record[0].filename == __file__  # the user's line, not Keras'
    with pytest.warns(SyntaxWarning, match=KERAS_WORDS):
        categorical_ce(y, p, from_logits=from_logits)


def test_single_class_along_a_non_last_axis_warns():
    y, p = _single_class_case((2, 1, 3))
    with pytest.warns(SyntaxWarning, match=r"Received: y_pred.shape=\(2, 1, 3\) \(class axis=1\)"):
        CategoricalCE(axis=1)(y, p)


def test_single_class_warns_once_per_call_site_in_an_eager_loop():
    y, p = _single_class_case()
    loss = CategoricalCE()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's default action: once per location
        for _ in range(5):
            loss(y, p)
    assert sum(SINGLE_CLASS in str(w.message) for w in record) == 1


@tf_only
def test_single_class_warns_at_trace_time_in_tf_function():
    import tensorflow as tf

    y, p = _single_class_case()
    loss = CategoricalCE()
    step = tf.function(lambda a, b: loss(a, b))
    with pytest.warns(SyntaxWarning, match=SINGLE_CLASS) as record:
        step(tf.constant(y), tf.constant(p))
    # It points at the traced user function (autograph's copy), not at TF/Keras.
    site_packages = os.path.dirname(os.path.dirname(keras.__file__))
    assert not record[0].filename.startswith(site_packages), record[0].filename
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(tf.constant(y), tf.constant(p))  # Same signature: no retrace, no warning.


@pytest.mark.parametrize(
    "user_filter",
    [
        {"category": SyntaxWarning},
        {"message": KERAS_WORDS},
        {"message": r".*expected y_pred\.shape to be \(batch_size, num_classes\)"},
        {"message": r".*num_classes > 1", "category": SyntaxWarning},
    ],
    ids=["category", "keras_words", "keras_words_anywhere", "both"],
)
def test_a_filter_written_for_keras_builtin_applies(user_filter):
    """A user's ``warnings.filterwarnings`` that silences Keras' built-in
    single-class warning (the control: checked on Keras itself) silences ours."""
    y, p = _single_class_case()
    for loss in (keras.losses.CategoricalCrossentropy(), CategoricalCE()):
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            loss(y, p)
        assert [w.category for w in shown] == [SyntaxWarning], loss  # it warns, unfiltered
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", **user_filter)
            loss(y, p)
        assert shown == [], (loss, [str(w.message) for w in shown])


@pytest.mark.parametrize("shape, axis", [((4, 2), -1), ((2, 3, 1), 1), ((2, 1, 3), -1)])
def test_two_or_more_classes_do_not_warn(shape, axis):
    y, p = _single_class_case(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CategoricalCE(axis=axis)(y, p)
        categorical_ce(y, p, axis=axis)

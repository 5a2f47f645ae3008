"""Tests of ``keras_ce_plugin.large_vocab``: exactness, options, Keras integration.

Oracles: a float64 NumPy reference written here (independent of the code under
test) and Keras' built-ins on materialised logits. Backend-neutral: runs on
TensorFlow in-process and re-runs itself under ``KERAS_BACKEND=jax`` and
``KERAS_BACKEND=torch`` in subprocesses (``test_other_backend_subprocess``).
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import REPO, require_backend, rerun_from_tensorflow, run_python
from keras import ops

from keras_ce_plugin.large_vocab import (
    LinearCE,
    LinearCEModel,
    TokenAccuracy,
    fused_linear_ce_sum,
    linear_ce,
    linear_token_accuracy,
)

BACKEND = keras.backend.backend()
RTOL = 1e-5  # float32 values (loss, log-sum-exp) against the float64 reference
# float32 gradients: each comes out of a GEMM summing over the vocabulary (dh) or the
# tokens (dk), whose worst-case rounding bound, gamma_V * max(|g| |K|) / max|dh|, is
# 1.8e-5 to 2.3e-5 of max|dh| in test_large_vocab_torch's V = 300 problems. A CPU's
# BLAS may sum in any order within it: one CI machine's MKL gave 1.1e-5 where machine
# B's gives 4e-7. Dropping a term moves dh there by more: the cap 0.8, smoothing 0.1,
# ignore_class 0.3, even z_loss=1e-4 1.5e-4 (float64, tests/test_large_vocab_torch.py).
GRAD_RTOL = 5e-5


# --------------------------------------------------------------------------- #
# Reference and helpers
# --------------------------------------------------------------------------- #
def reference(h, k, y, b=None, *, transpose=False, ignore=None, eps=0.0, cap=None, w=None):
    """float64 per-token loss and gradients of sum(w * loss) w.r.t. h, k, b."""
    h64, k64 = h.astype(np.float64), k.astype(np.float64)
    kk = k64.T if transpose else k64
    z = h64 @ kk + (0.0 if b is None else b.astype(np.float64))
    t = np.tanh(z / cap) if cap else None
    s = cap * t if cap else z
    v = s.shape[1]
    keep = np.ones(len(y), bool) if ignore is None else y != ignore
    yy = np.where(keep, y, 0)
    m = s.max(1, keepdims=True)
    p = np.exp(s - m)
    lse = np.log(p.sum(1)) + m[:, 0]
    p /= p.sum(1, keepdims=True)
    target = np.eye(v)[yy] * (1 - eps) + eps / v
    loss = np.where(keep, lse - (target * s).sum(1), 0.0)
    w = np.ones(len(y)) if w is None else w.astype(np.float64)
    g = (p - target) * (w * keep)[:, None]
    if cap:
        g = g * (1 - t**2)
    dh = g @ kk.T
    dk = h64.T @ g
    return loss, dh, (dk.T if transpose else dk), g.sum(0)


def value_and_grads(fn, *args):
    """fn(*args) -> scalar; its value and gradients w.r.t. every arg (NumPy)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        xs = [tf.Variable(a) for a in args]
        with tf.GradientTape() as tape:
            val = fn(*xs)
        return np.asarray(val), [np.asarray(g) for g in tape.gradient(val, xs)]
    if BACKEND == "torch":
        import torch

        xs = [torch.as_tensor(a) for a in args]
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        val = fn(*xs)
        grads = torch.autograd.grad(val, xs)
        # Detached tensors: np.asarray reads float32 ones; bfloat16 has no NumPy twin.
        return np.asarray(val.detach()), [g.detach() for g in grads]
    import jax

    val, grads = jax.value_and_grad(lambda *a: fn(*a), argnums=tuple(range(len(args))))(*args)
    return np.asarray(val), [np.asarray(g) for g in grads]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def data(rng, n=37, d=16, v=203, transpose=False, ignore=None):
    h = rng.normal(size=(n, d)).astype("float32")
    k = (rng.normal(size=(v, d) if transpose else (d, v)) * 0.5).astype("float32")
    b = rng.normal(size=v).astype("float32")
    y = rng.integers(0, v, n).astype("int32")
    if ignore is not None:
        y[::5] = ignore
    return h, k, b, y


# --------------------------------------------------------------------------- #
# Exactness of linear_ce (recompute) and fused_linear_ce_sum (gradient in forward)
# --------------------------------------------------------------------------- #
# (token chunk, vocab chunk, transposed kernel, bias): chunks that do not divide N=37 /
# V=203, whole, dividing V=192 (N=32), and the defaults.
LAYOUTS = [
    (8, 50, False, True),
    (37, 203, True, False),
    (16, 64, True, True),
    (None, None, False, False),
]
OPTIONS = [
    {},
    {"ignore_class": -1},
    {"label_smoothing": 0.1},
    {"logit_soft_cap": 3.0},
    {"ignore_class": 7, "label_smoothing": 0.2, "logit_soft_cap": 2.0},
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_linear_ce_matches_reference_and_keras(rng, layout):
    tn, tv, transpose, with_bias = layout
    n, v = (32, 192) if tv == 64 else (37, 203)
    h, k, b, y = data(rng, n=n, v=v, transpose=transpose)
    b = b if with_bias else None
    w = rng.uniform(size=len(y)).astype("float32")
    kw = {"transpose_kernel": transpose, "token_chunk_size": tn, "vocab_chunk_size": tv}
    loss, dh, dk, db = reference(h, k, y, b, transpose=transpose, w=w)

    per_token = np.asarray(linear_ce(h, k, y, bias=b, **kw))
    assert rel_err(per_token, loss) <= RTOL

    def ours(hh, kk, *bb):
        return ops.sum(ops.multiply(linear_ce(hh, kk, y, bias=bb[0] if bb else None, **kw), w))

    def fused(hh, kk, *bb):
        return fused_linear_ce_sum(hh, kk, y, w, bias=bb[0] if bb else None, **kw)[0]

    def in_forward(hh, kk, *bb):
        bias = bb[0] if bb else None
        return fused_linear_ce_sum(hh, kk, y, w, bias=bias, strategy="in_forward", **kw)[0]

    def keras_builtin(hh, kk, *bb):
        logits = ops.matmul(hh, ops.transpose(kk) if transpose else kk)
        if bb:
            logits = logits + bb[0]
        sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
        return sce(y, logits, sample_weight=w)

    args = (h, k) + ((b,) if b is not None else ())
    expected = [dh, dk] + ([db] if b is not None else [])
    for fn in (ours, fused, in_forward, keras_builtin):
        val, grads = value_and_grads(fn, *args)
        assert rel_err(val, (loss * w).sum()) <= RTOL, fn.__name__
        for g, e in zip(grads, expected):
            assert rel_err(g, e) <= GRAD_RTOL, fn.__name__


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("strategy", [None, "recompute", "in_forward"], ids=str)
def test_options_match_reference(rng, options, strategy):
    ignore = options.get("ignore_class")
    h, k, b, y = data(rng, ignore=ignore)
    w = rng.uniform(size=len(y)).astype("float32")
    kw = {**options, "token_chunk_size": 8, "vocab_chunk_size": 50}
    loss, dh, dk, db = reference(
        h,
        k,
        y,
        b,
        ignore=ignore,
        eps=options.get("label_smoothing", 0.0),
        cap=options.get("logit_soft_cap"),
        w=w,
    )
    if strategy is not None:  # the weighted sum behind LinearCE
        val, grads = value_and_grads(
            lambda hh, kk, bb: fused_linear_ce_sum(hh, kk, y, w, bias=bb, strategy=strategy, **kw)[
                0
            ],
            h,
            k,
            b,
        )
    else:
        per_token = np.asarray(linear_ce(h, k, y, bias=b, **kw))
        assert rel_err(per_token, loss) <= RTOL
        if ignore is not None:
            assert np.all(per_token[y == ignore] == 0.0)
        val, grads = value_and_grads(
            lambda hh, kk, bb: ops.sum(ops.multiply(linear_ce(hh, kk, y, bias=bb, **kw), w)),
            h,
            k,
            b,
        )
    assert rel_err(val, (loss * w).sum()) <= RTOL
    for g, e in zip(grads, (dh, dk, db)):
        assert rel_err(g, e) <= GRAD_RTOL


TIED_OPTIONS = [
    {"ignore_class": -1},
    {"label_smoothing": 0.1},
    {"logit_soft_cap": 3.0},
    {"ignore_class": 7, "label_smoothing": 0.2, "logit_soft_cap": 2.0},
]


@pytest.mark.parametrize("opts", TIED_OPTIONS, ids=lambda o: "-".join(o))
@pytest.mark.parametrize("strategy", [None, "recompute", "in_forward"], ids=str)
def test_tied_kernel_with_ignore_smoothing_cap_matches_reference(rng, opts, strategy):
    """Each fused option, and all three at once, with the transposed (tied) ``(V, D)``
    kernel: per-token loss, weighted sum and gradients vs float64 NumPy."""
    ignore = opts.get("ignore_class")
    h, k, b, y = data(rng, n=19, d=8, v=41, transpose=True, ignore=ignore)
    w = rng.uniform(size=len(y)).astype("float32")
    kw = {**opts, "transpose_kernel": True, "token_chunk_size": 5, "vocab_chunk_size": 12}
    eps, cap = opts.get("label_smoothing", 0.0), opts.get("logit_soft_cap")
    loss, dh, dk, db = reference(h, k, y, b, transpose=True, ignore=ignore, eps=eps, cap=cap, w=w)
    if strategy is None:
        per_token = np.asarray(linear_ce(h, k, y, bias=b, **kw))
        assert rel_err(per_token, loss) <= RTOL

        def fn(hh, kk, bb):
            return ops.sum(ops.multiply(linear_ce(hh, kk, y, bias=bb, **kw), w))
    else:

        def fn(hh, kk, bb):
            return fused_linear_ce_sum(hh, kk, y, w, bias=bb, strategy=strategy, **kw)[0]

    val, grads = value_and_grads(fn, h, k, b)
    assert rel_err(val, (loss * w).sum()) <= RTOL
    for g, e in zip(grads, (dh, dk, db)):
        assert g.shape == e.shape and rel_err(g, e) <= GRAD_RTOL


@pytest.mark.parametrize("transpose", [False, True], ids=["kernel", "tied"])
def test_3d_hidden_values_and_gradients_match_reference(rng, transpose):
    """``hidden`` of shape (batch, tokens, d): per-token loss (batch, tokens) and the
    gradients (hidden's shape) equal the reference on the flattened tokens."""
    h, k, b, y = data(rng, n=24, d=8, v=41, transpose=transpose, ignore=-1)
    w = rng.uniform(size=len(y)).astype("float32")
    loss, dh, dk, db = reference(h, k, y, b, transpose=transpose, ignore=-1, cap=4.0, w=w)
    h3, y3, w3 = h.reshape(4, 6, 8), y.reshape(4, 6), w.reshape(4, 6)
    kw = {"transpose_kernel": transpose, "ignore_class": -1, "logit_soft_cap": 4.0}
    kw.update(token_chunk_size=5, vocab_chunk_size=12)
    per_token = np.asarray(linear_ce(h3, k, y3, bias=b, **kw))
    assert per_token.shape == (4, 6) and rel_err(per_token, loss.reshape(4, 6)) <= RTOL
    for fn in (
        lambda hh, kk, bb: ops.sum(ops.multiply(linear_ce(hh, kk, y3, bias=bb, **kw), w3)),
        lambda hh, kk, bb: fused_linear_ce_sum(hh, kk, y3, w3, bias=bb, **kw)[0],
    ):
        val, (gh, gk, gb) = value_and_grads(fn, h3, k, b)
        assert rel_err(val, (loss * w).sum()) <= RTOL
        assert gh.shape == (4, 6, 8) and rel_err(gh, dh.reshape(4, 6, 8)) <= GRAD_RTOL
        assert rel_err(gk, dk) <= GRAD_RTOL and rel_err(gb, db) <= GRAD_RTOL


def _to64(x):
    """Any backend tensor (bfloat16 included, which torch cannot hand to NumPy) as float64."""
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), np.float64)


def _finfo(dtype):
    """``finfo`` of a half dtype (bfloat16 from ml_dtypes, which Keras' backends install)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(ml_dtypes.bfloat16)
    return np.finfo(dtype)


def _check_half_grads(hh, kk, y, w, kw, expected, tol):
    """Gradients w.r.t. half-precision ``hh``, ``kk`` from each strategy: in their dtype
    and within ``tol`` (relative to the largest element) of ``expected``."""
    dtype = keras.backend.standardize_dtype(hh.dtype)
    for fn in (
        lambda a, c: ops.sum(ops.multiply(linear_ce(a, c, y, **kw), w)),
        lambda a, c: fused_linear_ce_sum(a, c, y, w, **kw)[0],
        lambda a, c: fused_linear_ce_sum(a, c, y, w, strategy="in_forward", **kw)[0],
    ):
        _, grads = value_and_grads(fn, hh, kk)
        assert [keras.backend.standardize_dtype(g.dtype) for g in grads] == [dtype] * 2
        assert all(rel_err(_to64(g), e) <= tol for g, e in zip(grads, expected))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_gradient_values_match_reference(rng, dtype):
    """Gradients of half-precision inputs vs the float64 reference on the same rounded
    inputs. The plugin accumulates in float32 and rounds each gradient once to
    ``dtype``: that rounding is at most half the dtype's machine epsilon relative to
    the element (so to the largest element). A tolerance of one eps leaves room for
    the float32 accumulation, and a wrong gradient (a missing term, a scale error of
    a few percent) exceeds it."""
    tol = float(_finfo(dtype).eps)
    h, k, b, y = data(rng, n=19, d=8, v=41)
    w = rng.uniform(size=len(y)).astype("float32")
    hh, kk = ops.cast(h, dtype), ops.cast(k, dtype)
    _, dh, dk, _ = reference(_to64(hh), _to64(kk), y, b, cap=3.0, w=w)
    kw = {"bias": b, "logit_soft_cap": 3.0, "token_chunk_size": 5, "vocab_chunk_size": 12}
    _check_half_grads(hh, kk, y, w, kw, (dh, dk), tol)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_matmul_precision_input_runs_half_matmuls(rng, dtype):
    """``matmul_precision="input"``: the matmuls run in the half dtype with float32
    accumulation. On TensorFlow and torch the loss equals the float64 loss of the
    logits as the naive head computes them (``ops.matmul`` in the dtype, rounded) to
    1e-5 and differs from the exact products' (the half matmul really ran); XLA (JAX)
    may skip that rounding, so there it equals one of the two. Gradients, from every
    strategy and the frozen head's online pass, are within 2 eps of the exact ones:
    the kernel gradient's matmul rounds the logits' gradient (eps/2) and its product
    (eps/2), and each returned gradient is rounded once (eps/2); the hidden gradient's
    matmul is float32."""
    from keras_ce_plugin.large_vocab.ops import fused_linear_ce_parts

    tol = 2 * float(_finfo(dtype).eps)
    h, k, b, y = data(rng, n=19, d=8, v=41)
    w = rng.uniform(size=len(y)).astype("float32")
    hh, kk = ops.cast(h, dtype), ops.cast(k, dtype)
    naive_logits = _to64(ops.matmul(hh, kk))
    as_naive = reference(naive_logits, np.eye(41), y, b, cap=3.0)[0]
    loss, dh, dk, _ = reference(_to64(hh), _to64(kk), y, b, cap=3.0, w=w)
    kw = {"bias": b, "logit_soft_cap": 3.0, "token_chunk_size": 5, "vocab_chunk_size": 12}
    kw["matmul_precision"] = "input"
    out = linear_ce(hh, kk, y, **kw)
    if BACKEND == "jax":  # XLA may keep the float32 accumulator (excess precision)
        assert min(rel_err(out, as_naive), rel_err(out, loss)) <= RTOL
    else:
        assert rel_err(out, as_naive) <= RTOL
        assert rel_err(out, loss) > RTOL  # float32 matmuls: ~1e-7
    _check_half_grads(hh, kk, y, w, kw, (dh, dk), tol)
    frozen = lambda a: fused_linear_ce_parts(a, kk, y, w, kernel_grad=False, **kw)[0]  # noqa: E731
    _, (gh,) = value_and_grads(frozen, hh)
    assert rel_err(_to64(gh), dh) <= tol
    # Mixed precision: a float32 kernel (the variable) is cast block by block, as the
    # head casts it, and its gradient comes back in float32 (no half-precision copy).
    k_rounded = _to64(kk).astype("float32")  # exactly representable: the rounded kernel
    out = linear_ce(hh, k_rounded, y, **kw)
    assert rel_err(out, as_naive) <= RTOL or BACKEND == "jax"
    _, (gh, gk) = value_and_grads(
        lambda a, c: fused_linear_ce_sum(a, c, y, w, **kw)[0], hh, k_rounded
    )
    assert keras.backend.standardize_dtype(gk.dtype) == "float32"
    assert rel_err(_to64(gh), dh) <= tol and rel_err(_to64(gk), dk) <= tol
    with pytest.raises(ValueError, match="`matmul_precision` must be"):
        linear_ce(hh, kk, y, matmul_precision="half")


@pytest.mark.parametrize("strategy", ["recompute", "in_forward"])
def test_torch_retained_graph_backward_twice(rng, strategy):
    """torch: the custom Function keeps its forward state for a retained graph, so a
    second ``backward(retain_graph=True)`` adds the same gradient again (2x), and the
    upstream gradient scales it (no in-place change of the saved state)."""
    if BACKEND != "torch":
        pytest.skip("torch autograd; runs in the torch re-run (test_other_backend_subprocess)")
    import torch

    h, k, b, y = data(rng, n=19, d=8, v=41, ignore=-1)
    w = rng.uniform(size=len(y)).astype("float32")
    _, dh, dk, _ = reference(h, k, y, b, ignore=-1, w=w)
    hh = torch.tensor(h, requires_grad=True)
    kk = torch.tensor(k, requires_grad=True)
    kw = {"bias": b, "ignore_class": -1, "strategy": strategy, "vocab_chunk_size": 12}
    val = 3.0 * fused_linear_ce_sum(hh, kk, y, w, **kw)[0]
    first = torch.autograd.grad(val, (hh, kk), retain_graph=True)
    again = torch.autograd.grad(val, (hh, kk), retain_graph=True)
    for g1, g2, e in zip(first, again, (dh, dk)):
        assert rel_err(g1, 3 * e) <= GRAD_RTOL and rel_err(g2, 3 * e) <= GRAD_RTOL
    val.backward(retain_graph=True)
    val.backward()
    for x, e in zip((hh, kk), (dh, dk)):
        assert rel_err(x.grad, 6 * e) <= RTOL


def test_smoothing_and_cap_match_keras_categorical(rng):
    h, k, b, y = data(rng)
    eps, cap = 0.15, 2.5
    logits = cap * np.tanh((h @ k + b) / cap)
    cce = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=eps, reduction=None
    )
    expected = np.asarray(cce(np.eye(k.shape[1])[y], logits))
    got = linear_ce(h, k, y, bias=b, label_smoothing=eps, logit_soft_cap=cap, vocab_chunk_size=64)
    assert rel_err(got, expected) <= RTOL


def test_batched_shape_and_out_of_range_labels(rng):
    h, k, b, y = data(rng, n=24)
    y[3] = 999  # outside [0, V): NaN, as the plugin's sparse loss
    out = np.asarray(linear_ce(h.reshape(4, 6, -1), k, y.reshape(4, 6), bias=b, token_chunk_size=5))
    assert out.shape == (4, 6)
    assert np.isnan(out.reshape(-1)[3]) and np.isfinite(np.delete(out.reshape(-1), 3)).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inputs_accumulate_in_float32(rng, dtype):
    h, k, b, y = data(rng)
    hh, kk = ops.cast(h, dtype), ops.cast(k, dtype)
    h32, k32 = np.asarray(ops.cast(hh, "float32")), np.asarray(ops.cast(kk, "float32"))
    loss = reference(h32, k32, y, b)[0]
    out = linear_ce(hh, kk, y, bias=b, token_chunk_size=8, vocab_chunk_size=50)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert rel_err(out, loss) <= RTOL  # same rounded inputs, float32 accumulation
    _, grads = value_and_grads(lambda a, c: ops.sum(linear_ce(a, c, y, bias=b)), hh, kk)
    assert [keras.backend.standardize_dtype(g.dtype) for g in grads] == [dtype, dtype]


def test_dynamic_batch_in_tf_function(rng):
    if BACKEND != "tensorflow":
        pytest.skip("tf.function with an unknown number of tokens")
    import tensorflow as tf

    h, k, b, y = data(rng, ignore=-1)
    fn = tf.function(
        lambda hh, yy: linear_ce(hh, k, yy, bias=b, ignore_class=-1, token_chunk_size=8),
        input_signature=[tf.TensorSpec([None, 16]), tf.TensorSpec([None], tf.int32)],
    )
    for n in (37, 5):
        expected = reference(h[:n], k, y[:n], b, ignore=-1)[0]
        assert rel_err(fn(h[:n], y[:n]), expected) <= RTOL


def test_token_accuracy_matches_argmax(rng):
    h, k, b, y = data(rng, ignore=-1)
    logits = h @ k + b
    y[1] = np.argmax(logits[1])
    expected = (np.argmax(logits, 1) == y).astype("float32")
    got = linear_token_accuracy(h, k, y, bias=b, ignore_class=-1, vocab_chunk_size=40)
    np.testing.assert_array_equal(np.asarray(got), np.where(y == -1, 0.0, expected))
    metric = TokenAccuracy(ignore_class=-1)
    metric.update_state(y, logits)
    kept = y != -1
    assert abs(float(metric.result()) - expected[kept].mean()) < 1e-6


# --------------------------------------------------------------------------- #
# LinearCE reductions, validation and config
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
@pytest.mark.parametrize("ignore_class", [None, -1])
def test_linear_ce_loss_fused_equals_keras_builtin(rng, reduction, ignore_class):
    h, k, b, y = data(rng, ignore=ignore_class)
    sw = (rng.uniform(size=len(y)) > 0.3).astype("float32")  # a padding mask
    loss = LinearCE(ignore_class=ignore_class, reduction=reduction)
    builtin = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore_class, reduction=reduction
    )
    logits = h @ k + b
    expected = float(builtin(y, logits, sample_weight=sw))
    assert abs(float(loss(y, logits, sample_weight=sw)) - expected) <= RTOL * abs(expected)
    fused, correct, _ = loss.fused(h, k, y, bias=b, sample_weight=sw)
    assert abs(float(fused) - expected) <= RTOL * abs(expected)
    assert np.all(np.asarray(correct)[sw == 0] == 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"label_smoothing": 1.5},
            "`label_smoothing` must be in [0, 1]. Received: label_smoothing=1.5",
        ),
        ({"logit_soft_cap": -1.0}, "`logit_soft_cap` must be a positive float or None"),
        ({"token_chunk_size": 0}, "`token_chunk_size` must be a positive integer or None"),
        ({"reduction": "none"}, "`reduction` must be one of"),
    ],
)
def test_linear_ce_validates_arguments(kwargs, message):
    with pytest.raises(
        (ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")
    ):
        LinearCE(**kwargs)


def test_linear_ce_function_validates_shapes(rng):
    h, k, b, y = data(rng)
    with pytest.raises(ValueError, match="`hidden` must have shape"):
        linear_ce(h[:, :5], k, y)
    with pytest.raises(ValueError, match="`bias` must have shape"):
        linear_ce(h, k, y, bias=b[:5])
    with pytest.raises(TypeError, match="`transpose_kernel` must be a bool"):
        linear_ce(h, k, y, transpose_kernel=1)


def test_configs_round_trip():
    loss = LinearCE(
        ignore_class=0,
        label_smoothing=0.1,
        logit_soft_cap=30.0,
        token_chunk_size=128,
        vocab_chunk_size=4096,
        reduction="sum",
        dtype="float32",
    )
    config = loss.get_config()
    assert config["dtype"] == "float32" and config["vocab_chunk_size"] == 4096
    assert LinearCE.from_config(config).get_config() == config
    ser = keras.saving.serialize_keras_object(loss)
    assert json.loads(json.dumps(ser))["registered_name"] == "customloss>LinearCE"
    metric = TokenAccuracy(ignore_class=-1)
    assert TokenAccuracy.from_config(metric.get_config()).ignore_class == -1


# --------------------------------------------------------------------------- #
# LinearCEModel: fit, save, reload
# --------------------------------------------------------------------------- #
V, D, T = 97, 16, 12


def tiny_lm(head_kind: str = "tied", cap: float | None = None, **kwargs) -> LinearCEModel:
    keras.utils.set_random_seed(7)
    tokens = keras.Input((T,), dtype="int32")
    emb = keras.layers.ReversibleEmbedding(
        V, D, tie_weights=head_kind != "untied", logit_soft_cap=cap, name="token_embedding"
    )
    x = keras.layers.Dense(D, activation="tanh", name="mix")(emb(tokens))
    backbone = keras.Model(tokens, x, name="backbone")
    head = keras.layers.Dense(V, name="lm_head") if head_kind == "dense" else emb
    return LinearCEModel(backbone, head=head, **kwargs)


def lm_data(rng, n=8):
    x = rng.integers(0, V, (n, T)).astype("int32")
    y = np.roll(x, -1, axis=1)
    sw = np.ones((n, T), "float32")
    sw[:, -3:] = 0.0
    return x, y, sw


@pytest.mark.parametrize(("head_kind", "cap"), [("tied", None), ("untied", 5.0), ("dense", None)])
def test_model_fit_matches_naive_loss_curve(rng, head_kind, cap):
    x, y, sw = lm_data(rng)
    naive, fused = tiny_lm(head_kind, cap), tiny_lm(head_kind, cap)
    fused.set_weights(naive.get_weights())
    naive.compile(
        keras.optimizers.SGD(0.5),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="keras_acc")],
    )
    fused.compile(keras.optimizers.SGD(0.5), LinearCE(vocab_chunk_size=40, token_chunk_size=16))
    h1 = naive.fit(x, y, sample_weight=sw, batch_size=4, epochs=3, verbose=0, shuffle=False)
    h2 = fused.fit(x, y, sample_weight=sw, batch_size=4, epochs=3, verbose=0, shuffle=False)
    assert rel_err(h2.history["loss"], h1.history["loss"]) <= RTOL
    for a, b in zip(fused.get_weights(), naive.get_weights()):
        assert rel_err(a, b) <= 1e-4
    # Token accuracy = Keras' weighted SparseCategoricalAccuracy on the naive logits.
    assert rel_err(h2.history["token_accuracy"], h1.history["keras_acc"]) <= 1e-6
    # predict = a plain functional keras.Model of the naive model's own layers.
    tokens = keras.Input((T,), dtype="int32")
    hidden = naive.backbone(tokens)
    if isinstance(naive.head, keras.layers.ReversibleEmbedding):
        plain = keras.Model(tokens, naive.head(hidden, reverse=True))
    else:
        plain = keras.Model(tokens, naive.head(hidden))
    np.testing.assert_allclose(
        fused.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-4, atol=1e-5
    )
    ev = fused.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    ev_naive = naive.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    assert abs(ev["loss"] - ev_naive["loss"]) <= 1e-4 * abs(ev_naive["loss"])


def _builtin_metric(name, **kw):
    """Keras' own sparse CE, per token, as a metric (the oracle for LinearCE's)."""
    fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, **kw)
    return keras.metrics.MeanMetricWrapper(fn, name=name)


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_linear_ce_as_metric_by_name_and_instance(rng, kind):
    """Unweighted, weighted and option-carrying LinearCE metrics equal Keras' built-in's."""
    x, y, sw = lm_data(rng)

    def build(ours: bool):
        model = tiny_lm("tied")
        if ours:
            metrics = ["customloss>LinearCE", LinearCE(reduction=None, name="lce_inst")]
            weighted = [
                LinearCE(reduction=None, name="w"),
                LinearCE(reduction=None, ignore_class=3, name="w_ign"),
            ]
        else:
            metrics = [_builtin_metric("customloss>LinearCE"), _builtin_metric("lce_inst")]
            weighted = [_builtin_metric("w"), _builtin_metric("w_ign", ignore_class=3)]
        loss = (
            LinearCE(vocab_chunk_size=40)
            if ours and kind == "fused"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.compile(keras.optimizers.SGD(0.5), loss, metrics=metrics, weighted_metrics=weighted)
        return model

    ours, keras_ = build(True), build(False)
    keras_.set_weights(ours.get_weights())
    kw = {"sample_weight": sw, "batch_size": 4, "epochs": 2, "verbose": 0, "shuffle": False}
    got, expected = ours.fit(x, y, **kw).history, keras_.fit(x, y, **kw).history
    for name in ("loss", "customloss>LinearCE", "lce_inst", "w", "w_ign"):
        assert rel_err(got[name], expected[name]) <= RTOL, name
    ev = ours.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    ev_keras = keras_.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    for name in ("loss", "customloss>LinearCE", "w", "w_ign"):
        assert rel_err(ev[name], ev_keras[name]) <= RTOL, name


def test_fused_fit_refuses_metrics_that_need_logits(rng):
    x, y, _ = lm_data(rng)
    model = tiny_lm("tied")
    model.compile("sgd", LinearCE(), metrics=["accuracy"])
    with pytest.raises(ValueError, match="needs the logits, which fused training never forms"):
        model.fit(x, y, epochs=1, verbose=0)


def test_reduction_none_values_and_fit_equal_keras(rng):
    """``reduction=None``: weighted per-token values as Keras'; fit follows their sum's
    gradient, as Keras' fit does on TensorFlow."""
    h, k, b, y = data(rng, ignore=-1)
    sw = rng.uniform(size=len(y)).astype("float32")
    logits = h @ k + b
    builtin = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1, reduction=None
    )
    expected = np.asarray(builtin(y, logits, sample_weight=sw))
    got = np.asarray(LinearCE(ignore_class=-1, reduction=None)(y, logits, sample_weight=sw))
    assert got.shape == expected.shape and rel_err(got, expected) <= RTOL
    if BACKEND != "tensorflow":  # Keras' fit takes a non-scalar loss on TensorFlow only
        return
    x, yy, sw2 = lm_data(rng)
    naive, fused = tiny_lm("tied"), tiny_lm("tied")
    fused.set_weights(naive.get_weights())
    naive.compile(keras.optimizers.SGD(0.005), builtin)
    fused.compile(keras.optimizers.SGD(0.005), LinearCE(ignore_class=-1, reduction=None))
    kw = {"sample_weight": sw2, "batch_size": 4, "epochs": 2, "verbose": 0, "shuffle": False}
    naive.fit(x, yy, **kw), fused.fit(x, yy, **kw)
    for a, b in zip(fused.get_weights(), naive.get_weights()):  # Keras: d(sum)/dw
        assert rel_err(a, b) <= 1e-4


def test_keras_mask_honoured_as_keras_losses_honour_it(rng):
    """A backbone that propagates a mask (Embedding(mask_zero=True)): fused fit = Keras fit."""

    def masked_lm():
        keras.utils.set_random_seed(3)
        tokens = keras.Input((T,), dtype="int32")
        emb = keras.layers.Embedding(V, D, mask_zero=True)
        x = keras.layers.Dense(D, activation="tanh")(emb(tokens))
        head = keras.layers.Dense(V)
        return LinearCEModel(keras.Model(tokens, x), head=head)

    x, y, _ = lm_data(rng)
    x[:, -4:] = 0  # padding, masked by the embedding
    naive, fused = masked_lm(), masked_lm()
    fused.set_weights(naive.get_weights())
    naive.compile(
        keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    fused.compile(keras.optimizers.SGD(0.5), LinearCE(vocab_chunk_size=40))
    kw = {"batch_size": 4, "epochs": 2, "verbose": 0, "shuffle": False}
    h1, h2 = naive.fit(x, y, **kw).history, fused.fit(x, y, **kw).history
    assert rel_err(h2["loss"], h1["loss"]) <= RTOL
    unmasked = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        y, naive.predict(x, verbose=0)
    )
    assert abs(float(unmasked) - h1["loss"][-1]) > 1e-3  # the mask changes the value


@pytest.mark.parametrize(("head_cap", "loss_cap"), [(5.0, None), (None, 5.0), (5.0, 5.0)])
def test_soft_cap_is_one_setting(rng, head_cap, loss_cap):
    """Head's or loss's cap (or both, equal): applied once in fit and in evaluate."""
    x, y, sw = lm_data(rng)
    fused = tiny_lm("untied", head_cap)
    reference_model = tiny_lm("untied", 5.0)
    reference_model.set_weights(fused.get_weights())
    reference_model.compile(
        keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    fused.compile(keras.optimizers.SGD(0.5), LinearCE(logit_soft_cap=loss_cap))
    kw = {"sample_weight": sw, "batch_size": 4, "epochs": 2, "verbose": 0, "shuffle": False}
    h1, h2 = reference_model.fit(x, y, **kw).history, fused.fit(x, y, **kw).history
    assert rel_err(h2["loss"], h1["loss"]) <= RTOL
    ev = fused.evaluate(x, y, sample_weight=sw, verbose=0)
    ev_ref = reference_model.evaluate(x, y, sample_weight=sw, verbose=0)
    assert rel_err(ev, ev_ref) <= RTOL


def test_soft_caps_that_differ_are_refused(rng):
    x, y, _ = lm_data(rng)
    model = tiny_lm("untied", 5.0)
    model.compile("sgd", LinearCE(logit_soft_cap=3.0))
    with pytest.raises(ValueError, match="`logit_soft_cap` differ; set it on one of them"):
        model.fit(x, y, epochs=1, verbose=0)


def test_model_config_keeps_token_accuracy():
    """``token_accuracy`` is in the config (through JSON) and validated in ``__init__``."""
    model = tiny_lm(token_accuracy=False)
    config = json.loads(json.dumps(model.get_config()))
    assert config["token_accuracy"] is False
    assert LinearCEModel.from_config(config).get_config()["token_accuracy"] is False
    assert tiny_lm().get_config()["token_accuracy"] is True
    with pytest.raises(TypeError, match=r"`token_accuracy` must be True or False\. Received: "):
        tiny_lm(token_accuracy="no")


def test_model_saves_and_reloads_in_fresh_process_safe_mode(rng, tmp_path):
    x, y, sw = lm_data(rng)
    model = tiny_lm("tied", cap=4.0, token_accuracy=False)
    model.compile("adam", LinearCE(ignore_class=0, label_smoothing=0.1))
    assert list(model.fit(x, y, sample_weight=sw, epochs=1, verbose=0).history) == ["loss"]
    path = tmp_path / "lm.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "pred.npy", model.predict(x, verbose=0))
    code = f"""
import numpy as np, keras
import keras_ce_plugin.large_vocab
m = keras.models.load_model({str(path)!r}, safe_mode=True)
x = np.load({str(tmp_path / "x.npy")!r})
np.testing.assert_allclose(m.predict(x, verbose=0), np.load({str(tmp_path / "pred.npy")!r}), rtol=1e-6, atol=1e-6)
assert type(m.loss).__name__ == "LinearCE" and m.loss.label_smoothing == 0.1
assert m.head is m.backbone.get_layer("token_embedding")  # still tied
h = m.fit(x, np.roll(x, -1, 1), epochs=1, verbose=0).history
assert list(h) == ["loss"], h  # token_accuracy=False kept
print("OK")
"""
    out = run_python(code, cwd=REPO, env={"KERAS_BACKEND": BACKEND})
    assert "OK" in out.stdout


# Measured (passed, skipped + deselected) of the nested run below. Skipped: the
# TensorFlow-only tests (tf.function, XLA, the TF-graph test, the jaxpr test run from
# TensorFlow) and, on JAX, the torch retained-graph test; deselected: the -k filter's 15.
NESTED_COUNTS = {"jax": (64, 21), "torch": (66, 19)}


@pytest.mark.slow
@pytest.mark.parametrize("other", ["jax", "torch"])
def test_other_backend_subprocess(other):
    """This file's backend-neutral tests, again under another backend in a fresh process."""
    rerun_from_tensorflow(
        other,
        "-x",
        "tests/test_large_vocab.py",
        "-k",
        # The other backends cover every function once; the strategy and head
        # variants (same code paths) run on TensorFlow only, to keep CI within its time.
        "not fresh_process and not other_backend and not (options and (recompute or "
        "in_forward)) and not (model_fit and (untied or dense))",
        min_passed=NESTED_COUNTS[other][0],
        max_skipped=NESTED_COUNTS[other][1],
        timeout=900,
    )


def test_package_imports_without_tensorflow():
    code = """
import sys
sys.modules["tensorflow"] = None  # any import of TensorFlow fails
import keras_ce_plugin.large_vocab as lv
import numpy as np
out = lv.linear_ce(np.ones((3, 4), "float32"), np.ones((4, 5), "float32"), np.array([0, 1, 2]))
assert np.allclose(np.asarray(out), np.log(5.0))
print("OK")
"""
    pytest.importorskip("jax")
    assert "OK" in run_python(code, cwd=REPO, env={"KERAS_BACKEND": "jax"}).stdout


def test_tf_xla_jit_compile(rng):
    """Under XLA the in-place TensorFlow ops are replaced by dynamic_update_slice."""
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow's jit_compile")
    import tensorflow as tf

    h, k, b, y = data(rng, ignore=-1)
    loss, dh, dk, db = reference(h, k, y, b, ignore=-1)
    hv, kv, bv = tf.Variable(h), tf.Variable(k), tf.Variable(b)

    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            val = tf.reduce_sum(
                linear_ce(
                    hv, kv, y, bias=bv, ignore_class=-1, token_chunk_size=8, vocab_chunk_size=50
                )
            )
        return val, tape.gradient(val, [hv, kv, bv])

    val, grads = step()
    assert rel_err(val, loss.sum()) <= RTOL
    for g, e in zip(grads, (dh, dk, db)):
        assert rel_err(g, e) <= GRAD_RTOL


# (options, token chunk, vocab chunk, transposed kernel, bias) for the frozen head's
# online pass, and smoothing with a cap (the recomputing path).
FROZEN = [
    ({}, 8, 50, False, True),
    ({"logit_soft_cap": 3.0}, 16, 64, True, False),
    ({"label_smoothing": 0.1, "ignore_class": 7}, None, 50, False, True),
    ({"label_smoothing": 0.2, "logit_soft_cap": 2.0}, 8, 50, True, True),
]


@pytest.mark.parametrize(("opts", "tn", "tv", "transpose", "use_bias"), FROZEN, ids=str)
@pytest.mark.parametrize("strategy", ["recompute", "in_forward"])
def test_frozen_head_values_and_gradient_match_reference(
    rng, opts, tn, tv, transpose, use_bias, strategy
):
    """``kernel_grad=False``: loss, correctness and the hidden gradient (accumulated
    online in the forward pass) equal the float64 reference, chunks that do and do not
    divide N and V, with the z-loss's extra gradient too."""
    from keras_ce_plugin.large_vocab.ops import fused_linear_ce_parts

    ignore = opts.get("ignore_class")
    h, k, b, y = data(rng, transpose=transpose, ignore=ignore)
    b = b if use_bias else None
    w = rng.uniform(size=len(y)).astype("float32")
    cap, eps = opts.get("logit_soft_cap"), opts.get("label_smoothing", 0.0)
    ref = dict(transpose=transpose, ignore=ignore, eps=eps, cap=cap, w=w)
    loss, dh, _, _ = reference(h, k, y, b, **ref)
    kw = dict(bias=b, transpose_kernel=transpose, token_chunk_size=tn, vocab_chunk_size=tv)
    kw.update(opts, kernel_grad=False, strategy=strategy)
    total, correct, per_token = fused_linear_ce_parts(h, k, y, w, **kw)
    assert rel_err(total, (loss * w).sum()) <= RTOL
    assert rel_err(per_token, loss) <= RTOL
    s = h.astype(np.float64) @ (k.T if transpose else k) + (0.0 if b is None else b)
    hit = (s.argmax(1) == y) & (y != (ignore if ignore is not None else -99))
    np.testing.assert_array_equal(np.asarray(correct), hit.astype("float32"))
    _, (g,) = value_and_grads(lambda hh: fused_linear_ce_parts(hh, k, y, w, **kw)[0], h)
    assert rel_err(g, dh) <= GRAD_RTOL
    if eps and cap:
        return
    z = 1e-2  # large enough that a missing term exceeds the tolerance
    if cap:
        s = cap * np.tanh(s / cap)
    lse = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    keep = y != ignore if ignore is not None else np.ones(len(y), bool)
    extra = (2 * z * lse * w * keep)[:, None] * np.exp(s - lse[:, None])
    if cap:
        extra = extra * (1 - (s / cap) ** 2)
    dh_z = dh + extra @ (k if transpose else k.T).astype(np.float64)
    _, (gz,) = value_and_grads(lambda hh: fused_linear_ce_parts(hh, k, y, w, z_loss=z, **kw)[0], h)
    assert rel_err(gz, dh_z) <= GRAD_RTOL


def test_frozen_kernel_gradient_skipped(rng):
    """``kernel_grad=False``: no kernel gradient (the kernel is a constant)."""
    from keras_ce_plugin.large_vocab.ops import fused_linear_ce_parts

    h, k, b, y = data(rng)
    w = rng.uniform(size=len(y)).astype("float32")
    if BACKEND == "tensorflow":  # the kernel is a constant of the custom gradient
        import tensorflow as tf

        kv = tf.Variable(k)
        with tf.GradientTape() as tape:
            val = fused_linear_ce_parts(h, kv, y, w, kernel_grad=False)[0]
        assert tape.gradient(val, kv) is None


@pytest.mark.parametrize("cap", [None, 3.0])
def test_z_loss_and_lse_match_reference(rng, cap):
    """PaLM's z-loss (z * lse**2 per token): value and gradients vs float64 NumPy."""
    z = 1e-2  # large enough that a missing term or gradient exceeds the tolerance
    h, k, b, y = data(rng)
    w = rng.uniform(size=len(y)).astype("float32")
    s = (h.astype(np.float64) @ k + b).astype(np.float64)
    if cap:
        s = cap * np.tanh(s / cap)
    m = s.max(1, keepdims=True)
    lse = np.log(np.exp(s - m).sum(1)) + m[:, 0]
    loss = lse - s[np.arange(len(y)), y] + z * lse**2
    kw = {"bias": b, "logit_soft_cap": cap, "vocab_chunk_size": 50, "token_chunk_size": 8}
    got, got_lse = linear_ce(h, k, y, z_loss=z, return_lse=True, **kw)
    assert rel_err(got, loss) <= RTOL and rel_err(got_lse, lse) <= RTOL
    # Gradient: the reference's plus 2 z lse softmax (times the cap's derivative).
    _, dh, dk, _ = reference(h, k, y, b, cap=cap, w=w)
    p = np.exp(s - lse[:, None])
    extra = (2 * z * lse * w)[:, None] * p
    if cap:
        extra = extra * (1 - (s / cap) ** 2)
    dh, dk = dh + extra @ k.T.astype(np.float64), dk + h.T.astype(np.float64) @ extra
    _, (gh, gk) = value_and_grads(
        lambda hh, kk: ops.sum(ops.multiply(linear_ce(hh, kk, y, z_loss=z, **kw), w)), h, k
    )
    assert rel_err(gh, dh) <= GRAD_RTOL and rel_err(gk, dk) <= GRAD_RTOL
    logits = h @ k + b
    if cap:
        logits = cap * np.tanh(logits / cap)
    ours = LinearCE(z_loss=z, reduction=None)(y, logits)
    assert rel_err(ours, loss) <= RTOL
    fused, _, _ = LinearCE(z_loss=z, reduction="sum").fused(
        h, k, y, bias=b, logit_soft_cap=cap, sample_weight=w
    )
    assert rel_err(fused, (loss * w).sum()) <= RTOL


@pytest.mark.parametrize(
    ("strategy", "kernel_grad", "compute_grads"),
    [
        ("recompute", True, True),
        ("in_forward", True, True),
        ("recompute", False, True),
        ("recompute", True, False),
    ],
    ids=["recompute", "in_forward", "frozen_online", "no_grads"],
)
def test_fused_parts_return_lse_on_every_path(rng, strategy, kernel_grad, compute_grads):
    """``return_lse``: the per-token log-sum-exp of the capped logits (float64 NumPy),
    0 on skipped rows (weight 0, ``ignore_class``), from each pass that computes it."""
    from keras_ce_plugin.large_vocab.ops import fused_linear_ce_parts

    cap, ignore = 4.0, 3
    h, k, b, y = data(rng, ignore=ignore)
    w = rng.uniform(size=len(y)).astype("float32")
    w[1::7] = 0.0
    s = cap * np.tanh((h.astype(np.float64) @ k + b) / cap)
    m = s.max(1)
    lse = np.log(np.exp(s - m[:, None]).sum(1)) + m
    skipped = (w == 0) | (y == ignore)
    kw = dict(bias=b, logit_soft_cap=cap, ignore_class=ignore, z_loss=1e-2, return_lse=True)
    kw.update(token_chunk_size=8, vocab_chunk_size=50, strategy=strategy)
    kw.update(kernel_grad=kernel_grad, compute_grads=compute_grads)
    total, _, per_token, got = fused_linear_ce_parts(h, k, y, w, **kw)
    assert rel_err(np.where(skipped, 0.0, lse), got) <= RTOL
    assert not np.asarray(got)[skipped].any()
    loss = np.where(skipped, 0.0, lse - s[np.arange(len(y)), y] + 1e-2 * lse**2)
    assert rel_err(per_token, loss) <= RTOL and rel_err(total, (loss * w).sum()) <= RTOL


@pytest.mark.parametrize(("head_kind", "cap"), [("tied", None), ("untied", 5.0)])
def test_z_loss_reported_as_metric_in_fit_and_evaluate(rng, head_kind, cap):
    """With ``LinearCE(z_loss=z)``, ``fit`` and ``evaluate`` report ``z_loss``: the
    weighted mean of ``z * lse**2`` over the counted tokens (float64 NumPy on the
    model's own logits; learning rate 0 keeps them fixed for the epoch). Without a
    z-loss there is no such metric."""
    x, y, sw = lm_data(rng)
    z = 1e-2
    model = tiny_lm(head_kind, cap)
    model.compile(
        keras.optimizers.SGD(0.0), LinearCE(z_loss=z, token_chunk_size=16, vocab_chunk_size=40)
    )
    hist = model.fit(x, y, sample_weight=sw, batch_size=4, epochs=1, verbose=0, shuffle=False)
    logits = model.predict(x, verbose=0).astype(np.float64)  # capped by a capped head
    m = logits.max(-1)
    lse = np.log(np.exp(logits - m[..., None]).sum(-1)) + m
    expected = (z * lse**2 * sw).sum() / sw.sum()
    # float32 sums over the 96 counted tokens of two batches
    assert rel_err(hist.history["z_loss"], [expected]) <= RTOL
    ev = model.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    assert rel_err(ev["z_loss"], expected) <= RTOL
    plain = tiny_lm(head_kind, cap)
    plain.compile(keras.optimizers.SGD(0.0), LinearCE())
    assert "z_loss" not in plain.fit(x, y, batch_size=4, epochs=1, verbose=0).history


_STRUCTURAL = """
import jax, jax.numpy as jnp, numpy as np, keras
from keras_ce_plugin.large_vocab import fused_linear_ce_sum, linear_ce

N, D, V = 512, 16, 8192  # N x V = 4M elements; chunks of 64 tokens x 256 columns


def biggest(jaxpr):
    out = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            out = max(out, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out = max(out, biggest(inner))
    return out


h = jnp.ones((N, D)); k = jnp.ones((V, D)); y = jnp.arange(N) % V; w = jnp.ones((N,))
kw = dict(transpose_kernel=True, token_chunk_size=64, vocab_chunk_size=256)
fns = {
    "linear_ce": lambda h, k: jnp.sum(linear_ce(h, k, y, **kw)),
    "fused_sum": lambda h, k: fused_linear_ce_sum(h, k, y, w, **kw)[0],
    "naive": lambda h, k: jnp.sum(keras.losses.sparse_categorical_crossentropy(
        y, h @ k.T, from_logits=True)),
}
for name, fn in fns.items():
    size = biggest(jax.make_jaxpr(jax.value_and_grad(fn, argnums=(0, 1)))(h, k).jaxpr)
    print(name, size, size >= N * V)
"""


def test_no_traced_intermediate_has_n_times_v_elements():
    """Structural: the jaxpr of value-and-gradient (loops and custom rules included)
    holds no N x V tensor; the naive loss's does (the control)."""
    if BACKEND != "tensorflow":
        pytest.skip("run once, from the TensorFlow process")
    require_backend("jax")
    out = run_python(_STRUCTURAL, cwd=REPO, env={"KERAS_BACKEND": "jax"}).stdout.split("\n")
    results = {line.split()[0]: line.split()[2] == "True" for line in out if line.strip()}
    assert results == {"linear_ce": False, "fused_sum": False, "naive": True}, out


def _tf_graphs(graph, seen=None):
    """A traced TensorFlow graph and every function graph under it (loop bodies and
    conditions, the XLA-fused chunk kernels, the custom gradient)."""
    seen = set() if seen is None else seen
    yield graph
    for fn in getattr(graph, "_functions", {}).values():
        inner = getattr(fn, "graph", None)
        if inner is not None and id(inner) not in seen:
            seen.add(id(inner))
            yield from _tf_graphs(inner, seen)


def _tf_biggest(graph) -> tuple[int, int]:
    """The largest statically shaped tensor in ``graph`` and its functions, and the
    number of graphs; a tensor of unknown shape fails unless it is in a fused chunk
    kernel or one of the unused placeholders TensorFlow gives a while loop's condition."""
    biggest, count = 0, 0
    for g in _tf_graphs(graph):
        count += 1
        for op in g.get_operations():
            for t in op.outputs:
                if t.shape.rank is None or None in t.shape.as_list():
                    # A fused chunk kernel traced for any shape (`fit` relaxes them):
                    # elementwise, its call sites' shapes are checked in their graphs.
                    kernel = any(part in g.name for part in ("fold", "dlogits"))
                    unused = op.type == "Placeholder" and "redundant" in op.name
                    assert kernel or unused, (g.name, op, t.shape)
                    continue
                biggest = max(biggest, int(np.prod(t.shape.as_list())))
    return biggest, count


def test_no_tf_graph_tensor_has_n_times_v_elements(rng):
    """Structural, TensorFlow: the graphs traced by ``tf.function`` + ``GradientTape``
    for the per-token ``linear_ce`` and the fused sum, and the traced ``train_step`` of
    a ``LinearCEModel`` with ``LinearCE`` (the path of ``fit`` and of the keras-hub
    trainer), hold no tensor of N x V elements at N, V larger than the chunks; the
    naive loss's and the naive model's do (the controls). The fused step of a tied
    head holds nothing larger than the embedding itself."""
    if BACKEND != "tensorflow":
        pytest.skip("TensorFlow graphs; the jaxpr test covers JAX")
    import tensorflow as tf

    n, d, v = 512, 16, 8192  # N x V = 4M elements; the kernel V x d = 131k
    h = tf.constant(rng.normal(size=(n, d)).astype("float32"))
    k = tf.Variable(rng.normal(size=(v, d)).astype("float32"))
    y = tf.constant(rng.integers(0, v, n).astype("int32"))
    w = tf.ones((n,))
    kw = {"transpose_kernel": True, "token_chunk_size": 64, "vocab_chunk_size": 256}
    losses = {
        "linear_ce": lambda: tf.reduce_sum(linear_ce(h, k, y, **kw)),
        "fused_sum": lambda: fused_linear_ce_sum(h, k, y, w, **kw)[0],
        "naive": lambda: tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(
                y, tf.matmul(h, k, transpose_b=True), from_logits=True
            )
        ),
    }
    sizes, traced = {}, {}
    for name, fn in losses.items():

        def step(fn=fn):
            with tf.GradientTape() as tape:
                tape.watch(h)
                value = fn()
            return value, tape.gradient(value, [h, k])

        sizes[name] = _tf_biggest(tf.function(step).get_concrete_function().graph)
    for kind in ("fused", "naive"):
        emb = keras.layers.ReversibleEmbedding(v, d)
        inputs = keras.Input((256,), dtype="int32")
        model = LinearCEModel(keras.Model(inputs, emb(inputs)), head=emb)
        # A 1 MiB chunk budget: the default 64 MiB would hold all 512 x 8192 logits here.
        loss = (
            LinearCE(chunk_budget_mib=1.0)
            if kind == "fused"
            else keras.losses.SparseCategoricalCrossentropy(True)
        )
        model.compile(keras.optimizers.SGD(1e-3), loss=loss)
        model.build((None, 256))
        model.optimizer.build(model.trainable_variables)
        x = tf.constant(rng.integers(0, v, (2, 256)).astype("int32"))
        traced[kind] = tf.function(model.train_step).get_concrete_function((x, x))
        sizes[f"fit_{kind}"] = _tf_biggest(traced[kind].graph)
    big = {name: size >= n * v for name, (size, _) in sizes.items()}
    assert big == {
        "linear_ce": False,
        "fused_sum": False,
        "naive": True,
        "fit_fused": False,
        "fit_naive": True,
    }, sizes
    assert all(count > 1 for name, (_, count) in sizes.items() if "naive" not in name), sizes
    # The tied embedding's two gradients share one V x d buffer (_tied_tf). TensorFlow's
    # own sum (the naive step) densifies the lookup's IndexedSlices into a second V x d
    # tensor (UnsortedSegmentSum; ConcatV2 where both stay IndexedSlices) first.
    second = {
        kind: [
            op.type
            for g in _tf_graphs(traced[kind].graph)
            for op in g.get_operations()
            if op.type in ("UnsortedSegmentSum", "ConcatV2")
            for t in op.outputs
            if t.shape.rank is not None
            and None not in t.shape.as_list()
            and int(np.prod(t.shape.as_list())) >= v * d
        ]
        for kind in ("fused", "naive")
    }
    assert not second["fused"] and second["naive"], second

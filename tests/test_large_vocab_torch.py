"""torch's own gradient-in-forward pass (``large_vocab/_torch_rows.py``).

On torch, ``fused_linear_ce_parts``/``fused_linear_ce_sum`` (and so ``LinearCE`` in
``fit``) compute the gradients in the forward pass with one ``(tn, V)`` buffer
overwritten in place and an in-place ``addmm_`` for the kernel gradient, unless the
settings need the generic pass (``filter_eps``, half-precision matmuls). These tests
run in a torch process: :func:`test_on_torch` starts it from the TensorFlow suite (the
README's test command), and each other test skips where the backend is not torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rerun_from_tensorflow, spy_on
from test_large_vocab import BACKEND, GRAD_RTOL, RTOL, rel_err, value_and_grads

from keras_ce_plugin.large_vocab.ops import fused_linear_ce_parts

N, D, V = 45, 12, 300  # N not a multiple of the token chunk (16)

OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "cap_smoothing_zloss": {"logit_soft_cap": 4.0, "label_smoothing": 0.1, "z_loss": 1e-3},
    "ignore_weights": {"ignore_class": 7, "weights": True},
    "all": {
        "bias": True,
        "logit_soft_cap": 2.5,
        "label_smoothing": 0.2,
        "z_loss": 1e-4,
        "ignore_class": 7,
        "weights": True,
    },
}


def reference(h, k, y, u, b, *, transpose, cap=None, smoothing=0.0, zloss=0.0, ignore=None):
    """float64 ``sum(u * loss)``, per-token loss and log-sum-exp, and the gradients of the
    sum w.r.t. h, k, b (skipped tokens, ignored or of weight 0: 0)."""
    kk = (k.T if transpose else k).astype(np.float64)
    z = h.astype(np.float64) @ kk + (0.0 if b is None else b.astype(np.float64))
    t = np.tanh(z / cap) if cap else None
    s = cap * t if cap else z
    m = s.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(s - m).sum(1))
    p = np.exp(s - lse[:, None])
    keep = np.ones(len(y), bool) if ignore is None else y != ignore
    u = np.where(keep, u.astype(np.float64), 0.0)
    target = np.eye(V)[np.where(keep, y, 0)] * (1 - smoothing) + smoothing / V
    loss = lse - (target * s).sum(1) + zloss * lse**2
    g = (p * (1 + 2 * zloss * lse)[:, None] - target) * u[:, None]
    if cap:
        g = g * (1 - t**2)
    dk = h.astype(np.float64).T @ g
    grads = [g @ kk.T, dk.T if transpose else dk] + ([g.sum(0)] if b is not None else [])
    active = keep & (u != 0)
    return float((u * loss).sum()), np.where(active, loss, 0), np.where(active, lse, 0), grads


def _problem(rng, opts, transpose):
    h = rng.normal(size=(N, D)).astype("float32")
    k = (rng.normal(size=(V, D) if transpose else (D, V)) * 0.7).astype("float32")
    b = rng.normal(size=V).astype("float32") if opts.get("bias") else None
    y = rng.integers(0, V, N).astype("int32")
    y[::9] = 7  # the ignored class, where it is set
    u = np.ones(N, "float32")
    if opts.get("weights"):
        u = rng.uniform(0.1, 2.0, N).astype("float32")
        u[4] = 0.0
    return h, k, b, y, u


def _kwargs(opts, transpose, **extra):
    kw = {key: opts[key] for key in ("logit_soft_cap", "label_smoothing", "z_loss") if key in opts}
    kw.update(transpose_kernel=transpose, ignore_class=opts.get("ignore_class"))
    kw.update({"token_chunk_size": 16, "return_lse": True, **extra})
    return kw


def _needs_torch():
    if BACKEND != "torch":
        pytest.skip("torch's own pass: test_on_torch runs these in a torch process")


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of torch's own pass."""
    _needs_torch()  # before the import: torch may not be installed
    from keras_ce_plugin.large_vocab import _torch_rows

    return spy_on(monkeypatch, _torch_rows)


@pytest.mark.parametrize("transpose", [False, True], ids=["dxV", "Vxd"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_torch_pass_matches_float64_reference(rng, spy, name, transpose):
    _needs_torch()
    opts = OPTIONS[name]
    h, k, b, y, u = _problem(rng, opts, transpose)
    total64, loss64, lse64, grads64 = reference(
        h,
        k,
        y,
        u,
        b,
        transpose=transpose,
        cap=opts.get("logit_soft_cap"),
        smoothing=opts.get("label_smoothing", 0.0),
        zloss=opts.get("z_loss", 0.0),
        ignore=opts.get("ignore_class"),
    )
    kw = _kwargs(opts, transpose)
    extras = {}

    def fn(hh, kk, *bb):
        out = fused_linear_ce_parts(hh, kk, y, u, bias=bb[0] if bb else None, **kw)
        extras["per_token"], extras["lse"] = (np.asarray(x.detach()) for x in out[2:])
        return out[0]

    args = (h, k) + ((b,) if b is not None else ())
    total, grads = value_and_grads(fn, *args)
    assert spy, "strategy=None did not take torch's own pass"
    assert rel_err(total, total64) < RTOL
    assert rel_err(extras["per_token"], loss64) < RTOL
    assert rel_err(extras["lse"], lse64) < RTOL
    for got, want in zip(grads, grads64):
        assert rel_err(got, want) < GRAD_RTOL


@pytest.mark.parametrize(
    ("extra", "own"),
    [
        ({}, True),
        ({"strategy": "in_forward"}, True),
        ({"strategy": "recompute"}, False),
        ({"filter_eps": "auto"}, False),  # the generic pass filters; torch's has no blocks
        ({"strategy": "in_forward", "filter_eps": "auto"}, False),
    ],
    ids=["default", "in_forward", "recompute", "filter", "in_forward_filter"],
)
def test_which_pass_and_the_same_result(rng, spy, extra, own):
    _needs_torch()
    h, k, b, y, u = _problem(rng, OPTIONS["all"], False)
    kw = _kwargs(OPTIONS["all"], False, **extra)
    total, grads = value_and_grads(
        lambda hh, kk, bb: fused_linear_ce_parts(hh, kk, y, u, bias=bb, **kw)[0], h, k, b
    )
    assert bool(spy) == own
    total64, _, _, grads64 = reference(
        h, k, y, u, b, transpose=False, cap=2.5, smoothing=0.2, zloss=1e-4, ignore=7
    )
    assert rel_err(total, total64) < RTOL
    for got, want in zip(grads, grads64):
        assert rel_err(got, want) < GRAD_RTOL


def test_half_precision_matmuls_take_the_generic_pass(rng, spy):
    """``matmul_precision="input"`` with bfloat16 inputs: the generic pass (its half
    matmuls); float32 matmuls of bfloat16 inputs: torch's own pass."""
    _needs_torch()
    import torch

    h, k, _, y, u = _problem(rng, {}, False)
    hh, kk = (torch.tensor(x).to(torch.bfloat16) for x in (h, k))
    fused_linear_ce_parts(hh, kk, y, u, matmul_precision="input")
    assert not spy
    fused_linear_ce_parts(hh, kk, y, u)
    assert spy


def test_no_gradient_wanted_runs_the_forward_pass_only(rng, spy):
    """``compute_grads=False``, or ``torch.no_grad`` (evaluation): no gradient computed
    in the forward pass, which no backward pass would use."""
    _needs_torch()
    import torch

    h, k, _, y, u = _problem(rng, {}, False)
    total64 = reference(h, k, y, u, None, transpose=False)[0]
    total = fused_linear_ce_parts(h, k, y, u, compute_grads=False)[0]
    assert not spy and rel_err(np.asarray(total), total64) < RTOL
    with torch.no_grad():
        total = fused_linear_ce_parts(h, k, y, u)[0]
    assert not spy and rel_err(np.asarray(total), total64) < RTOL


def _ops_making(numel):
    """A torch dispatch mode that records every op whose output has ``numel`` elements
    (every op: None)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if numel is None or (isinstance(out, torch.Tensor) and out.numel() == numel):
                self.seen.append(str(func))
            return out

    return Ops()


@pytest.mark.parametrize("transpose", [False, True], ids=["dxV", "Vxd"])
def test_backward_makes_the_kernel_gradient_the_grad_without_a_copy(rng, transpose):
    """``loss.backward()`` (Keras' torch step) stores the kernel gradient that the
    forward pass filled as the kernel's ``.grad`` itself: no op of the backward pass
    writes a kernel-sized tensor (autograd copied it while the forward pass's
    closure still held it: ``new_empty_strided`` + ``copy_``). A retained graph's next
    backward pass recomputes it (``test_torch_retained_graph_backward_twice``)."""
    _needs_torch()
    import torch

    h, k, b, y, u = _problem(rng, OPTIONS["plain"], transpose)
    kernel = torch.nn.Parameter(torch.as_tensor(k))
    hidden = torch.as_tensor(h).requires_grad_(True)
    total = fused_linear_ce_parts(hidden, kernel, y, u, **_kwargs({}, transpose))[0]
    ops = _ops_making(k.size)
    with ops:
        total.backward()
    assert ops.seen == ["aten.detach.default"], ops.seen
    grads64 = reference(h, k, y, u, None, transpose=transpose)[3]
    assert rel_err(kernel.grad.detach(), grads64[1]) < GRAD_RTOL


def _tied_step(loss, tokens, labels):
    """The ops and the gradients of one training step of a tied ``LinearCEModel``."""
    import keras

    from keras_ce_plugin.large_vocab import LinearCEModel

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None,), dtype="int32")
    embedding = keras.layers.ReversibleEmbedding(V, D, tie_weights=True)
    hidden = keras.layers.Dense(D)(embedding(inputs))
    model = LinearCEModel(keras.Model(inputs, hidden), embedding)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    model.build((None, None))
    got = []
    apply = model.optimizer.apply

    def keep(grads, weights):  # the gradients as the optimizer receives them
        got.extend(np.array(g.detach()) for g in grads)
        return apply(grads, weights)

    model.optimizer.apply = keep
    ops = _ops_making(None)
    with ops:
        model.fit(tokens, labels, batch_size=len(tokens), epochs=1, verbose=0, shuffle=False)
    return set(ops.seen), got


def test_tied_head_adds_the_lookup_rows_into_the_head_gradient(rng):
    """A tied head trained with ``LinearCE``: the input lookup's gradient goes into the
    head's buffer as rows (no dense ``V x d`` lookup gradient,
    ``embedding_dense_backward``, which the same model with Keras' loss computes), and
    every gradient equals that model's."""
    _needs_torch()
    import keras

    from keras_ce_plugin.large_vocab import LinearCE

    tokens = rng.integers(0, V, (3, 15)).astype("int32")
    labels = rng.integers(0, V, (3, 15)).astype("int32")
    labels[0, 0] = tokens[1, 2] = tokens[2, 2]  # a token looked up twice, labelled once
    fused_ops, fused = _tied_step(LinearCE(token_chunk_size=16), tokens, labels)
    naive_ops, naive = _tied_step(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), tokens, labels
    )
    assert "aten.embedding_dense_backward.default" in naive_ops
    assert "aten.embedding_dense_backward.default" not in fused_ops
    assert "aten.index_add_.default" in fused_ops
    assert [g.shape for g in fused] == [g.shape for g in naive]
    for got, want in zip(fused, naive):  # float32 both ways: GEMM rounding (GRAD_RTOL)
        assert rel_err(got, want) < GRAD_RTOL


# Measured: 10 + 5 + 1 + 1 + 2 + 1 passed in the torch process; this test itself deselected.
NESTED_PASSED = 20


def test_on_torch():
    """This file's tests in a fresh torch process (from the TensorFlow suite)."""
    rerun_from_tensorflow(
        "torch",
        "tests/test_large_vocab_torch.py",
        "-k",
        "not on_torch",
        min_passed=NESTED_PASSED,
        max_skipped=1,
        timeout=600,
    )

"""TensorFlow's own gradient-in-forward pass (``large_vocab/_tf_rows.py``).

On TensorFlow, ``fused_linear_ce_parts``/``fused_linear_ce_sum`` (and so ``LinearCE``
in ``fit``) compute the gradients in the forward pass with TensorFlow's own
cross-entropy kernel over a token chunk's whole logits row, while a gradient tape
records, unless the settings need the generic pass (``filter_eps``, half-precision
matmuls, a soft cap together with label smoothing). Expected values come from the
float64 reference of ``test_large_vocab_torch``; the tolerance is the suite's (1e-5
relative to the largest entry: float32 sums over V = 300 and d = 12).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import spy_on
from test_large_vocab import BACKEND, GRAD_RTOL, RTOL, rel_err
from test_large_vocab_torch import _kwargs, _problem, reference

from keras_ce_plugin.large_vocab.ops import fused_linear_ce_parts

pytestmark = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="TensorFlow's own pass; the README's suite runs on TF"
)

OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "smoothing_zloss": {"label_smoothing": 0.1, "z_loss": 1e-3},
    "cap_zloss": {"logit_soft_cap": 4.0, "z_loss": 1e-3},
    "ignore_weights": {"ignore_class": 7, "weights": True},
    "all_but_cap": {
        "bias": True,
        "label_smoothing": 0.2,
        "z_loss": 1e-4,
        "ignore_class": 7,
        "weights": True,
    },
    "all_but_smoothing": {
        "bias": True,
        "logit_soft_cap": 2.5,
        "z_loss": 1e-4,
        "ignore_class": 7,
        "weights": True,
    },
}


def _reference(h, k, y, u, b, opts, transpose):
    return reference(
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


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of TensorFlow's own pass."""
    from keras_ce_plugin.large_vocab import _tf_rows

    return spy_on(monkeypatch, _tf_rows)


def _run(h, k, y, u, b, kw, graph=None):
    """Value, gradients, per-token loss and log-sum-exp; ``graph``: inside a
    ``tf.function`` (``"graph"``) or an XLA-compiled one (``"xla"``)."""
    import tensorflow as tf

    args = [tf.Variable(a) for a in ((h, k) + ((b,) if b is not None else ()))]

    def step():
        with tf.GradientTape() as tape:
            out = fused_linear_ce_parts(
                args[0], args[1], y, u, bias=args[2] if b is not None else None, **kw
            )
        return out[0], tape.gradient(out[0], args), out[2], out[3]

    if graph:
        step = tf.function(step, jit_compile=graph == "xla")
    total, grads, per_token, lse = step()
    return np.asarray(total), [np.asarray(g) for g in grads], np.asarray(per_token), lse


@pytest.mark.parametrize("graph", [None, "graph", "xla"])
@pytest.mark.parametrize("tv", [None, 64], ids=["one_block", "blocks_of_64"])
@pytest.mark.parametrize("transpose", [False, True], ids=["dxV", "Vxd"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_tf_pass_matches_float64_reference(rng, spy, name, transpose, tv, graph):
    """Every option set, both kernel layouts, the kernel gradient added in one block or
    in blocks of 64 columns (V = 300: the last one 44 wide), eagerly and traced."""
    opts = OPTIONS[name]
    h, k, b, y, u = _problem(rng, opts, transpose)
    total64, loss64, lse64, grads64 = _reference(h, k, y, u, b, opts, transpose)
    kw = _kwargs(opts, transpose, vocab_chunk_size=tv, strategy="in_forward")
    total, grads, per_token, lse = _run(h, k, y, u, b, kw, graph)
    assert spy, "strategy='in_forward' did not take TensorFlow's own pass"
    assert rel_err(total, total64) < RTOL
    assert rel_err(per_token, loss64) < RTOL
    assert rel_err(lse, lse64) < RTOL
    assert len(grads) == len(grads64)
    for got, want in zip(grads, grads64):
        assert rel_err(got, want) < GRAD_RTOL


@pytest.mark.parametrize("graph", [None, "graph", "xla"])
@pytest.mark.parametrize("case", ["random", "all_tied", "two_tied"])
def test_tf_pass_token_accuracy_is_argmax_first_index(rng, spy, case, graph):
    """``correct`` from TensorFlow's own pass is ``argmax(logits) == label``, with
    ``argmax``'s first index on ties (as Keras' accuracy): a zero kernel ties every
    column (only label 0 is right); a bias with two equal maxima at columns 3 and 7
    makes label 3 right and label 7 wrong; random logits with a third of the labels set
    to the row's argmax."""
    h, k, _, y, u = _problem(rng, {}, False)
    b = None
    if case != "random":
        k = np.zeros_like(k)
        y[::3] = 0 if case == "all_tied" else 3
        y[1::3] = 7
    if case == "two_tied":
        b = np.zeros(k.shape[1], "float32")
        b[[3, 7]] = 1.0
    logits = h.astype("float64") @ k.astype("float64") + (0.0 if b is None else b)
    if case == "random":
        y[::3] = logits[::3].argmax(1)
    expected = (logits.argmax(1) == y).astype("float32")
    assert 0 < expected.sum() < len(y), "the case must have right and wrong rows"
    import tensorflow as tf

    kw = _kwargs({}, False, vocab_chunk_size=64, strategy="in_forward")

    def correct():
        with tf.GradientTape() as tape:  # TensorFlow's pass runs where a tape records
            hh = tf.constant(h)
            tape.watch(hh)
            return fused_linear_ce_parts(hh, k, y, u, bias=b, **kw)[1]

    if graph:
        correct = tf.function(correct, jit_compile=graph == "xla")
    np.testing.assert_array_equal(np.asarray(correct()), expected)
    assert spy, "strategy='in_forward' did not take TensorFlow's own pass"


def _traced_pass(rng, spy, transpose=False, **extra):
    """The ``all_but_cap`` problem through the pass in a ``tf.function`` (64-column
    blocks), its value and gradients checked against the float64 reference; returns
    the outputs of ``fused_linear_ce_parts`` and the traced graph's nodes (its
    functions' too)."""
    import tensorflow as tf

    opts = OPTIONS["all_but_cap"]
    h, k, b, y, u = _problem(rng, opts, transpose)
    total64, _, _, grads64 = _reference(h, k, y, u, b, opts, transpose)
    kw = _kwargs(opts, transpose, vocab_chunk_size=64, strategy="in_forward")
    args = [tf.Variable(a) for a in (h, k, b)]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = fused_linear_ce_parts(args[0], args[1], y, u, bias=args[2], **kw, **extra)
        return out, tape.gradient(out[0], args)

    out, grads = step()
    assert spy, "strategy='in_forward' did not take TensorFlow's own pass"
    assert rel_err(np.asarray(out[0]), total64) < RTOL
    for got, want in zip(grads, grads64):
        assert rel_err(np.asarray(got), want) < GRAD_RTOL
    graph = step.get_concrete_function().graph.as_graph_def()
    return out, [list(graph.node)] + [list(f.node_def) for f in graph.library.function]


def _waits_on_products(functions) -> int:
    """How many of the traced pass's ``Identity`` ops (``impl.after``) wait on a matmul:
    a kernel-gradient product held back until the product before it is computed."""
    count = 0
    for nodes in functions:
        op_of = {n.name: n.op for n in nodes}
        for n in nodes:
            deps = [i[1:].split(":")[0] for i in n.input if i.startswith("^")]
            if n.op == "Identity" and any(
                op_of.get(d) in ("MatMul", "BatchMatMulV2") for d in deps
            ):
                count += 1
    return count


@pytest.mark.parametrize("small", [True, False], ids=["two_at_once", "one_at_a_time"])
@pytest.mark.parametrize("transpose", [False, True], ids=["dxV", "Vxd"])
def test_small_kernel_gradient_products_run_two_at_once(rng, spy, monkeypatch, small, transpose):
    """Small kernel-gradient products (narrow blocks, which TensorFlow's oneDNN runs on
    one thread) wait only for the add two blocks back, so two run at once; larger ones
    (here: every product, with the threshold at 0) also wait for the product before
    them. The traced graph shows which, and both give the float64 reference's values."""
    from keras_ce_plugin.large_vocab import _tf_rows

    if not small:
        monkeypatch.setattr(_tf_rows, "SMALL_PRODUCT_BYTES", 0)
    _, functions = _traced_pass(rng, spy, transpose)
    waits = _waits_on_products(functions)
    assert (waits == 0) == small, waits


@pytest.mark.parametrize("return_correct", [True, False])
def test_without_correct_the_pass_never_reduces_a_row(rng, spy, return_correct):
    """``return_correct=False`` gives ``None`` for the correctness, the same loss and
    gradients (float64 reference), and a traced pass with no ``Max``/``ArgMax`` op:
    the row's ``reduce_max`` and ``argmax`` are what token accuracy costs. With
    ``return_correct=True`` the same graph has them (so the check can fail)."""
    out, functions = _traced_pass(rng, spy, return_correct=return_correct)
    ops_ = {n.op for nodes in functions for n in nodes}
    assert ({"Max", "ArgMax"} <= ops_) == return_correct, sorted(ops_)
    assert (out[1] is None) == (not return_correct)


@pytest.mark.parametrize(
    ("opts", "extra", "own"),
    [
        ("all_but_cap", {"token_chunk_size": None}, True),  # one chunk of all 45 rows
        ("all_but_cap", {}, False),  # chunks of 16 < MIN_ROWS rows: recomputing is faster
        ("all_but_cap", {"strategy": "in_forward"}, True),
        ("all_but_cap", {"strategy": "recompute", "token_chunk_size": None}, False),
        ("all_but_cap", {"filter_eps": "auto", "token_chunk_size": None}, False),
        ("all_but_cap", {"strategy": "in_forward", "filter_eps": "auto"}, False),
        ("cap_smoothing", {"token_chunk_size": None}, False),  # cap makes smoothing full rank
        ("cap_smoothing", {"strategy": "in_forward"}, False),
    ],
    ids=[
        "default_one_chunk",
        "default_small_chunks",
        "in_forward",
        "recompute",
        "filter",
        "in_forward_filter",
        "cap_smoothing",
        "cap_smoothing_in_forward",
    ],
)
def test_which_pass_and_the_same_result(rng, spy, opts, extra, own):
    """Which pass runs (``MIN_ROWS`` is 256: the default takes TensorFlow's own pass for
    token chunks that large or one chunk of all rows), and every pass is exact."""
    options = OPTIONS.get(opts) or {"bias": True, "logit_soft_cap": 2.5, "label_smoothing": 0.2}
    h, k, b, y, u = _problem(rng, options, False)
    total64, _, _, grads64 = _reference(h, k, y, u, b, options, False)
    total, grads, _, _ = _run(h, k, y, u, b, _kwargs(options, False, **extra))
    assert bool(spy) == own
    assert rel_err(total, total64) < RTOL
    for got, want in zip(grads, grads64):
        assert rel_err(got, want) < GRAD_RTOL


def test_half_precision_matmuls_take_the_generic_pass(rng, spy):
    """``matmul_precision="input"`` with bfloat16 inputs: the generic pass (its half
    matmuls); float32 matmuls of bfloat16 inputs: TensorFlow's own pass."""
    import tensorflow as tf

    h, k, _, y, u = _problem(rng, {}, False)
    hh, kk = (tf.Variable(tf.cast(x, tf.bfloat16)) for x in (h, k))
    with tf.GradientTape():
        fused_linear_ce_parts(hh, kk, y, u, matmul_precision="input")
    assert not spy
    with tf.GradientTape():
        fused_linear_ce_parts(hh, kk, y, u)
    assert spy


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
def test_no_tape_runs_the_forward_pass_only(rng, spy, graph):
    """No gradient tape recording (``evaluate``, ``predict``), or ``compute_grads=False``:
    no gradient computed in the forward pass, which no backward pass would use."""
    import tensorflow as tf

    h, k, _, y, u = _problem(rng, {}, False)
    total64 = reference(h, k, y, u, None, transpose=False)[0]

    def both():
        return (
            fused_linear_ce_parts(h, k, y, u)[0],
            fused_linear_ce_parts(h, k, y, u, compute_grads=False)[0],
        )

    for total in (tf.function(both) if graph else both)():
        assert rel_err(np.asarray(total), total64) < RTOL
    assert not spy


def _zero_factor_zloss(lse: np.float32) -> float:
    """A z-loss coefficient for which ``1 + 2 * z_loss * lse`` is exactly 0 in float32
    (as ``_tf_rows._factors`` computes it): the row's softmax term vanishes."""
    start = np.float32(-1.0 / float(lse))
    for steps in range(-8, 9):
        two_z = np.float32(start)
        for _ in range(abs(steps)):
            two_z = np.nextafter(two_z, np.float32(np.inf if steps > 0 else -np.inf))
        if np.float32(1.0) + two_z * lse == 0:
            return float(two_z) / 2.0
    raise AssertionError(f"no float32 z-loss cancels lse={lse}")


def test_zloss_factor_of_exactly_zero_keeps_the_one_hot_term(rng, spy):
    """Where ``1 + 2 * z_loss * lse`` is exactly 0 the gradient is the one-hot and
    smoothing terms alone; the pass must not divide them away."""
    h, k, b, y, u = _problem(rng, {"bias": True}, False)
    h[:] = h[0]  # every row the same: one log-sum-exp
    y[:] = 3
    b = b - 60.0  # all logits negative: lse < 0, so a positive z-loss can cancel it
    lse = fused_linear_ce_parts(h, k, y, u, bias=b, return_lse=True, compute_grads=False)[3]
    zloss = _zero_factor_zloss(np.float32(np.asarray(lse)[0]))
    opts = {"bias": True, "label_smoothing": 0.1, "z_loss": zloss}
    total64, _, _, grads64 = _reference(h, k, y, u, b, opts, False)
    total, grads, _, _ = _run(h, k, y, u, b, _kwargs(opts, False, strategy="in_forward"))
    assert spy
    assert rel_err(total, total64) < RTOL
    for got, want in zip(grads, grads64):
        assert rel_err(got, want) < GRAD_RTOL


@pytest.mark.parametrize("head_kind", ["tied", "dense"])
def test_fit_takes_the_pass_and_evaluate_does_not(rng, spy, head_kind):
    """``LinearCE`` in ``fit`` (a recording tape) takes TensorFlow's own pass and
    follows the naive loss curve; ``evaluate`` (no tape) runs the forward pass only."""
    import keras
    from test_large_vocab import lm_data, tiny_lm

    from keras_ce_plugin.large_vocab import LinearCE

    x, y, sw = lm_data(rng)
    naive, fused = tiny_lm(head_kind), tiny_lm(head_kind)
    fused.set_weights(naive.get_weights())
    naive.compile(keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(True))
    fused.compile(keras.optimizers.SGD(0.5), LinearCE(vocab_chunk_size=40))  # one token chunk
    fit = {"sample_weight": sw, "batch_size": 4, "epochs": 2, "verbose": 0, "shuffle": False}
    h1, h2 = naive.fit(x, y, **fit), fused.fit(x, y, **fit)
    assert spy, "fit did not take TensorFlow's own pass"
    assert rel_err(h2.history["loss"], h1.history["loss"]) <= RTOL
    traced = len(spy)
    ev = fused.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    ev_naive = naive.evaluate(x, y, sample_weight=sw, verbose=0, return_dict=True)
    assert len(spy) == traced, "evaluate computed gradients in the forward pass"
    assert abs(ev["loss"] - ev_naive["loss"]) <= RTOL * abs(ev_naive["loss"])

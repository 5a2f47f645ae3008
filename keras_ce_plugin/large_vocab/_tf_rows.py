"""Gradient in the forward pass on TensorFlow, one token chunk's whole logits row at a time.

The TensorFlow backend's ``strategy="in_forward"``. Per token chunk, one matmul gives
the ``(tn, V)`` logits and TensorFlow's own cross-entropy kernel (the naive loss's
``SparseSoftmaxCrossEntropyWithLogits``) turns them, in one threaded pass and in
their own buffer, into the rows' loss and ``softmax - onehot``. What a setting adds
is kept off the ``(tn, V)`` row, where every extra step would be one more pass or a
copy:

- the token weight ``u`` and z-loss's ``1 + 2 * z_loss * lse`` are one factor ``a``
  per row, applied to ``h`` before the kernel-gradient matmul and to the ``(tn, d)``
  hidden gradient after its matmul;
- the one-hot part of label smoothing and z-loss, ``(c + eps) / (1 + c)`` per row
  (``a`` scales it back), goes into the hidden gradient as the label's kernel column
  and into each ``tn x tv`` block of the kernel gradient as one entry per row;
- label smoothing's uniform part ``-u * eps / V`` is rank one: the kernel's column sum
  for the hidden gradient, and ``sum(u * eps / V * h)`` on every column of the kernel
  gradient, once at the end.

The kernel gradient is added one vocabulary block at a time (``d x tv``, never
``d x V``) into one buffer, in place; each block's add (memory-bound, and run row by
row by TensorFlow) overlaps the next block's product, so two blocks are alive; small
products (narrow blocks, which oneDNN runs on one thread) also run two at once. Three
matmul passes, as the naive loss, and nothing recomputed; the price is re-reading the
``d x V`` gradient once per token chunk, which is why the chunks keep whole rows
under a larger budget (``_sizes``).
A soft cap adds its ``tanh`` and its derivative (one fused kernel) and one product.

Used where :func:`supported` holds: float32 matmuls, no gradient filtering, and not a
soft cap together with label smoothing (the cap's derivative makes the uniform part
full rank); other settings take the generic pass.
"""

from __future__ import annotations

import functools
from typing import Any

import tensorflow as tf

from keras_ce_plugin.large_vocab import _tensorflow as impl
from keras_ce_plugin.large_vocab._chunked import (
    _back,
    _chunk_rows,
    _chunks,
    _finish,
    _matmul,
    _Rows,
    _Spec,
    _unsort,
)
from keras_ce_plugin.large_vocab._sizes import Held

# Stands in for a row factor ``1 + 2 * z_loss * lse`` that is exactly 0, so that the
# row's one-hot part, divided by it and multiplied back, survives (``_factors``): the
# softmax term it then leaves is 1e-20 of its true size, 0.
_TINY = 1e-20


# Fewest rows per token chunk for this pass to beat recomputation: it re-reads the
# d x V kernel gradient once per chunk, a cost that grows as the chunks shrink.
MIN_ROWS = 256


def supported(spec: _Spec) -> bool:
    """Whether this pass computes the loss with these settings."""
    return (
        spec.mm_dtype == "float32"
        and not spec.filter_eps
        and not (spec.cap is not None and spec.smoothing)
    )


def worth_it(spec: _Spec, tokens: int | None) -> bool:
    """Whether ``strategy=None`` should take this pass: token chunks of at least
    ``MIN_ROWS`` rows, or one chunk holding all ``tokens``."""
    return spec.tn >= MIN_ROWS or (tokens is not None and spec.tn >= tokens)


def grad_enabled() -> bool:
    """Whether a backward pass may follow: a ``GradientTape`` is recording (``fit``'s
    training step, not ``evaluate``'s). True where TensorFlow cannot tell."""
    try:
        from tensorflow.python.eager import record
    except ImportError:  # pragma: no cover - TensorFlow layout changed
        return True
    return bool(record.could_possibly_record())


# Operands (float32 bytes) below which a kernel-gradient product runs beside the next
# one: TensorFlow's oneDNN runs a product whose operands fit in the L2 cache on one
# thread, and those up to a few times larger scale poorly over the cores.
SMALL_PRODUCT_BYTES = 8 * 2**20


def two_at_once(tn: int, dim: int, tv: int) -> bool:
    """Whether a ``tn``-row chunk's ``d x tv`` kernel-gradient products are small enough
    to run two at once (one at a time they leave a core idle)."""
    return 4 * (dim * tv + tn * (dim + tv)) < SMALL_PRODUCT_BYTES


def held(capped: bool) -> Held:
    """What this pass holds per token chunk (``_sizes``): the logits row (its gradient
    is written over it) and, with a soft cap, its derivative; two ``d x tv`` kernel-
    gradient blocks and the ``tn x tv`` copies of the row they are computed from (two
    where small products run two at once)."""
    return Held(row_buffers=2 if capped else 1, kernel_blocks=2, row_blocks=2)


@functools.lru_cache(maxsize=16)
def _cap_kernel(cap: float):
    """``(cap * tanh(z / cap), 1 - tanh(z / cap)**2)`` in one fused kernel."""

    def capped(z):
        t = tf.tanh(z / cap)
        return cap * t, 1.0 - tf.square(t)

    return impl.fuse(capped)


def _logits(h: Any, kernel: Any, bias: Any, spec: _Spec) -> Any:
    z = _matmul(impl, h, kernel, spec)
    return z if bias is None else tf.nn.bias_add(z, bias)


def _factors(u: Any, lse: Any, spec: _Spec) -> tuple[Any, Any]:
    """The row factor ``a`` (``u`` times z-loss's ``1 + 2 z lse``) and the one-hot entry
    ``r`` to add to ``softmax - onehot`` (None when there is none), so that
    ``a * (softmax - onehot + r * onehot)`` is the loss's gradient (uniform part aside)."""
    if not spec.zloss:
        return u, (spec.smoothing if spec.smoothing else None)
    c = 2.0 * spec.zloss * lse
    scale = 1.0 + c
    scale = tf.where(tf.equal(scale, 0.0), _TINY, scale)
    return u * scale, (c + spec.smoothing) / scale


def _label_columns(kernel: Any, lab: Any, spec: _Spec) -> Any:
    """The kernel's column of each row's label, ``(tn, d)``."""
    return (
        tf.gather(kernel, lab) if spec.transpose else tf.transpose(tf.gather(kernel, lab, axis=1))
    )


def _label_argmax(s: Any, lab: Any, tgt: Any, spec: _Spec) -> Any:
    """Per row, ``argmax(s)`` on the rows whose label holds the row's largest logit and
    -1 on the others: equal to the label exactly where ``argmax(s)`` is, which is what
    token accuracy needs, and cheaper than ``tf.argmax`` over the whole row.

    One threaded ``reduce_max`` finds the rows whose label holds the largest logit
    (``tgt == max``); only those rows can be correct, and only there a tie with an
    earlier column could make ``argmax`` pick another one. ``tf.argmax`` (first index
    of the maximum, as Keras' accuracy) runs on those rows alone, a few at a time (no
    more of them than fit in one ``tn x tv`` block), so its cost follows the share of
    rows predicted right. Under XLA (no dynamic shapes), ``tf.argmax`` of the row.
    """
    if impl._in_xla():
        return tf.argmax(s, axis=1, output_type=tf.int32)
    top = tf.where(tf.equal(tgt, tf.reduce_max(s, axis=1)))[:, 0]
    group = max(1, spec.tn * spec.tv // spec.vocab)
    out = tf.fill(tf.shape(lab), -1)

    def body(start, out):
        rows = top[start : start + group]
        first = tf.argmax(tf.gather(s, rows), axis=1, output_type=tf.int32)
        return start + group, tf.tensor_scatter_nd_update(out, rows[:, None], first)

    return tf.while_loop(
        lambda start, _: start < tf.size(top, out_type=tf.int64),
        body,
        (tf.constant(0, tf.int64), out),
        parallel_iterations=1,
    )[1]


def grads_in_forward(rows: _Rows, kernel: Any, bias: Any, spec: _Spec, kernel_grad: bool):
    """As ``_chunked._grads(..., fused=True)``: ``(dh, dk, db, loss_b, lse_b, amax_b)``,
    the gradients of ``sum(u * loss)`` and the per-row loss, log-sum-exp and argmax."""
    kernel = tf.cast(tf.stop_gradient(kernel), tf.float32)
    bias = None if bias is None else tf.cast(tf.stop_gradient(bias), tf.float32)
    tn, dim, vocab, tv = spec.tn, spec.dim, spec.vocab, spec.tv
    total = rows.n_pad // tn
    with_dk, with_db = kernel_grad, bias is not None and kernel_grad
    uniform = spec.smoothing / vocab
    # The kernel's column sums, for the hidden gradient's uniform part (rank one).
    ksum = tf.reduce_sum(kernel, axis=0 if spec.transpose else 1) if uniform else None
    arange = tf.range(tn)

    def body(i, bufs):
        dh_b, dk, db, hsum, loss_b, lse_b, amax_b = bufs
        h, lab, u = _chunk_rows(rows, i, spec)
        h = impl.after(h, bufs)  # one token chunk at a time: after the previous one's writes
        s = _logits(h, kernel, bias, spec)
        keep = None
        if spec.cap is not None:
            s, keep = _cap_kernel(spec.cap)(s)
        idx = tf.stack([arange, lab], axis=1)
        tgt = tf.gather_nd(s, idx)
        ssum = tf.reduce_sum(s, axis=1) if spec.smoothing else None
        if spec.correct:
            amax = _label_argmax(s, lab, tgt, spec)
        else:  # no token accuracy: no pass over the row for it
            amax = tf.fill(tf.shape(lab), -1)
        deps = [tgt, amax] + ([ssum] if ssum is not None else [])
        # The kernel writes the gradient over `s` once everything else has read it.
        xent, g = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(
            features=impl.after(s, deps), labels=lab
        )
        lse = xent + tgt
        loss, lse, _ = _finish((lse, tf.ones_like(lse), tgt, ssum, amax), spec)
        a, r = _factors(u, lse, spec)
        # The one-hot entry, kept off the row (adding it there would copy the row):
        # its coefficient on the label's column, cap's derivative included.
        hot = None
        if r is not None:
            hot = r * tf.ones_like(u) if keep is None else r * tf.gather_nd(keep, idx)
        if keep is not None:
            g = g * keep
        dh = _back(impl, g, kernel, spec)  # (tn, d)
        if hot is not None:
            dh = dh + hot[:, None] * _label_columns(kernel, lab, spec)
        dh = a[:, None] * dh
        if ksum is not None:
            dh = dh - (u * uniform)[:, None] * ksum[None, :]
            hsum = hsum + tf.linalg.matvec(h, u * uniform, transpose_a=True)
        if with_dk:
            dk = _add_kernel_grad(dk, g, h * a[:, None], lab, hot, spec)
        if with_db:
            db = db + tf.linalg.matvec(g, a, transpose_a=True)
            if hot is not None:
                db = db + tf.math.unsorted_segment_sum(a * hot, lab, vocab)
        return (
            impl.set_row(dh_b, i, dh),
            dk,
            db,
            hsum,
            impl.set_row(loss_b, i, loss),
            impl.set_row(lse_b, i, lse),
            impl.set_row(amax_b, i, amax),
        )

    init = (
        impl.zeros((total, tn, dim)),
        impl.kernel_grad_buffer(dim, vocab, tv, spec.transpose) if with_dk else tf.zeros((1,)),
        tf.zeros((vocab,)) if with_db else tf.zeros((1,)),
        tf.zeros((dim,)),
        impl.zeros((total, tn)),
        impl.zeros((total, tn)),
        impl.zeros((total, tn), "int32"),
    )
    dh_b, dk, db, hsum, loss_b, lse_b, amax_b = tf.while_loop(
        lambda i, _: i < rows.n_chunks,
        lambda i, bufs: (i + 1, body(i, bufs)),
        (tf.constant(0), init),
        parallel_iterations=1,  # one chunk's row at a time
    )[1]
    dh = _unsort(rows, tf.reshape(dh_b, (-1, dim)))
    if with_dk:
        dk = impl.finish_kernel_grad(dk, dim, vocab, spec.transpose)
        if uniform:  # the uniform part of every row, on every column
            dk = dk - (hsum[None, :] if spec.transpose else hsum[:, None])
    if with_db and uniform:
        db = db - tf.reduce_sum(rows.u) * uniform
    return dh, (dk if with_dk else None), (db if with_db else None), loss_b, lse_b, amax_b


def _add_kernel_grad(dk: Any, g: Any, ha: Any, lab: Any, hot: Any, spec: _Spec) -> Any:
    """``dk`` plus this chunk's kernel gradient ``ha.T @ (g + hot * onehot)``, one
    vocabulary chunk of ``g`` at a time (a ``d x tv`` product, never ``d x V``), two
    products alive at a time. Each product waits for the add two blocks before it;
    a large one also for the product before it (one at a time), while small ones
    (:func:`two_at_once`) run two at once."""
    tn = int(g.shape[0])
    both = two_at_once(tn, spec.dim, spec.tv)
    deps = [dk]
    for c0, c1 in _chunks(spec):
        block = impl.after(g, deps)[:, c0:c1]  # a copy of tn x tv
        if hot is not None:
            inside = tf.logical_and(lab >= c0, lab < c1)
            where = tf.stack([tf.range(tn), tf.clip_by_value(lab - c0, 0, c1 - c0 - 1)], axis=1)
            block = tf.tensor_scatter_nd_add(block, where, tf.where(inside, hot, 0.0))
        part = (
            tf.matmul(block, ha, transpose_a=True)
            if spec.transpose
            else tf.matmul(ha, block, transpose_a=True)
        )
        # The adds, into one buffer, run in order, each beside the next product.
        deps = [dk] if both else [part, dk]
        dk = impl.add_kernel_grad(dk, part, c0, spec.dim, spec.vocab, spec.tv, spec.transpose)
    return dk

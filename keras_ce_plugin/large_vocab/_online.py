"""A frozen head's hidden gradient in the forward pass, accumulated online.

With the kernel and bias constant (a frozen head: LoRA, a frozen embedding) the only
gradient is the hidden one. Per token ``i``, with softmax ``p``, the soft cap's
derivative ``c`` (1 without a cap), label ``t``, label smoothing ``s`` and z-loss ``z``:

    dh_i = u_i * ((1 + 2 z lse_i) * sum_j p_ij c_ij W_j - (1 - s) c_it W_t - (s / V) sum_j W_j)

The first sum is accumulated vocabulary chunk by chunk with the running maximum of the
online log-sum-exp (rescaled as flash attention rescales its output), so one pass of
two matmuls per chunk gives the loss and ``dh``: the matmuls the naive loss does, and
no logits recomputed. The backward pass only scales ``dh``. Label smoothing together
with a soft cap would need a second accumulator (``sum_j c_ij W_j``): that case keeps
the recomputing path (:func:`supported`).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_ce_plugin.large_vocab._chunked import (
    _after,
    _back,
    _bias_chunk,
    _block,
    _chunk_rows,
    _chunks,
    _elementwise,
    _finish,
    _i32,
    _init_state,
    _matmul,
    _Rows,
    _Spec,
)


def supported_by(smoothing: Any, cap: Any, filter_eps: Any) -> bool:
    """Whether the online pass computes a loss with these settings (not: smoothing with a
    soft cap, nor gradient filtering, which only the recomputing pass does)."""
    return not (smoothing and cap is not None) and not filter_eps


def _target_rows(kernel, lab, spec: _Spec):
    """``W_t`` of each row's label, ``(tn, d)`` float32 (a gather, no matmul)."""
    if spec.transpose:
        return ops.cast(ops.take(kernel, lab, axis=0), "float32")
    return ops.transpose(ops.cast(ops.take(kernel, lab, axis=1), "float32"))


def _kernel_sum(kernel, spec: _Spec):
    """``sum_j W_j`` over the vocabulary, ``(d,)`` float32, one chunk at a time."""
    total = None
    for c0, c1 in _chunks(spec):
        blk = ops.cast(_block(kernel, c0, c1, spec), "float32")
        part = ops.sum(blk, axis=0 if spec.transpose else 1)
        total = part if total is None else total + part
    return total


def forward(impl, rows: _Rows, kernel, bias, spec: _Spec):
    """Per-row loss, log-sum-exp, argmax ``(chunks, tn)`` and ``d(sum u * loss)/dh``
    ``(chunks, tn, d)``, rows in the sorted order of ``rows``."""
    fold, _ = _elementwise(
        keras.backend.backend(), spec.cap, spec.smoothing, spec.vocab, bias is not None, online=True
    )
    n_total = rows.n_pad // spec.tn
    smooth_sum = _kernel_sum(kernel, spec) if spec.smoothing else None

    def body(i, bufs):
        loss_b, lse_b, amax_b, dh_b = bufs
        h, lab, u = _chunk_rows(rows, i, spec)
        h = impl.after(h, dh_b)  # one token chunk at a time
        state = _init_state(spec.tn)
        acc = ops.zeros((spec.tn, spec.dim), "float32")
        for c0, c1 in _chunks(spec):
            w, h_c, lab_c = _after(impl, (acc, state), kernel, h, lab, c0, c1, spec)
            z = _matmul(impl, h_c, w, spec)
            *folded, e, alpha = fold(z, _bias_chunk(bias, c0, c1), lab_c, _i32(c0), *state)
            state = tuple(folded)
            part = _back(impl, e, w, spec)
            acc = acc * alpha[:, None] + part
        loss, lse, amax = _finish(state, spec)
        scale = 1.0 / state[1]
        if spec.zloss:
            scale = scale * (1.0 + 2.0 * spec.zloss * lse)
        target = (1.0 - spec.smoothing) * _target_rows(kernel, lab, spec)
        if spec.cap is not None:  # state[2]: the capped target logit
            target = target * (1.0 - ops.square(state[2] / spec.cap))[:, None]
        dh = acc * scale[:, None] - target
        if smooth_sum is not None:
            dh = dh - (spec.smoothing / spec.vocab) * smooth_sum[None, :]
        dh = dh * u[:, None]
        return (
            impl.set_row(loss_b, i, loss),
            impl.set_row(lse_b, i, lse),
            impl.set_row(amax_b, i, amax),
            impl.set_row(dh_b, i, dh),
        )

    init = (
        impl.zeros((n_total, spec.tn)),
        impl.zeros((n_total, spec.tn)),
        impl.zeros((n_total, spec.tn), "int32"),
        impl.zeros((n_total, spec.tn, spec.dim)),
    )
    return ops.fori_loop(0, rows.n_chunks, body, init)

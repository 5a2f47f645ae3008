"""The chunked machinery behind :mod:`keras_ce_plugin.large_vocab.ops`.

Shape checks, the per-chunk elementwise kernels (online log-sum-exp, logits gradient),
the token loop of the forward pass and of the gradient pass, and the row sorting
that skips ignored tokens. Backend specifics (in-place buffers, matmuls with
transposed operands, XLA fusion) come from ``_tensorflow``/``_jax``/``_torch``, imported on
first use only.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, NamedTuple

import keras
from keras import ops

from keras_ce_plugin.large_vocab._checks import _check_cap, _check_precision
from keras_ce_plugin.large_vocab._sizes import Held, static_rows
from keras_ce_plugin.losses import _check_ignore_class, _check_label_smoothing

_HALF = ("float16", "bfloat16")


class _Spec(NamedTuple):
    dim: int
    vocab: int
    transpose: bool
    cap: float | None
    smoothing: float
    tn: int
    tv: int
    zloss: float = 0.0  # PaLM's z-loss coefficient: loss += zloss * lse**2
    mm_dtype: str = "float32"  # logits and kernel-gradient matmuls (matmul_precision="input")
    filter_eps: float = 0.0  # skip gradient blocks below it (filter_eps; 0: exact)
    correct: bool = True  # the per-row argmax (token accuracy); False: passes may skip it


def _backend() -> Any:
    name = keras.backend.backend()
    impl: ModuleType
    if name == "tensorflow":
        from keras_ce_plugin.large_vocab import _tensorflow

        impl = _tensorflow
    elif name == "jax":
        from keras_ce_plugin.large_vocab import _jax

        impl = _jax
    elif name == "torch":
        from keras_ce_plugin.large_vocab import _torch

        impl = _torch
    else:
        raise NotImplementedError(
            "`linear_ce` needs a custom gradient and in-place buffers, implemented for the "
            f"TensorFlow, JAX and torch backends. Received: backend={name!r}"
        )
    return impl


def _mm_dtype(hidden: Any, kernel: Any, precision: Any) -> str:
    """The matmuls' operand dtype: float32, or with ``matmul_precision="input"`` the
    half dtype of ``hidden`` (the products then come out in it, as the naive head's
    do) if the kernel has it too or is float32 (mixed precision's variable: each block
    is cast, as the head casts it, and the kernel gradient stays float32)."""
    precision = _check_precision(precision)
    dtype = keras.backend.standardize_dtype(hidden.dtype)
    ok = keras.backend.standardize_dtype(kernel.dtype) in (dtype, "float32")
    return dtype if precision == "input" and ok and dtype in _HALF else "float32"


def _to(x: Any, dtype: str) -> Any:
    return x if keras.backend.standardize_dtype(x.dtype) == dtype else ops.cast(x, dtype)


def _spec(
    hidden, kernel, bias, transpose, cap, smoothing, tn, tv, held: Held, budget=None
) -> _Spec:
    if not isinstance(transpose, bool):
        raise TypeError(
            f"`transpose_kernel` must be a bool. Received: transpose_kernel={transpose!r}"
        )
    if len(kernel.shape) != 2:
        raise ValueError(f"`kernel` must be 2-D. Received: kernel.shape={tuple(kernel.shape)}")
    dim, vocab = (kernel.shape[1], kernel.shape[0]) if transpose else tuple(kernel.shape)
    if dim is None or vocab is None:
        raise ValueError(f"`kernel` needs a static shape. Received: kernel.shape={kernel.shape}")
    if len(hidden.shape) < 2 or hidden.shape[-1] != dim:
        layout = "(V, d)" if transpose else "(d, V)"
        raise ValueError(
            f"`hidden` must have shape (..., d) with d={dim} for a {layout} kernel. "
            f"Received: hidden.shape={tuple(hidden.shape)}, kernel.shape={tuple(kernel.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(
            f"`bias` must have shape ({vocab},). Received: bias.shape={tuple(bias.shape)}"
        )
    tn, tv = held.sizes(static_rows(hidden), int(dim), int(vocab), budget, tn, tv)
    return _Spec(int(dim), int(vocab), transpose, _check_cap(cap), smoothing, tn, tv)


def _chunks(spec: _Spec) -> list[tuple[int, int]]:
    return [(c, min(c + spec.tv, spec.vocab)) for c in range(0, spec.vocab, spec.tv)]


def _block(kernel, c0: int, c1: int, spec: _Spec):
    blk = kernel[c0:c1] if spec.transpose else kernel[:, c0:c1]
    return _to(blk, spec.mm_dtype)


def _after(impl, dep, kernel, h, lab, c0: int, c1: int, spec: _Spec):
    """The chunk's kernel block, hidden rows and labels, once ``dep`` (the previous
    chunk's results) is computed: one chunk at a time. The labels too, or XLA computes
    every chunk's one-hot mask (it depends on the labels alone) up front and keeps
    them all (``tn x V``)."""
    kernel, h, lab = impl.after((kernel, h, lab), dep)
    return _block(kernel, c0, c1, spec), h, lab


def _matmul(impl, h, w, spec: _Spec):
    """Pre-bias logits of one chunk, ``(tn, w)`` float32."""
    return _to(impl.mm_nt(h, w) if spec.transpose else ops.matmul(h, w), "float32")


def _back(impl, g, w, spec: _Spec):
    """``g @ W_chunk.T`` (a hidden-gradient part), ``(tn, d)``, always in float32:
    ``dh`` sums one part per vocabulary chunk, and a half-precision matmul would round
    each of them (the naive head rounds its single product once)."""
    w = _to(w, "float32")
    return ops.matmul(g, w) if spec.transpose else impl.mm_nt(g, w)


@functools.lru_cache(maxsize=64)
def _elementwise(
    backend: str,
    cap: float | None,
    smoothing: float,
    vocab: int,
    bias: bool,
    zloss: float = 0.0,
    online: bool = False,
    filtered: bool = False,
):
    """The per-chunk elementwise work, compiled into one fused kernel per backend.

    ``fold(z, b, lab, c0, m, total, tgt, ssum, amax)`` folds the pre-bias logits ``z`` of
    one chunk into the online state; with ``online`` (a frozen head's one-pass
    gradient, ``_online``) it also returns ``exp(s - new_max)`` times the soft cap's
    derivative (``tn x w``) and the rescale ``exp(m - new_max)``.
    ``dlogits(z, b, lab, c0, lse, u)`` gives d(u * loss)/d(pre-cap logits) and its column
    sum (with ``filtered``, also its largest magnitude). The capped logits are never
    written to memory.
    """
    impl = _backend()

    def capped(z, b):
        s = z + b[None, :] if bias else z
        return s if cap is None else cap * ops.tanh(s / cap)

    def fold(z, b, lab, c0, m, total, tgt, ssum, amax):
        s = capped(z, b)
        cols = c0 + ops.arange(0, ops.shape(s)[1], dtype="int32")
        is_t = ops.equal(lab[:, None], cols[None, :])
        tgt = tgt + ops.sum(ops.where(is_t, s, 0.0), axis=1)
        cmax = ops.max(s, axis=1)
        new_m = ops.maximum(m, cmax)
        alpha = ops.exp(m - new_m)
        e = ops.exp(s - new_m[:, None])
        total = total * alpha + ops.sum(e, axis=1)
        amax = ops.where(cmax > m, ops.cast(ops.argmax(s, axis=1), "int32") + c0, amax)
        if smoothing:
            ssum = ssum + ops.sum(s, axis=1)
        if not online:
            return new_m, total, tgt, ssum, amax
        if cap is not None:
            e = e * (1.0 - ops.square(s / cap))
        return new_m, total, tgt, ssum, amax, e, alpha

    def dlogits(z, b, lab, c0, lse, u):
        s = capped(z, b)
        cols = c0 + ops.arange(0, ops.shape(s)[1], dtype="int32")
        is_t = ops.equal(lab[:, None], cols[None, :])
        g = ops.exp(s - lse[:, None])
        if zloss:  # d(zloss * lse**2)/ds = 2 * zloss * lse * softmax
            g = g * (1.0 + 2.0 * zloss * lse[:, None])
        g = ops.where(is_t, g - (1.0 - smoothing), g)
        if smoothing:
            g = g - smoothing / vocab
        g = g * u[:, None]
        if cap is not None:
            g = g * (1.0 - ops.square(s / cap))
        if filtered:
            return g, ops.sum(g, axis=0), ops.max(ops.abs(g))
        return g, ops.sum(g, axis=0)

    return impl.fuse(fold), impl.fuse(dlogits)


def _kernels(spec: _Spec, bias):
    return _elementwise(
        keras.backend.backend(),
        spec.cap,
        spec.smoothing,
        spec.vocab,
        bias is not None,
        spec.zloss,
        filtered=spec.filter_eps > 0,
    )


def _unless(impl, live, matmul, shape):
    """``matmul()``; with gradient filtering (``live`` not None: Cut Cross-Entropy's
    ``filter_eps``), zeros of ``shape`` and no matmul where ``live`` is false (a fresh
    buffer: TensorFlow would fold constant zeros into the graph, one per block)."""
    if live is None:
        return matmul()
    return ops.cond(live, matmul, lambda: impl.zeros(shape))


def _kernel_block(impl, g, h, spec: _Spec):
    """The kernel gradient of one logits-gradient block ``g``, float32."""
    gm = _to(g, spec.mm_dtype)
    return _to(impl.mm_tn(gm, h) if spec.transpose else impl.mm_tn(h, gm), "float32")


def _bias_chunk(bias, c0: int, c1: int):
    return ops.zeros((1,), "float32") if bias is None else ops.cast(bias[c0:c1], "float32")


def _init_state(tn: int):
    zero = ops.zeros((tn,), "float32")
    return (ops.full((tn,), -float("inf"), "float32"), zero, zero, zero, ops.zeros((tn,), "int32"))


def _finish(state, spec: _Spec):
    m, total, tgt, ssum, amax = state
    lse = m + ops.log(total)
    loss = lse - (1.0 - spec.smoothing) * tgt
    if spec.smoothing:
        loss = loss - (spec.smoothing / spec.vocab) * ssum
    if spec.zloss:
        loss = loss + spec.zloss * ops.square(lse)
    return loss, lse, amax


class _Rows(NamedTuple):
    h: Any  # (n_pad, d) float32, active rows first
    lab: Any  # (n_pad,) int32
    u: Any  # (n_pad,) float32 weights (0 on inactive rows)
    perm: Any  # None, or the row order used
    n: Any  # number of rows (int or scalar tensor)
    n_pad: Any
    n_chunks: Any  # chunks holding active rows


def _rows(h2, lab, active, u, spec: _Spec, sort: bool) -> _Rows:
    n = h2.shape[0] if h2.shape[0] is not None else ops.shape(h2)[0]
    perm = None
    if sort:
        perm = ops.argsort(ops.cast(ops.logical_not(active), "int32"))
        h2, lab, u = ops.take(h2, perm, axis=0), ops.take(lab, perm), ops.take(u, perm)
        n_active = ops.sum(ops.cast(active, "int32"))
    else:
        n_active = n
    n_pad = (n + spec.tn - 1) // spec.tn * spec.tn
    pad = n_pad - n
    if not isinstance(pad, int) or pad:
        h2 = ops.concatenate([h2, ops.zeros((pad, spec.dim), h2.dtype)], axis=0)
        lab = ops.concatenate([lab, ops.zeros((pad,), "int32")], axis=0)
        u = ops.concatenate([u, ops.zeros((pad,), "float32")], axis=0)
    n_chunks = (n_active + spec.tn - 1) // spec.tn
    return _Rows(h2, lab, u, perm, n, n_pad, n_chunks)


def _unsort(rows: _Rows, x):
    """Per-row values (n_pad, ...) in the sorted order -> the caller's (n, ...) order."""
    if rows.perm is None:
        return x[: rows.n]
    return ops.take(x, ops.argsort(rows.perm), axis=0)


def _chunk_rows(rows: _Rows, i, spec: _Spec):
    start = i * spec.tn
    h = _to(ops.slice(rows.h, (start, 0), (spec.tn, spec.dim)), spec.mm_dtype)
    lab = ops.slice(rows.lab, (start,), (spec.tn,))
    u = ops.slice(rows.u, (start,), (spec.tn,))
    return h, lab, u


def _fold_all(impl, h, lab, kernel, bias, spec: _Spec, keep: bool):
    """One pass over the vocabulary chunks: the online state (and the logits if ``keep``).

    Each chunk waits for the previous one (``impl.after``) so that a graph executor
    does not run all the matmuls ahead and hold every chunk at once.
    """
    fold, _ = _kernels(spec, bias)
    state = _init_state(spec.tn)
    kept = []
    for c0, c1 in _chunks(spec):
        w, h_c, lab_c = _after(impl, state, kernel, h, lab, c0, c1, spec)
        z = _matmul(impl, h_c, w, spec)
        state = fold(z, _bias_chunk(bias, c0, c1), lab_c, _i32(c0), *state)
        if keep:
            kept.append(z)
    return _finish(state, spec), kept


def _i32(x: int):
    return ops.convert_to_tensor(x, "int32")


def _forward(impl, rows: _Rows, kernel, bias, spec: _Spec):
    """Per-row loss, log-sum-exp and argmax, each (n_chunks_total, tn)."""
    total = rows.n_pad // spec.tn

    def body(i, bufs):
        loss_b, lse_b, amax_b = bufs
        h, lab, _ = _chunk_rows(rows, i, spec)
        h = impl.after(h, loss_b)  # one token chunk at a time
        (loss, lse, amax), _ = _fold_all(impl, h, lab, kernel, bias, spec, keep=False)
        return (
            impl.set_row(loss_b, i, loss),
            impl.set_row(lse_b, i, lse),
            impl.set_row(amax_b, i, amax),
        )

    init = (
        impl.zeros((total, spec.tn)),
        impl.zeros((total, spec.tn)),
        impl.zeros((total, spec.tn), "int32"),
    )
    return ops.fori_loop(0, rows.n_chunks, body, init)


def _grads(impl, rows: _Rows, kernel, bias, spec: _Spec, lse_b, fused: bool, kernel_grad=True):
    """Gradients of sum(u * loss) w.r.t. hidden (sorted rows), kernel and bias.

    Without ``kernel_grad`` (a frozen head) the ``d x V`` gradient and its matmul are
    skipped (``dk`` is None).

    With ``fused``, the loss, log-sum-exp, argmax and gradients come from one pass that
    keeps a token chunk's whole logits row; otherwise each logits chunk is recomputed with
    the log-sum-exp ``lse_b`` of the forward pass.
    """
    total = rows.n_pad // spec.tn
    chunks = _chunks(spec)
    fold, dlogits = _kernels(spec, bias)

    def body(i, bufs):
        dh_b, dk, db, loss_b, lse_out, amax_b = bufs
        h, lab, u = _chunk_rows(rows, i, spec)
        h = impl.after(h, dk)  # one token chunk at a time
        if fused:
            (loss, lse, amax), kept = _fold_all(impl, h, lab, kernel, bias, spec, keep=True)
            loss_b = impl.set_row(loss_b, i, loss)
            lse_out = impl.set_row(lse_out, i, lse)
            amax_b = impl.set_row(amax_b, i, amax)
        else:
            lse = lse_b[i]
        dh = None
        db = list(db)
        limit = spec.filter_eps * ops.max(ops.abs(u)) if spec.filter_eps else None
        prev: tuple = (dk,)  # everything the previous chunk computed
        for k, (c0, c1) in enumerate(chunks):
            w, h_c, lab_c = _after(impl, prev, kernel, h, lab, c0, c1, spec)
            z = kept[k] if fused else _matmul(impl, h_c, w, spec)
            g, g_sum, *big = dlogits(z, _bias_chunk(bias, c0, c1), lab_c, _i32(c0), lse, u)
            live = big[0] > limit if big else None  # filter_eps: skip a negligible block
            part = _unless(
                impl, live, functools.partial(_back, impl, g, w, spec), (spec.tn, spec.dim)
            )
            dh = part if dh is None else dh + part
            if kernel_grad:
                shape = (c1 - c0, spec.dim) if spec.transpose else (spec.dim, c1 - c0)
                blk = _unless(impl, live, functools.partial(_kernel_block, impl, g, h, spec), shape)
                dk = impl.add_kernel_grad(
                    dk, blk, c0, spec.dim, spec.vocab, spec.tv, spec.transpose
                )
            else:  # keeps the chunks in order, as the kernel gradient does
                dk = impl.after(dk, part)
            if bias is not None:
                db[k] = db[k] + g_sum
            prev = (dk, dh, *db[k : k + 1])
        return impl.set_row(dh_b, i, dh), dk, tuple(db), loss_b, lse_out, amax_b

    init = (
        impl.zeros((total, spec.tn, spec.dim)),
        (
            impl.kernel_grad_buffer(spec.dim, spec.vocab, spec.tv, spec.transpose)
            if kernel_grad
            else ops.zeros((1,))
        ),
        tuple(ops.zeros((c1 - c0,), "float32") for c0, c1 in chunks) if bias is not None else (),
        impl.zeros((total, spec.tn)) if fused else ops.zeros((1,)),
        impl.zeros((total, spec.tn)) if fused else ops.zeros((1,)),
        impl.zeros((total, spec.tn), "int32") if fused else ops.zeros((1,), "int32"),
    )
    dh_b, dk, db, loss_b, lse_b, amax_b = ops.fori_loop(0, rows.n_chunks, body, init)
    dh = _unsort(rows, ops.reshape(dh_b, (-1, spec.dim)))
    dk = impl.finish_kernel_grad(dk, spec.dim, spec.vocab, spec.transpose) if kernel_grad else None
    db = ops.concatenate(list(db), axis=0) if bias is not None else None
    return dh, dk, db, loss_b, lse_b, amax_b


def _labels(labels, vocab: int, ignore_class: int | None):
    lab = ops.convert_to_tensor(labels)
    if keras.backend.is_float_dtype(lab.dtype):
        finite = ops.isfinite(lab)
        lab = ops.where(finite, lab, -1)
    lab = ops.reshape(ops.cast(lab, "int32"), (-1,))
    in_range = ops.logical_and(ops.greater_equal(lab, 0), ops.less(lab, vocab))
    keep = None if ignore_class is None else ops.not_equal(lab, ignore_class)
    return lab, in_range, keep


def _upstream(args: tuple, upstream: Any) -> Any:
    if upstream is None:
        upstream = args[0]
    if isinstance(upstream, (tuple, list)):
        upstream = upstream[0]
    return upstream


def _out_grads(hidden, kernel, bias, dh, dk, db):
    grads = [ops.reshape(ops.cast(dh, hidden.dtype), ops.shape(hidden))]
    if dk is not None:  # None: the kernel is a constant of the custom gradient
        grads.append(dk if dk.dtype == kernel.dtype else ops.cast(dk, kernel.dtype))
    if bias is not None:
        grads.append(ops.cast(db, bias.dtype))
    return tuple(grads)


def _inputs(hidden, kernel, labels, bias, ignore_class, label_smoothing):
    hidden = ops.convert_to_tensor(hidden)
    kernel = ops.convert_to_tensor(kernel)
    bias = None if bias is None else ops.convert_to_tensor(bias)
    for name, x in (("hidden", hidden), ("kernel", kernel), ("bias", bias)):
        if x is not None and not keras.backend.is_float_dtype(x.dtype):
            raise TypeError(f"`{name}` must be a float tensor. Received: {name}.dtype={x.dtype}")
    return (
        hidden,
        kernel,
        bias,
        _check_ignore_class(ignore_class),
        _check_label_smoothing(label_smoothing),
    )

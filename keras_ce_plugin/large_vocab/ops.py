"""Cross-entropy of ``hidden @ kernel (+ bias)`` without an ``N x V`` tensor.

The tokens are processed in chunks of ``token_chunk_size`` rows (a loop whose trip
count may be dynamic) and the vocabulary in chunks of ``vocab_chunk_size`` columns
(unrolled: ``V`` is static). Each token chunk keeps an online log-sum-exp
(running max and rescaled sum) over the vocabulary chunks. Two strategies:

* recomputation (as Apple's Cut Cross-Entropy): the forward pass keeps only the
  per-token log-sum-exp; the backward pass recomputes each logits chunk. Used by
  :func:`linear_ce` (per-token values, any upstream gradient), by
  :func:`fused_linear_ce_sum` (the weighted sum behind ``LinearCE``) on JAX, and on
  TensorFlow and torch where the pass below does not apply.
* gradient in the forward pass (as Liger Kernel's fused linear cross-entropy),
  ``fused_linear_ce_sum(..., strategy="in_forward")``: a token chunk's logits row
  (``token_chunk x V``) is kept while its gradients are computed; the backward pass
  only scales them: one matmul of four fewer, at the price of small token chunks at
  large ``V``. TensorFlow and torch have their own such pass (``_tf_rows``:
  TensorFlow's cross-entropy kernel over the row; ``_torch_rows``: the row
  overwritten in place, the kernel gradient added by an in-place GEMM), which the
  default ``strategy=None`` takes while gradients are recorded (:mod:`._strategy`
  decides); on JAX the generic chunked pass measured slower on CPU than recomputing.

Rows whose label is ``ignore_class`` (or whose weight is 0) are moved behind the
others and the loop stops before them: they cost no matmul.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from keras_ce_plugin.large_vocab import _online, _sharded, _strategy
from keras_ce_plugin.large_vocab._checks import (
    _check_budget,
    _check_chunk,
    _check_z_loss,
    _filter_threshold,
)
from keras_ce_plugin.large_vocab._chunked import (
    _backend,
    _forward,
    _grads,
    _inputs,
    _labels,
    _mm_dtype,
    _out_grads,
    _rows,
    _spec,
    _unsort,
    _upstream,
)
from keras_ce_plugin.large_vocab._sizes import Held

__all__ = ["fused_linear_ce_parts", "fused_linear_ce_sum", "linear_ce"]


def _prepare(
    hidden: Any,
    kernel: Any,
    labels: Any,
    bias: Any,
    transpose_kernel: bool,
    ignore_class: int | None,
    label_smoothing: float,
    logit_soft_cap: float | None,
    token_chunk_size: int | None,
    vocab_chunk_size: int | None,
    *,
    held: Held,
    z_loss: float = 0.0,
    chunk_budget_mib: float | None = None,
    matmul_precision: str = "float32",
    filter_eps: float | str | None = None,
) -> tuple[Any, Any, Any, Any, Any]:
    """Validated inputs and the chunking spec shared by both entry points."""
    hidden, kernel, bias, ignore_class, smoothing = _inputs(
        hidden, kernel, labels, bias, ignore_class, label_smoothing
    )
    spec = _spec(
        hidden,
        kernel,
        bias,
        transpose_kernel,
        logit_soft_cap,
        smoothing,
        _check_chunk("token_chunk_size", token_chunk_size),
        _check_chunk("vocab_chunk_size", vocab_chunk_size),
        held,
        budget=_check_budget(chunk_budget_mib),
    )
    mm_dtype = _mm_dtype(hidden, kernel, matmul_precision)
    spec = spec._replace(
        zloss=_check_z_loss(z_loss),
        mm_dtype=mm_dtype,
        filter_eps=_filter_threshold(filter_eps, mm_dtype),
    )
    return hidden, kernel, bias, ignore_class, spec


def linear_ce(
    hidden: Any,
    kernel: Any,
    labels: Any,
    *,
    bias: Any = None,
    transpose_kernel: bool = False,
    ignore_class: int | None = None,
    label_smoothing: float = 0.0,
    logit_soft_cap: float | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    chunk_budget_mib: float | None = None,
    matmul_precision: str = "float32",
    z_loss: float = 0.0,
    return_lse: bool = False,
    filter_eps: float | str | None = None,
) -> Any:
    """Per-token sparse cross-entropy of ``hidden @ kernel (+ bias)``, chunked.

    Equals ``SparseCategoricalCrossentropy(from_logits=True, reduction=None)`` on the
    logits (with ``label_smoothing`` as ``CategoricalCrossentropy`` on one-hot labels,
    and on ``cap * tanh(logits / cap)`` with ``logit_soft_cap``), but never holds an
    ``N x V`` tensor: the backward pass recomputes the logits chunk by chunk.

    Args:
        hidden: ``(..., d)`` float tensor (float16/bfloat16: see ``matmul_precision``).
        kernel: ``(d, V)`` as in ``Dense``, or ``(V, d)`` (an embedding matrix, a
            tied head) with ``transpose_kernel=True``; never copied or transposed.
        labels: Integer ids, shape ``hidden.shape[:-1]``.
        bias: Optional ``(V,)`` bias.
        transpose_kernel: Whether ``kernel`` is ``(V, d)``.
        ignore_class: Label whose rows cost nothing (and no matmul).
        label_smoothing: In [0, 1], as Keras' ``CategoricalCrossentropy``.
        logit_soft_cap: Optional positive cap (Gemma 2 soft-capping).
        token_chunk_size, vocab_chunk_size: Chunk sizes (default: from
            ``chunk_budget_mib`` and the shapes, see :func:`chunk_sizes`).
        chunk_budget_mib: Working memory of one chunk, in MiB (default 64), from
            which the chunk sizes not given are chosen.
        matmul_precision: ``"float32"`` (half-precision inputs are cast to float32
            for the matmuls: exact products) or ``"input"``: for ``hidden`` and
            ``kernel`` both float16 or both bfloat16, the logits and kernel-gradient
            matmuls run in that dtype (float32 accumulation inside the matmul; the
            products are rounded to it, as the naive head rounds them), faster where
            the hardware has half-precision matmuls. The hidden gradient's matmul and
            the elementwise work stay float32.
        z_loss: PaLM's z-loss coefficient (e.g. ``1e-4``): each token adds
            ``z_loss * lse**2``, ``lse`` the log-sum-exp of its (capped) logits.
        return_lse: Also return the per-token log-sum-exp (no gradient).
        filter_eps: Cut Cross-Entropy's gradient filtering: ``None`` (exact, the
            default), ``"auto"`` (a 32nd of the matmul dtype's unit roundoff:
            ``2**-28`` in float32, ``2**-12`` in bfloat16) or a float. In the
            gradient pass, a block of (token chunk x vocabulary chunk) whose logits
            gradient stays within ``filter_eps`` times the chunk's largest token
            weight adds nothing: its two gradient matmuls are skipped. The loss
            itself is exact. Blocks are skipped only where no token of the chunk
            puts that much probability on any of the block's words (a peaked,
            trained model; never with label smoothing, whose gradient is at least
            ``label_smoothing / V`` everywhere).

    Returns:
        float32 per-token losses of shape ``labels``'s (0 where ignored; NaN for labels
        outside ``[0, V)``); with ``return_lse``, ``(losses, lse)``.
    """
    given_kernel = kernel  # a Keras variable carries its layout (sharded path)
    hidden, kernel, bias, ignore_class, spec = _prepare(
        hidden,
        kernel,
        labels,
        bias,
        transpose_kernel,
        ignore_class,
        label_smoothing,
        logit_soft_cap,
        token_chunk_size,
        vocab_chunk_size,
        held=Held(),
        z_loss=z_loss,
        chunk_budget_mib=chunk_budget_mib,
        matmul_precision=matmul_precision,
        filter_eps=filter_eps,
    )
    plan = _sharded.plan(hidden, given_kernel, spec)
    impl = _backend()
    lead = ops.shape(hidden)[:-1]
    lab, in_range, keep = _labels(labels, spec.vocab, ignore_class)
    active = in_range if keep is None else ops.logical_and(in_range, keep)
    safe = ops.where(active, lab, 0)

    def run(h, k, b):
        h2 = ops.reshape(h, (-1, spec.dim))
        ones = ops.ones(ops.shape(safe), "float32")
        rows = _rows(h2, safe, active, ones, spec, sort=keep is not None)
        loss_b, lse_b, _ = _forward(impl, rows, k, b, spec)
        loss = _unsort(rows, ops.reshape(loss_b, (-1,)))
        lse = _unsort(rows, ops.reshape(lse_b, (-1,)))

        def grad(*args, upstream=None):
            up = ops.reshape(ops.cast(_upstream(args, upstream), "float32"), (-1,))
            up = ops.where(active, up, 0.0)
            if rows.perm is not None:
                up = ops.take(up, rows.perm)
            pad = rows.n_pad - rows.n
            if not isinstance(pad, int) or pad:
                up = ops.concatenate([up, ops.zeros((pad,), "float32")], axis=0)
            dh, dk, db, *_ = _grads(impl, rows._replace(u=up), k, b, spec, lse_b, False)
            return _out_grads(h, k, b, dh, dk, db)

        return (loss, lse), grad

    if plan is not None:  # sharded over a device mesh: _sharded
        _sharded_unsupported(spec, return_lse)
        loss = _sharded.per_token(plan, hidden, kernel, bias, safe, spec)
    elif bias is None:
        loss, lse = impl.custom_gradient(lambda h, k: run(h, k, None))(hidden, kernel)
    else:
        loss, lse = impl.custom_gradient(run)(hidden, kernel, bias)
    nan_or_zero = ops.where(in_range, 0.0, float("nan"))
    if keep is not None:
        nan_or_zero = ops.where(keep, nan_or_zero, 0.0)
    loss = ops.reshape(ops.where(active, loss, nan_or_zero), lead)
    if return_lse:
        return loss, ops.reshape(ops.stop_gradient(lse), lead)
    return loss


def _sharded_unsupported(spec: Any, return_lse: bool) -> None:
    """Refuses what the sharded path lacks: z-loss, lse, half matmuls, filtering."""
    if spec.zloss or return_lse or spec.mm_dtype != "float32" or spec.filter_eps:
        raise ValueError(
            "`z_loss`, `return_lse`, `matmul_precision='input'` and `filter_eps` are not "
            "available on a sharded vocabulary (keras.distribution or a JAX mesh) yet: run "
            f"without them there. Received: z_loss={spec.zloss}, return_lse={return_lse}, "
            f"matmul dtype={spec.mm_dtype}, filter_eps={spec.filter_eps or None}"
        )


def fused_linear_ce_sum(
    hidden: Any,
    kernel: Any,
    labels: Any,
    weights: Any,
    *,
    bias: Any = None,
    transpose_kernel: bool = False,
    ignore_class: int | None = None,
    label_smoothing: float = 0.0,
    logit_soft_cap: float | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    chunk_budget_mib: float | None = None,
    matmul_precision: str = "float32",
    compute_grads: bool = True,
    strategy: str | None = None,
    filter_eps: float | str | None = None,
) -> tuple[Any, Any]:
    """``sum(weights * linear_ce(...))`` and the per-token correctness (argmax == label).

    Rows with weight 0 or label ``ignore_class`` are skipped (no matmul). ``weights``
    has the labels' shape. ``strategy="recompute"`` recomputes the logits chunks in
    the backward pass; ``"in_forward"`` computes the gradients in the forward pass
    and only scales them in the backward pass; ``None`` (the default) picks
    ``"in_forward"`` where the backend has its own pass for it (TensorFlow and torch,
    float32 matmuls, no ``filter_eps``; on TensorFlow not a soft cap with label
    smoothing, and token chunks of at least 256 rows) while gradients are recorded, and
    ``"recompute"`` elsewhere (``compute_grads=False``: no gradient, e.g. for metrics).
    Returns a float32 scalar and float32 ``(N,)`` correctness (1.0/0.0; 0 if skipped)."""
    total, correct, _ = fused_linear_ce_parts(
        hidden,
        kernel,
        labels,
        weights,
        bias=bias,
        transpose_kernel=transpose_kernel,
        ignore_class=ignore_class,
        label_smoothing=label_smoothing,
        logit_soft_cap=logit_soft_cap,
        token_chunk_size=token_chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        chunk_budget_mib=chunk_budget_mib,
        matmul_precision=matmul_precision,
        compute_grads=compute_grads,
        strategy=strategy,
        filter_eps=filter_eps,
    )
    return total, correct


def fused_linear_ce_parts(
    hidden: Any,
    kernel: Any,
    labels: Any,
    weights: Any,
    *,
    bias: Any = None,
    transpose_kernel: bool = False,
    ignore_class: int | None = None,
    label_smoothing: float = 0.0,
    logit_soft_cap: float | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    chunk_budget_mib: float | None = None,
    matmul_precision: str = "float32",
    compute_grads: bool = True,
    strategy: str | None = None,
    kernel_grad: bool = True,
    z_loss: float = 0.0,
    return_lse: bool = False,
    filter_eps: float | str | None = None,
    return_correct: bool = True,
) -> tuple[Any, ...]:
    """:func:`fused_linear_ce_sum`, plus the ``(N,)`` per-token losses (no gradient;
    0 on skipped rows), for metrics that reuse the training pass; with
    ``return_lse``, also the ``(N,)`` per-token log-sum-exp of the (capped) logits
    (no gradient; 0 on skipped rows), e.g. for a z-loss metric.
    ``return_correct=False``: ``None`` for the correctness, whose argmax a pass may then
    skip (TensorFlow's own pass: one read of each logits row fewer).

    ``kernel_grad=False`` (a frozen head: LoRA, a frozen embedding) treats the kernel
    (and bias) as constants: no ``d x V`` gradient, and the hidden gradient is
    accumulated online in the forward pass (two matmuls per chunk, as the naive loss;
    nothing recomputed), except with both label smoothing and a soft cap, or with
    ``filter_eps`` (see :func:`linear_ce`), which the recomputing pass applies.
    """
    _strategy.check(strategy)
    given_kernel = kernel  # a Keras variable carries its layout (sharded path)
    impl = _backend()

    def prepare(held: Held):
        return _prepare(
            hidden,
            kernel,
            labels,
            bias,
            transpose_kernel,
            ignore_class,
            label_smoothing,
            logit_soft_cap,
            token_chunk_size,
            vocab_chunk_size,
            held=held,
            z_loss=z_loss,
            chunk_budget_mib=chunk_budget_mib,
            matmul_precision=matmul_precision,
            filter_eps=filter_eps,
        )

    # A frozen head takes the online pass (_online) where it can, whatever the strategy.
    online = not kernel_grad and _online.supported_by(label_smoothing, logit_soft_cap, filter_eps)
    choice = _strategy.choose(
        strategy, prepare, compute_grads and not online, logit_soft_cap is not None
    )
    hidden, kernel, bias, ignore_class, spec = choice.prepared
    spec = spec._replace(correct=bool(return_correct))
    plan = _sharded.plan(hidden, given_kernel, spec)
    lab, in_range, keep = _labels(labels, spec.vocab, ignore_class)
    w = ops.reshape(ops.cast(weights, "float32"), (-1,))
    active = ops.not_equal(w, 0.0)
    if keep is not None:
        active = ops.logical_and(active, keep)
    nan_rows = ops.logical_and(active, ops.logical_not(in_range))
    active = ops.logical_and(active, in_range)
    safe = ops.where(active, lab, 0)
    u = ops.where(active, w, 0.0)
    # A label outside [0, V) on a counted row makes the loss NaN, as in `linear_ce`.
    nan_term = ops.sum(ops.where(nan_rows, float("nan"), 0.0))

    def drop_correct(parts: tuple[Any, ...]) -> tuple[Any, ...]:
        return parts if return_correct else (parts[0], None, *parts[2:])

    if plan is not None:  # sharded over a device mesh: _sharded
        _sharded_unsupported(spec, return_lse)
        args = (plan, hidden, kernel, bias, safe, active, u, spec, compute_grads)
        total, correct, per_token = _sharded.fused_sum(*args)
        return drop_correct((total + nan_term, correct, per_token))

    def correct_of(rows, loss_b, lse_b, amax_b):
        amax = _unsort(rows, ops.reshape(amax_b, (-1,)))
        loss = _unsort(rows, ops.reshape(loss_b, (-1,)))
        hit = ops.logical_and(active, ops.equal(amax, safe))
        per_token = ops.where(active, loss, 0.0)
        parts: tuple[Any, ...] = (ops.sum(u * loss) + nan_term, ops.cast(hit, "float32"), per_token)
        if return_lse:
            lse = _unsort(rows, ops.reshape(lse_b, (-1,)))
            parts += (ops.where(active, lse, 0.0),)
        return parts

    if not compute_grads:
        h2 = ops.reshape(hidden, (-1, spec.dim))
        rows = _rows(h2, safe, active, u, spec, sort=True)
        return drop_correct(correct_of(rows, *_forward(impl, rows, kernel, bias, spec)))

    def run_online(h):  # a frozen head: dh from the forward pass (_online)
        rows = _rows(ops.reshape(h, (-1, spec.dim)), safe, active, u, spec, sort=True)
        loss_b, lse_b, amax_b, dh_b = _online.forward(impl, rows, kernel, bias, spec)
        parts = correct_of(rows, loss_b, lse_b, amax_b)
        dh = _unsort(rows, ops.reshape(dh_b, (-1, spec.dim)))

        def grad(*args, upstream=None):
            up = ops.cast(_upstream(args, upstream), "float32")
            return tuple(impl.scale(g, up) for g in _out_grads(h, kernel, None, dh, None, None))

        return parts, grad

    def run(h, k, b):
        h2 = ops.reshape(h, (-1, spec.dim))
        rows = _rows(h2, safe, active, u, spec, sort=True)

        def recomputed(lse_b):  # the gradients in the backward pass, from the lse
            def grad(*args, upstream=None):
                up = ops.cast(_upstream(args, upstream), "float32")
                scaled = rows._replace(u=rows.u * up)
                dh, dk, db, *_ = _grads(impl, scaled, k, b, spec, lse_b, False, kernel_grad)
                return _out_grads(h, k, b if kernel_grad else None, dh, dk, db)

            return grad

        if not choice.in_forward:
            loss_b, lse_b, amax_b = _forward(impl, rows, k, b, spec)
            return correct_of(rows, loss_b, lse_b, amax_b), recomputed(lse_b)

        if choice.native is not None:
            found = choice.native(rows, k, b, spec, kernel_grad)
        else:
            found = _grads(impl, rows, k, b, spec, None, True, kernel_grad)
        loss_b, lse_b, amax_b = found[3:]
        parts = correct_of(rows, loss_b, lse_b, amax_b)
        held = [found[:3]]  # (dh, dk, db), for `impl.take`
        again = recomputed(lse_b)

        def grad_in_forward(*args, upstream=None):
            if not held:  # torch: a retained graph's next backward pass
                return again(*args, upstream=upstream)
            up = ops.cast(_upstream(args, upstream), "float32")
            grads = _out_grads(h, k, b if kernel_grad else None, *impl.take(held))
            return tuple(impl.scale(g, up) for g in grads)

        return parts, grad_in_forward

    if not kernel_grad:
        kernel, bias = ops.stop_gradient(kernel), None if bias is None else ops.stop_gradient(bias)
        if online:
            out = impl.custom_gradient(run_online)(hidden)
        else:
            out = impl.custom_gradient(lambda h: run(h, kernel, bias))(hidden)
    elif bias is None:
        out = impl.custom_gradient(lambda h, k: run(h, k, None))(hidden, kernel)
    else:
        out = impl.custom_gradient(run)(hidden, kernel, bias)
    return drop_correct((out[0], *(ops.stop_gradient(x) for x in out[1:])))

"""The ``LinearCE`` loss: sparse cross-entropy of a linear LM head, fused in ``fit``."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_ce_plugin.large_vocab._checks import (
    _check_budget,
    _check_cap,
    _check_chunk,
    _check_filter,
    _check_precision,
    _check_z_loss,
)
from keras_ce_plugin.large_vocab.ops import fused_linear_ce_parts
from keras_ce_plugin.losses import (
    _check_ignore_class,
    _check_label_smoothing,
    _CrossEntropyLoss,
)

__all__ = ["LinearCE"]

PACKAGE = "customloss"
_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight", None)


class _MaskOf(keras.layers.Layer):
    """Returns the Keras mask of its input: Keras passes it to ``call`` (public API)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x: Any, mask: Any = None) -> Any:
        return {"mask": mask}


def _capped(y_pred: Any, cap: float | None) -> Any:
    """Logits ``y_pred`` in float32, soft-capped by ``cap`` (``cap * tanh(x / cap)``)."""
    logits = ops.cast(y_pred, "float32")
    return logits if cap is None else cap * ops.tanh(logits / cap)


_MASK_READER: list[Any] = []


def _mask_of(x: Any) -> Any:
    """The Keras mask a masking layer attached to ``x`` (None if none), on any backend."""
    if not _MASK_READER:
        _MASK_READER.append(_MaskOf(name="mask_of"))
    return _MASK_READER[0](x)["mask"]


@keras.saving.register_keras_serializable(package=PACKAGE, name="LinearCE")
class LinearCE(_CrossEntropyLoss):
    """Sparse cross-entropy for a linear LM head, fused with the head in ``fit``.

    Called on logits (``loss(y_true, logits)``) it is the sparse cross-entropy
    ``SparseCategoricalCrossentropy(from_logits=True, ignore_class=...)`` with
    ``label_smoothing`` (as ``CategoricalCrossentropy`` on one-hot labels) and
    ``logit_soft_cap``. In a :class:`LinearCEModel`, :meth:`fused` computes the same
    reduced value from the hidden states without forming the logits.

    With ``ignore_class`` (or a Keras mask on ``y_pred``, e.g. from
    ``Embedding(mask_zero=True)``), ``"sum_over_batch_size"``/``"mean"`` average over
    the other tokens, as Keras' built-in does. ``z_loss`` adds PaLM's
    ``z_loss * logsumexp(logits)**2`` per token (``1e-4`` in PaLM). The chunk sizes
    not given are chosen so that one chunk's working memory stays within
    ``chunk_budget_mib`` (default 64 MiB; see :func:`chunk_sizes`).
    ``matmul_precision="input"`` runs the fused matmuls in a half-precision head's
    dtype (e.g. ``mixed_bfloat16``), as the naive head does (see :func:`linear_ce`).
    ``filter_eps`` skips the gradient matmuls of negligible blocks in ``fit`` (Cut
    Cross-Entropy's gradient filtering; see :func:`linear_ce`). ``reduction=None`` returns the
    per-token values times their weights (as Keras' losses do), which makes the
    class usable as a metric (``metrics=["customloss>LinearCE"]``); ``fit`` then
    follows the gradient of their sum, as Keras' ``fit`` does.
    """

    def __init__(
        self,
        ignore_class: int | None = None,
        label_smoothing: float = 0.0,
        logit_soft_cap: float | None = None,
        token_chunk_size: int | None = None,
        vocab_chunk_size: int | None = None,
        z_loss: float = 0.0,
        chunk_budget_mib: float | None = None,
        matmul_precision: str = "float32",
        filter_eps: float | str | None = None,
        reduction: str | None = "sum_over_batch_size",
        name: str = "linear_ce",
        dtype: Any = None,
    ) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"`reduction` must be one of {list(_REDUCTIONS)}. Received: reduction={reduction!r}"
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.ignore_class = _check_ignore_class(ignore_class)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.logit_soft_cap = _check_cap(logit_soft_cap)
        self.token_chunk_size = _check_chunk("token_chunk_size", token_chunk_size)
        self.vocab_chunk_size = _check_chunk("vocab_chunk_size", vocab_chunk_size)
        self.z_loss = _check_z_loss(z_loss)
        self.chunk_budget_mib = _check_budget(chunk_budget_mib)
        self.matmul_precision = _check_precision(matmul_precision)
        self.filter_eps = _check_filter(filter_eps)

    # -- on logits (evaluate, predict-time checks) ------------------------------
    def __call__(self, y_true, y_pred, sample_weight=None):
        per_token = self.call(y_true, y_pred)
        return self.reduce_tokens(per_token, y_true, sample_weight, _mask_of(y_pred))

    def reduce_tokens(self, per_token, y_true, sample_weight=None, mask=None) -> Any:
        """Per-token losses reduced as this loss reduces them (``reduction=None``:
        weighted per-token values)."""
        shape = ops.shape(per_token)
        keep = self._kept(y_true, shape, mask)
        weights = self.token_weights(y_true, sample_weight, shape, mask)
        if self.reduction is None:
            out = per_token * weights
            return ops.cast(out if keep is None else ops.where(keep, out, 0.0), self.dtype)
        return ops.cast(self._reduce(per_token, weights, keep), self.dtype)

    def call(self, y_true, y_pred):
        return self.per_token(y_true, y_pred, self.logit_soft_cap)

    def per_token(self, y_true, y_pred, cap: float | None) -> Any:
        """Unweighted per-token losses of logits ``y_pred``, soft-capped by ``cap``."""
        logits = _capped(y_pred, cap)
        labels = ops.cast(ops.reshape(y_true, ops.shape(logits)[:-1]), "int32")
        vocab = logits.shape[-1]
        safe = ops.where(ops.logical_and(labels >= 0, labels < vocab), labels, 0)
        log_p = ops.log_softmax(logits, axis=-1)
        nll = -ops.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
        if self.label_smoothing:
            eps = self.label_smoothing
            nll = (1.0 - eps) * nll - eps * ops.mean(log_p, axis=-1)
        if self.z_loss:
            nll = nll + self.z_terms(ops.logsumexp(logits, axis=-1))
        bad = ops.logical_or(labels < 0, labels >= vocab)
        nll = ops.where(bad, float("nan"), nll)
        if self.ignore_class is not None:
            nll = ops.where(ops.equal(labels, self.ignore_class), 0.0, nll)
        return nll

    # -- shared reduction ---------------------------------------------------------
    def token_weights(self, y_true, sample_weight, shape, mask=None) -> Any:
        """Per-token weights (0 on ``ignore_class`` and masked tokens), shape ``shape``."""
        w = ops.ones(shape, "float32")
        if sample_weight is not None:
            sw = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
            rank = len(w.shape)
            if len(sw.shape) == rank + 1:
                sw = ops.squeeze(sw, axis=-1)
            while len(sw.shape) < rank:  # e.g. one weight per sequence
                sw = ops.expand_dims(sw, -1)
            w = w * sw
        keep = self._kept(y_true, shape, mask)
        return w if keep is None else ops.where(keep, w, 0.0)

    def _kept(self, y_true, shape, mask=None) -> Any:
        """Tokens that count (not ``ignore_class``, not masked); None if all do."""
        keep = None
        if self.ignore_class is not None:
            labels = ops.cast(ops.reshape(y_true, shape), "int32")
            keep = ops.not_equal(labels, self.ignore_class)
        if mask is not None:
            mask = ops.reshape(ops.cast(mask, "bool"), shape)
            keep = mask if keep is None else ops.logical_and(keep, mask)
        return keep

    def _scale(self, weights, keep) -> Any:
        """Per-token factors f with reduced loss = sum(f * per_token_loss)."""
        if self.reduction in ("sum", None):  # None: `fit` minimises the sum, as in Keras
            return weights
        if self.reduction == "mean_with_sample_weight":
            denom = ops.sum(weights)
        elif keep is None:
            denom = ops.cast(ops.size(weights), "float32")
        else:  # As Keras' built-in: the mean runs over the tokens not ignored.
            denom = ops.sum(ops.cast(keep, "float32"))
        return ops.divide_no_nan(weights, denom)

    def _reduce(self, per_token, weights, keep) -> Any:
        scaled = per_token * self._scale(weights, keep)
        return ops.sum(scaled if keep is None else ops.where(keep, scaled, 0.0))

    def fused(
        self,
        hidden: Any,
        kernel: Any,
        labels: Any,
        *,
        bias: Any = None,
        transpose_kernel: bool = False,
        logit_soft_cap: float | None = None,
        sample_weight: Any = None,
        compute_grads: bool = True,
        mask: Any = None,
        kernel_grad: bool = True,
    ) -> tuple[Any, Any, Any]:
        """The reduced loss of ``hidden @ kernel (+ bias)`` without the logits.

        ``logit_soft_cap`` is the head's cap, if it has one (it must not be set on
        both). ``mask`` defaults to the Keras mask of ``hidden``. Returns
        ``(loss, correct, weights)``: the scalar loss, per-token argmax correctness
        and the per-token weights.
        """
        loss, correct, weights, _ = self.fused_parts(
            hidden,
            kernel,
            labels,
            bias=bias,
            transpose_kernel=transpose_kernel,
            logit_soft_cap=logit_soft_cap,
            sample_weight=sample_weight,
            compute_grads=compute_grads,
            mask=mask,
            kernel_grad=kernel_grad,
        )
        return loss, correct, weights

    def fused_parts(
        self,
        hidden: Any,
        kernel: Any,
        labels: Any,
        *,
        bias: Any = None,
        transpose_kernel: bool = False,
        logit_soft_cap: float | None = None,
        sample_weight: Any = None,
        compute_grads: bool = True,
        mask: Any = None,
        kernel_grad: bool = True,
        return_lse: bool = False,
        return_correct: bool = True,
    ) -> tuple[Any, ...]:
        """:meth:`fused` plus the unweighted per-token losses (no gradient; for metrics);
        with ``return_lse``, also the per-token log-sum-exp (0 on skipped tokens);
        ``return_correct=False``: ``None`` for the correctness, which is not computed."""
        cap = self.effective_cap(logit_soft_cap)
        shape = ops.shape(hidden)[:-1]
        mask = _mask_of(hidden) if mask is None else mask
        weights = self.token_weights(labels, sample_weight, shape, mask)
        # Tokens of weight 0 are skipped (no matmul); they still count in the
        # "sum_over_batch_size" denominator, as in Keras.
        scale = self._scale(weights, self._kept(labels, shape, mask))
        loss, correct, per_token, *lse = fused_linear_ce_parts(
            hidden,
            kernel,
            ops.reshape(labels, shape),
            scale,
            bias=bias,
            transpose_kernel=transpose_kernel,
            ignore_class=self.ignore_class,
            label_smoothing=self.label_smoothing,
            logit_soft_cap=cap,
            token_chunk_size=self.token_chunk_size,
            vocab_chunk_size=self.vocab_chunk_size,
            chunk_budget_mib=self.chunk_budget_mib,
            matmul_precision=self.matmul_precision,
            compute_grads=compute_grads,
            kernel_grad=kernel_grad,
            z_loss=self.z_loss,
            return_lse=return_lse,
            filter_eps=self.filter_eps,
            return_correct=return_correct,
        )
        parts = (ops.cast(loss, self.dtype), correct, weights, ops.reshape(per_token, shape))
        return parts + tuple(ops.reshape(x, shape) for x in lse)

    def z_terms(self, lse: Any) -> Any:
        """Per-token z-loss terms ``z_loss * lse**2`` of log-sum-exp values ``lse``."""
        return self.z_loss * ops.square(ops.cast(lse, "float32"))

    def logits_lse(self, y_pred: Any, cap: float | None) -> Any:
        """Per-token log-sum-exp of logits ``y_pred``, soft-capped by ``cap``."""
        return ops.logsumexp(_capped(y_pred, cap), axis=-1)

    def effective_cap(self, head_cap: float | None) -> float | None:
        """The one soft cap of head and loss (applied once; an error if they differ)."""
        mine = self.logit_soft_cap
        if head_cap is not None and mine is not None and mine != head_cap:
            raise ValueError(
                "The head's and the loss's `logit_soft_cap` differ; set it on one of them "
                f"(it is applied once). Received: head logit_soft_cap={head_cap}, "
                f"LinearCE logit_soft_cap={mine}"
            )
        return self.logit_soft_cap if head_cap is None else head_cap

    def get_config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "ignore_class": self.ignore_class,
            "label_smoothing": self.label_smoothing,
            "logit_soft_cap": self.logit_soft_cap,
            "token_chunk_size": self.token_chunk_size,
            "vocab_chunk_size": self.vocab_chunk_size,
            "z_loss": self.z_loss,
            "chunk_budget_mib": self.chunk_budget_mib,
            "matmul_precision": self.matmul_precision,
            "filter_eps": self.filter_eps,
        }

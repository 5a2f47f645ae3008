"""Token accuracy for large vocabularies, from logits or chunked from hidden states."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_ce_plugin.large_vocab.ops import fused_linear_ce_sum

__all__ = ["TokenAccuracy", "linear_token_accuracy"]

PACKAGE = "customloss"


def linear_token_accuracy(
    hidden: Any,
    kernel: Any,
    labels: Any,
    *,
    bias: Any = None,
    transpose_kernel: bool = False,
    ignore_class: int | None = None,
    logit_soft_cap: float | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> Any:
    """Per-token ``argmax(hidden @ kernel (+ bias)) == labels`` as float32, chunked.

    The argmax is kept online over vocabulary chunks (the first index wins ties, as
    in ``ops.argmax``); no ``N x V`` tensor is formed. Rows labelled ``ignore_class``
    give 0.
    """
    labels = ops.convert_to_tensor(labels)
    _, correct = fused_linear_ce_sum(
        hidden,
        kernel,
        labels,
        ops.ones(ops.shape(labels), "float32"),
        bias=bias,
        transpose_kernel=transpose_kernel,
        ignore_class=ignore_class,
        logit_soft_cap=logit_soft_cap,
        token_chunk_size=token_chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        compute_grads=False,
    )
    return ops.reshape(correct, ops.shape(labels))


@keras.saving.register_keras_serializable(package=PACKAGE, name="TokenAccuracy")
class TokenAccuracy(keras.metrics.Mean):
    """Weighted fraction of tokens whose top logit is the label.

    ``update_state(y_true, y_pred)`` takes logits (as ``sparse_categorical_accuracy``);
    :class:`~keras_ce_plugin.large_vocab.model.LinearCEModel` feeds it the chunked
    per-token results of its fused loss through :meth:`update_from_correct`, so it
    costs no extra pass over the vocabulary. Tokens labelled ``ignore_class`` (or with
    sample weight 0) are not counted.
    """

    def __init__(
        self, name: str = "token_accuracy", dtype: Any = None, ignore_class: int | None = None
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        if ignore_class is not None and (
            isinstance(ignore_class, bool) or not isinstance(ignore_class, int)
        ):
            raise TypeError(
                f"`ignore_class` must be an integer or None. Received: ignore_class={ignore_class!r}"
            )
        self.ignore_class = ignore_class

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_true = ops.cast(ops.convert_to_tensor(y_true), "int32")
        if len(y_true.shape) == len(y_pred.shape):
            y_true = ops.squeeze(y_true, axis=-1)
        pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        correct = ops.cast(ops.equal(pred, y_true), "float32")
        self.update_from_correct(correct, self._weights(y_true, sample_weight))

    def _weights(self, y_true: Any, sample_weight: Any) -> Any:
        w = ops.ones(ops.shape(y_true), "float32")
        if sample_weight is not None:
            w = w * ops.reshape(ops.cast(sample_weight, "float32"), ops.shape(y_true))
        if self.ignore_class is not None:
            w = ops.where(ops.equal(y_true, self.ignore_class), 0.0, w)
        return w

    def update_from_correct(self, correct: Any, weights: Any) -> None:
        """Adds per-token 0/1 ``correct`` values with their ``weights``."""
        correct = ops.reshape(ops.cast(correct, "float32"), (-1,))
        weights = ops.reshape(ops.cast(weights, "float32"), (-1,))
        super().update_state(correct, sample_weight=weights)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "ignore_class": self.ignore_class}

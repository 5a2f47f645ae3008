"""The Keras-facing pieces: the ``LinearCE`` loss and the ``LinearCEModel`` wrapper.

``LinearCEModel(backbone, head)`` outputs ``head(backbone(x))`` logits in
``predict``/``evaluate`` exactly like the plain model. Compiled with a
:class:`LinearCE` loss, its training forward pass stops at the final hidden
states and :meth:`LinearCEModel.compute_loss` computes the loss (and its gradient,
in the same pass) from them and the head's weights, chunk by chunk.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_ce_plugin.large_vocab._chunked import _check_cap, _check_chunk
from keras_ce_plugin.large_vocab.metrics import TokenAccuracy
from keras_ce_plugin.large_vocab.ops import fused_linear_ce_sum
from keras_ce_plugin.losses import (
    _check_ignore_class,
    _check_label_smoothing,
    _CrossEntropyLoss,
)

__all__ = ["LinearCE", "LinearCEModel"]

PACKAGE = "customloss"
_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight")


@keras.saving.register_keras_serializable(package=PACKAGE, name="LinearCE")
class LinearCE(_CrossEntropyLoss):
    """Sparse cross-entropy for a linear LM head, fused with the head in ``fit``.

    Called on logits (``loss(y_true, logits)``) it is the sparse cross-entropy
    ``SparseCategoricalCrossentropy(from_logits=True, ignore_class=...)`` with
    ``label_smoothing`` (as ``CategoricalCrossentropy`` on one-hot labels) and
    ``logit_soft_cap``. In a :class:`LinearCEModel`, :meth:`fused` computes the same
    reduced value from the hidden states without forming the logits.

    With ``ignore_class``, ``"sum_over_batch_size"``/``"mean"`` average over the
    other tokens, as Keras' built-in does.
    """

    def __init__(
        self,
        ignore_class: int | None = None,
        label_smoothing: float = 0.0,
        logit_soft_cap: float | None = None,
        token_chunk_size: int | None = None,
        vocab_chunk_size: int | None = None,
        reduction: str = "sum_over_batch_size",
        name: str = "linear_ce",
        dtype: Any = None,
    ) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"`reduction` must be one of {list(_REDUCTIONS)} for `LinearCE` (per-token "
                f"values: use `linear_ce`). Received: reduction={reduction!r}"
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.ignore_class = _check_ignore_class(ignore_class)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.logit_soft_cap = _check_cap(logit_soft_cap)
        self.token_chunk_size = _check_chunk("token_chunk_size", token_chunk_size)
        self.vocab_chunk_size = _check_chunk("vocab_chunk_size", vocab_chunk_size)

    # -- on logits (evaluate, predict-time checks) ------------------------------
    def __call__(self, y_true, y_pred, sample_weight=None):
        shape = ops.shape(y_pred)[:-1]
        weights = self.token_weights(y_true, sample_weight, shape)
        per_token = self.call(y_true, y_pred)
        return ops.cast(self._reduce(per_token, weights, self._kept(y_true, shape)), self.dtype)

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        if self.logit_soft_cap is not None:
            logits = self.logit_soft_cap * ops.tanh(logits / self.logit_soft_cap)
        labels = ops.cast(ops.reshape(y_true, ops.shape(logits)[:-1]), "int32")
        vocab = logits.shape[-1]
        safe = ops.where(ops.logical_and(labels >= 0, labels < vocab), labels, 0)
        log_p = ops.log_softmax(logits, axis=-1)
        nll = -ops.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
        if self.label_smoothing:
            eps = self.label_smoothing
            nll = (1.0 - eps) * nll - eps * ops.mean(log_p, axis=-1)
        bad = ops.logical_or(labels < 0, labels >= vocab)
        nll = ops.where(bad, float("nan"), nll)
        if self.ignore_class is not None:
            nll = ops.where(ops.equal(labels, self.ignore_class), 0.0, nll)
        return nll

    # -- shared reduction ---------------------------------------------------------
    def token_weights(self, y_true, sample_weight, shape) -> Any:
        """Per-token weights (0 on ``ignore_class`` tokens), shape ``shape``."""
        w = ops.ones(shape, "float32")
        if sample_weight is not None:
            sw = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
            rank = len(w.shape)
            if len(sw.shape) == rank + 1:
                sw = ops.squeeze(sw, axis=-1)
            while len(sw.shape) < rank:  # e.g. one weight per sequence
                sw = ops.expand_dims(sw, -1)
            w = w * sw
        keep = self._kept(y_true, shape)
        return w if keep is None else ops.where(keep, w, 0.0)

    def _kept(self, y_true, shape) -> Any:
        if self.ignore_class is None:
            return None
        labels = ops.cast(ops.reshape(y_true, shape), "int32")
        return ops.not_equal(labels, self.ignore_class)

    def _scale(self, weights, keep) -> Any:
        """Per-token factors f with reduced loss = sum(f * per_token_loss)."""
        if self.reduction == "sum":
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
    ) -> tuple[Any, Any, Any]:
        """The reduced loss of ``hidden @ kernel (+ bias)`` without the logits.

        Returns ``(loss, correct, weights)``: the scalar loss (gradient computed in
        the forward pass), per-token argmax correctness and the per-token weights.
        """
        shape = ops.shape(hidden)[:-1]
        weights = self.token_weights(labels, sample_weight, shape)
        # Tokens of weight 0 are skipped (no matmul); they still count in the
        # "sum_over_batch_size" denominator, as in Keras.
        scale = self._scale(weights, self._kept(labels, shape))
        loss, correct = fused_linear_ce_sum(
            hidden,
            kernel,
            ops.reshape(labels, shape),
            scale,
            bias=bias,
            transpose_kernel=transpose_kernel,
            ignore_class=self.ignore_class,
            label_smoothing=self.label_smoothing,
            logit_soft_cap=self.logit_soft_cap if logit_soft_cap is None else logit_soft_cap,
            token_chunk_size=self.token_chunk_size,
            vocab_chunk_size=self.vocab_chunk_size,
            compute_grads=compute_grads,
        )
        return ops.cast(loss, self.dtype), correct, weights

    def get_config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "ignore_class": self.ignore_class,
            "label_smoothing": self.label_smoothing,
            "logit_soft_cap": self.logit_soft_cap,
            "token_chunk_size": self.token_chunk_size,
            "vocab_chunk_size": self.vocab_chunk_size,
        }


def _find_layer(root: Any, target: Any) -> str | None:
    """The path ('a/b/c') of ``target`` among the nested layers of ``root``."""
    for layer in getattr(root, "layers", []):
        if layer is target:
            return layer.name
        sub = _find_layer(layer, target)
        if sub is not None:
            return f"{layer.name}/{sub}"
    return None


def _get_layer(root: Any, path: str) -> Any:
    layer = root
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer


@keras.saving.register_keras_serializable(package=PACKAGE, name="LinearCEModel")
class LinearCEModel(keras.Model):
    """``head(backbone(x))``, trained with the logits never formed.

    Args:
        backbone: A model (or layer) mapping the inputs to the final hidden states
            ``(..., d)``.
        head: The output projection: a ``keras.layers.ReversibleEmbedding`` (called
            with ``reverse=True``; tied or not, with its ``logit_soft_cap``) or a
            ``keras.layers.Dense`` without activation. It may be a layer of the
            backbone (a tied input embedding): it is then saved once and shared.

    Compiled with a :class:`LinearCE` loss, ``fit`` computes the loss from the
    hidden states (``model(x, training=True)`` returns them) and tracks
    ``token_accuracy``; ``predict``/``evaluate``/``model(x)`` return the logits.
    With another loss it is an ordinary model.
    """

    def __init__(self, backbone: Any, head: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(head, keras.layers.ReversibleEmbedding):
            if head.quantization_mode is not None:
                raise ValueError(
                    "`head` must not be quantized for the fused loss. "
                    f"Received: quantization_mode={head.quantization_mode!r}"
                )
        elif isinstance(head, keras.layers.Dense):
            if head.activation is not keras.activations.linear:
                raise ValueError(
                    "`head` must be a Dense layer without activation (logits). "
                    f"Received: activation={head.activation!r}"
                )
        else:
            raise TypeError(
                "`head` must be a keras.layers.ReversibleEmbedding or keras.layers.Dense. "
                f"Received: head={head!r}"
            )
        self.backbone = backbone
        self.head = head
        self.token_accuracy = TokenAccuracy()

    def build(self, input_shape: Any) -> None:
        if not self.backbone.built:
            self.backbone.build(input_shape)
        if not self.head.built:  # the fused path never calls the head
            self.head.build(self.backbone.compute_output_shape(input_shape))
        self.built = True

    def _logits(self, hidden):
        if isinstance(self.head, keras.layers.ReversibleEmbedding):
            return self.head(hidden, reverse=True)
        return self.head(hidden)

    def call(self, inputs, training=None):
        hidden = self.backbone(inputs, training=training)
        if training and self._fused_loss is not None:
            return hidden
        return self._logits(hidden)

    @property
    def _fused_loss(self) -> LinearCE | None:
        """The compiled loss if it is a :class:`LinearCE` (then ``fit`` is fused)."""
        loss = getattr(self, "loss", None)
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        return loss if isinstance(loss, LinearCE) else None

    def head_weights(self) -> dict[str, Any]:
        """The kernel, bias, layout and soft cap of ``head``."""
        head = self.head
        if isinstance(head, keras.layers.ReversibleEmbedding):
            tied = head.tie_weights
            return {
                "kernel": head.embeddings if tied else head.reverse_embeddings,
                "bias": None,
                "transpose_kernel": tied,
                "logit_soft_cap": head.logit_soft_cap,
            }
        return {
            "kernel": head.kernel,
            "bias": head.bias if head.use_bias else None,
            "transpose_kernel": False,
            "logit_soft_cap": None,
        }

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss_fn = self._fused_loss
        if loss_fn is None:  # an ordinary model: y_pred are the logits
            if y is not None and y_pred is not None:
                self.token_accuracy.update_state(y, y_pred, sample_weight)
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if training:
            loss, correct, weights = loss_fn.fused(
                y_pred, sample_weight=sample_weight, labels=y, **self.head_weights()
            )
            self.token_accuracy.update_from_correct(correct, weights)
        else:  # y_pred are the logits (evaluate)
            loss = loss_fn(y, y_pred, sample_weight)
            labels = ops.cast(ops.reshape(y, ops.shape(y_pred)[:-1]), "int32")
            pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
            weights = loss_fn.token_weights(y, sample_weight, ops.shape(y_pred)[:-1])
            self.token_accuracy.update_from_correct(ops.equal(pred, labels), weights)
        for extra in self.losses:
            loss = loss + ops.cast(extra, loss.dtype)
        return loss

    def get_config(self) -> dict[str, Any]:
        config = {
            **super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
        }
        path = _find_layer(self.backbone, self.head)
        if path is not None:
            config["head_in_backbone"] = path
        else:
            config["head"] = keras.saving.serialize_keras_object(self.head)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> LinearCEModel:
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(
            config.pop("backbone"), custom_objects=custom_objects
        )
        path = config.pop("head_in_backbone", None)
        if path is not None:
            head = _get_layer(backbone, path)
        else:
            head = keras.saving.deserialize_keras_object(
                config.pop("head"), custom_objects=custom_objects
            )
        return cls(backbone=backbone, head=head, **config)

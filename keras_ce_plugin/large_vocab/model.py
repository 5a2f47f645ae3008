"""``LinearCEModel``: a language model trained with its logits never formed.

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

from keras_ce_plugin.large_vocab.loss import LinearCE, _mask_of
from keras_ce_plugin.large_vocab.metrics import TokenAccuracy

__all__ = ["LinearCE", "LinearCEModel"]

PACKAGE = "customloss"


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
        token_accuracy: Whether ``fit`` tracks ``token_accuracy``. ``False`` leaves it
            out, and the fused pass skips the rows' argmax it needs (on TensorFlow one
            more read of each logits row), as a loss-only ``compile`` of the plain
            model computes none.

    Compiled with a :class:`LinearCE` loss, ``fit`` computes the loss from the
    hidden states (``model(x, training=True)`` returns them) and tracks
    ``token_accuracy`` (unless ``token_accuracy=False``; and, when the loss has a
    ``z_loss``, ``z_loss``: the weighted mean of its per-token terms
    ``z_loss * lse**2``, part of the reported loss);
    ``predict``/``evaluate``/``model(x)`` return the logits. With another loss it is
    an ordinary model.
    """

    def __init__(
        self, backbone: Any, head: Any, token_accuracy: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(token_accuracy, bool):
            raise TypeError(
                "`token_accuracy` must be True or False. "
                f"Received: token_accuracy={token_accuracy!r}"
            )
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
        self.token_accuracy = TokenAccuracy()  # always built: the saved state is the same
        self._with_accuracy = token_accuracy
        self.z_loss_tracker = keras.metrics.Mean(name="z_loss")
        self._returned_hidden = False

    @property
    def metrics(self) -> list[Any]:
        """Keras' metrics; ``z_loss`` only while the compiled loss has a z-loss,
        ``token_accuracy`` unless ``token_accuracy=False``."""
        found = super().metrics
        if not self._z_loss:
            found = [m for m in found if m is not self.z_loss_tracker]
        if not self._with_accuracy:
            found = [m for m in found if m is not self.token_accuracy]
        return found

    @property
    def _z_loss(self) -> float:
        loss = self._fused_loss
        return loss.z_loss if loss is not None else 0.0

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
        # Read (at trace time) by compute_loss/compute_metrics of the same step.
        self._returned_hidden = bool(training and self._fused_loss is not None)
        if self._returned_hidden:
            return hidden
        return self._logits(hidden)

    @property
    def _fused_loss(self) -> LinearCE | None:
        """The compiled loss if it is a :class:`LinearCE` (then ``fit`` is fused)."""
        loss = getattr(self, "loss", None)
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        return loss if isinstance(loss, LinearCE) else None

    def head_dtype(self) -> str:
        """The dtype of the head's matmul (``reverse_dtype``, else its compute dtype)."""
        head = self.head
        if isinstance(head, keras.layers.ReversibleEmbedding) and head.reverse_dtype:
            return keras.backend.standardize_dtype(head.reverse_dtype)
        return keras.backend.standardize_dtype(head.compute_dtype)

    def head_weights(self, cast: bool = True) -> dict[str, Any]:
        """The kernel, bias, layout and soft cap of ``head``, as its logits use them.

        The kernel is cast to the dtype of the head's matmul (its ``reverse_dtype``,
        else its compute dtype: bfloat16 under ``mixed_bfloat16``), as the head casts
        it (``cast=False``: as stored, for ``matmul_precision="input"``, which casts
        each block itself); ``kernel_grad`` is False for a frozen head (e.g. LoRA
        elsewhere).
        """
        head = self.head
        dtype = self.head_dtype()
        if isinstance(head, keras.layers.ReversibleEmbedding):
            tied = head.tie_weights
            kernel = head.embeddings if tied else head.reverse_embeddings
            if tied and getattr(self, "_tied_kernel", None) is not None:
                kernel = self._tied_kernel  # the head's own read (_tied_tf, _tied_torch)
            weights = {
                "kernel": kernel,
                "bias": None,
                "transpose_kernel": tied,
                "logit_soft_cap": head.logit_soft_cap,
            }
        else:
            weights = {
                "kernel": head.kernel,
                "bias": head.bias if head.use_bias else None,
                "transpose_kernel": False,
                "logit_soft_cap": None,
            }
        if cast and keras.backend.standardize_dtype(weights["kernel"].dtype) != dtype:
            weights["kernel"] = ops.cast(weights["kernel"], dtype)
        weights["kernel_grad"] = bool(head.trainable)
        return weights

    def train_step(self, *args: Any) -> Any:
        """Keras' step (``(data)``; ``(state, data)`` on JAX); on TensorFlow and torch
        with a trainable tied head and the fused loss, the embedding's two gradients
        share one buffer (``_tied_tf``, ``_tied_torch``)."""
        head = self.head
        tied = (
            isinstance(head, keras.layers.ReversibleEmbedding)
            and head.tie_weights
            and head.trainable
            and self._fused_loss is not None
        )
        if tied and keras.backend.backend() == "tensorflow":
            from keras_ce_plugin.large_vocab import _tied_tf

            if _tied_tf.applies(self):
                (data,) = args  # TensorFlow's step takes the batch only
                return _tied_tf.train_step(self, data, head.embeddings)
        if tied and keras.backend.backend() == "torch":
            from keras_ce_plugin.large_vocab import _tied_torch

            if _tied_torch.applies(self):
                (data,) = args  # torch's step takes the batch only
                return _tied_torch.train_step(self, data, head.embeddings)
        return super().train_step(*args)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss_fn = self._fused_loss
        if loss_fn is None:  # an ordinary model: y_pred are the logits
            if y is not None and y_pred is not None and self._with_accuracy:
                self.token_accuracy.update_state(y, y_pred, sample_weight)
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        # matmul_precision="input" casts the kernel block by block: no d x V copy.
        head = self.head_weights(cast=loss_fn.matmul_precision != "input")
        head_cap = head.pop("logit_soft_cap")
        cap = loss_fn.effective_cap(head_cap)
        if self._returned_hidden:
            dtype = self.head_dtype()
            if keras.backend.standardize_dtype(y_pred.dtype) != dtype:  # as the head casts
                y_pred = ops.cast(y_pred, dtype)
            loss, correct, weights, per_token, *lse = loss_fn.fused_parts(
                y_pred,
                sample_weight=sample_weight,
                labels=y,
                logit_soft_cap=head_cap,
                return_lse=bool(loss_fn.z_loss),
                return_correct=self._with_accuracy,
                **head,
            )
            if self._with_accuracy:
                self.token_accuracy.update_from_correct(correct, weights)
            self._update_loss_metrics(
                loss_fn, y, y_pred, sample_weight, per_token, (cap, head_cap), head
            )
        else:  # y_pred are the logits (evaluate), already capped by a capped head
            lse = []
            shape = ops.shape(y_pred)[:-1]
            per_token = loss_fn.per_token(y, y_pred, cap if head_cap is None else None)
            loss = loss_fn.reduce_tokens(per_token, y, sample_weight, _mask_of(y_pred))
            weights = loss_fn.token_weights(y, sample_weight, shape, _mask_of(y_pred))
            if self._with_accuracy:
                labels = ops.cast(ops.reshape(y, shape), "int32")
                pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
                self.token_accuracy.update_from_correct(ops.equal(pred, labels), weights)
            if loss_fn.z_loss:
                lse = [loss_fn.logits_lse(y_pred, cap if head_cap is None else None)]
        if lse:  # the z-loss part of the loss, weighted as token_accuracy
            self.z_loss_tracker.update_state(
                ops.reshape(loss_fn.z_terms(lse[0]), (-1,)),
                sample_weight=ops.reshape(weights, (-1,)),
            )
        for extra in self.losses:
            loss = loss + ops.cast(extra, loss.dtype)
        return loss

    def _compiled_metrics(self, y, y_pred) -> list[tuple[Any, bool]]:
        """The compiled metrics, each with whether it takes sample weights."""
        compiled = getattr(self, "_compile_metrics", None)
        if compiled is None:
            return []
        if not compiled.built:  # as Keras' compute_metrics does on the first step
            compiled.build(y, y_pred)
        found = []
        # CompileMetrics keeps `metrics=` and `weighted_metrics=` in two lists.
        for attr, weighted in (("_flat_metrics", False), ("_flat_weighted_metrics", True)):
            for entry in getattr(compiled, attr, None) or []:
                for metric in getattr(entry, "metrics", [entry]):
                    if metric is not None:
                        found.append((metric, weighted))
        return found

    def _update_loss_metrics(self, loss_fn, y, hidden, sample_weight, per_token, caps, head):
        """Fused training: compiled ``LinearCE`` metrics from the chunked pass (no logits).

        A metric with the compiled loss's options and weighting reuses its per-token
        losses; any other ``LinearCE`` costs one more (gradient-free) pass. Any
        other compiled metric needs the logits, which fused training never forms.
        """
        for metric, weighted in self._compiled_metrics(y, hidden):
            fn = getattr(metric, "_fn", None)  # MeanMetricWrapper's function
            if not isinstance(fn, LinearCE):
                raise ValueError(
                    f"Metric {metric.name!r} needs the logits, which fused training never "
                    "forms; in `fit` use LinearCE metrics and the tracked token_accuracy "
                    "(every metric applies in `evaluate`)."
                )
            cap, head_cap = caps
            values = per_token
            same = (
                fn.ignore_class,
                fn.label_smoothing,
                fn.z_loss,
                fn.effective_cap(head_cap),
            ) == (loss_fn.ignore_class, loss_fn.label_smoothing, loss_fn.z_loss, cap)
            # The loss skipped the tokens of weight 0, which an unweighted metric counts.
            if not same or not (weighted or sample_weight is None):
                weights = {**head, "kernel": self.head_weights()["kernel"]}  # cast as the head
                values = fn.fused_parts(
                    ops.stop_gradient(hidden),
                    labels=y,
                    logit_soft_cap=head_cap,
                    compute_grads=False,
                    **weights,
                )[3]
            values = fn.reduce_tokens(values, y, None, _mask_of(hidden))
            keras.metrics.Mean.update_state(
                metric, values, sample_weight=sample_weight if weighted else None
            )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self._returned_hidden:  # updated in compute_loss, from the fused pass
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_config(self) -> dict[str, Any]:
        config = {
            **super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "token_accuracy": self._with_accuracy,
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

"""keras-hub causal LMs trained with the fused loss: :func:`fused_trainer`.

Needs no import of keras-hub: a ``CausalLM`` is read through its public attributes
(``backbone``, ``backbone.token_embedding``, ``preprocessor``, a task-level
``final_logit_cap``), so the core install stays keras + NumPy.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np

from keras_ce_plugin.large_vocab.loss import LinearCE
from keras_ce_plugin.large_vocab.model import LinearCEModel

__all__ = ["HubTrainer", "fused_trainer"]


class HubTrainer(LinearCEModel):
    """A :class:`LinearCEModel` on a keras-hub ``CausalLM``'s backbone and embedding.

    Shares every variable with the ``CausalLM``; ``fit`` takes what the ``CausalLM``'s
    ``fit`` takes (raw text is run through its ``preprocessor``). ``compile()``
    defaults follow keras-hub's: ``Adam(2e-5)`` and
    ``LinearCE(matmul_precision="input")`` (under ``mixed_bfloat16`` the head's
    matmuls run in bfloat16, as keras-hub's do; the task's final soft cap, if any,
    counts as the head's). Use the ``CausalLM``
    itself to ``generate``, ``score``, ``save``.
    """

    def __init__(
        self,
        causal_lm: Any,
        final_logit_cap: float | None = None,
        token_accuracy: bool = True,
        **kwargs: Any,
    ):
        backbone = causal_lm.backbone
        super().__init__(
            backbone, head=backbone.token_embedding, token_accuracy=token_accuracy, **kwargs
        )
        # Not tracked as a layer: the trainer is never saved (the CausalLM is).
        object.__setattr__(self, "_causal_lm", causal_lm)
        self.final_logit_cap = final_logit_cap

    def compile(self, optimizer: Any = "auto", loss: Any = "auto", **kwargs: Any) -> None:
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        if loss == "auto":  # a half-precision head's matmuls in its dtype, as keras-hub's
            loss = LinearCE(matmul_precision="input")
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def _logits(self, hidden: Any) -> Any:
        logits = super()._logits(hidden)
        cap = self.final_logit_cap
        return logits if cap is None else cap * keras.ops.tanh(logits / cap)

    def head_weights(self, cast: bool = True) -> dict[str, Any]:
        weights = super().head_weights(cast)
        if self.final_logit_cap is not None:  # the head has none (else: fallback)
            weights["logit_soft_cap"] = self.final_logit_cap
        return weights

    def fit(self, x: Any = None, y: Any = None, batch_size: Any = None, **kwargs: Any) -> Any:
        preprocessor = getattr(self._causal_lm, "preprocessor", None)
        if preprocessor is not None and _is_text(x):
            if _is_dataset(x):
                x = x.map(preprocessor)
            else:
                packed = preprocessor(x) if y is None else preprocessor(x, y)
                x, y, weights = keras.utils.unpack_x_y_sample_weight(packed)
                kwargs["sample_weight"] = kwargs.get("sample_weight", weights)
        return super().fit(x, y, batch_size=batch_size, **kwargs)


def _is_dataset(x: Any) -> bool:
    return hasattr(x, "element_spec") and hasattr(x, "map")


def _is_text(x: Any) -> bool:
    if _is_dataset(x):
        spec = x.element_spec
        first = spec[0] if isinstance(spec, tuple) else spec
        return getattr(getattr(first, "dtype", None), "name", None) == "string"
    if isinstance(x, str):
        return True
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
        return True
    return isinstance(x, np.ndarray) and x.dtype.kind in "US"


def fused_trainer(causal_lm: Any, *, token_accuracy: bool = True) -> Any:
    """A trainer computing ``causal_lm``'s loss without the ``N x V`` logits.

    ``trainer = fused_trainer(causal_lm); trainer.compile(...); trainer.fit(x, y,
    sample_weight=...)`` trains ``causal_lm``'s own variables (tied or untied
    embedding, LoRA, ``mixed_bfloat16``) with the loss keras-hub computes: sparse
    cross-entropy of ``token_embedding(hidden, reverse=True)`` with its
    ``logit_soft_cap``, ``reverse_dtype`` and a task's ``final_logit_cap``, averaged
    as keras-hub's default loss averages (padding counts in the denominator with
    weight 0). Then ``causal_lm.generate()``, ``score()``, ``save()`` use the trained
    weights. ``fit`` reports ``token_accuracy``, as ``causal_lm.compile()``'s default
    weighted metric does; ``token_accuracy=False`` leaves it out and saves its work,
    as ``causal_lm.compile(weighted_metrics=[])`` does.

    Where the fused loss cannot reproduce the head (a quantized embedding, two
    stacked soft caps), it warns in one line and returns ``causal_lm`` itself, to
    be trained as usual.
    """
    backbone = getattr(causal_lm, "backbone", None)
    head = getattr(backbone, "token_embedding", None)
    if not isinstance(head, keras.layers.ReversibleEmbedding):
        raise TypeError(
            "`causal_lm` must be a keras-hub CausalLM whose backbone has a "
            "ReversibleEmbedding `token_embedding`. "
            f"Received: {type(causal_lm).__name__} with token_embedding={type(head).__name__}"
        )
    task_cap = getattr(causal_lm, "final_logit_cap", None)
    reason = None
    if head.quantization_mode is not None:
        reason = f"its embedding is quantized ({head.quantization_mode})"
    elif task_cap is not None and head.logit_soft_cap is not None:
        reason = "it stacks two soft caps (embedding and task)"
    if reason is not None:
        warnings.warn(
            f"fused_trainer: {type(causal_lm).__name__} trains with its own (naive) loss "
            f"because {reason}.",
            UserWarning,
            stacklevel=2,
        )
        return causal_lm
    return HubTrainer(causal_lm, final_logit_cap=task_cap, token_accuracy=token_accuracy)

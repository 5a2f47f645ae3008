"""Cross-entropy for large vocabularies without materialising the logits.

``linear_ce`` is the per-token function; :class:`LinearCE`, :class:`LinearCEModel`
and :class:`TokenAccuracy` are the Keras-facing pieces (registered under the
``customloss`` package); :func:`fused_trainer` turns a keras-hub ``CausalLM`` into a
trainer of its own variables with the fused loss.
"""

from keras_ce_plugin.large_vocab._sizes import chunk_sizes
from keras_ce_plugin.large_vocab.hub import fused_trainer
from keras_ce_plugin.large_vocab.loss import LinearCE
from keras_ce_plugin.large_vocab.metrics import TokenAccuracy, linear_token_accuracy
from keras_ce_plugin.large_vocab.model import LinearCEModel
from keras_ce_plugin.large_vocab.ops import fused_linear_ce_sum, linear_ce

__all__ = [
    "LinearCE",
    "LinearCEModel",
    "TokenAccuracy",
    "chunk_sizes",
    "fused_linear_ce_sum",
    "fused_trainer",
    "linear_ce",
    "linear_token_accuracy",
]

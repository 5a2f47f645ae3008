"""TensorFlow ``train_step`` for a tied head: one d x V gradient buffer, not two.

A tied embedding is read twice in a step: by the input lookup (its gradient is an
``IndexedSlices``) and by the head (a dense ``V x d`` gradient). TensorFlow sums the
two by densifying the ``IndexedSlices`` into a second ``V x d`` tensor
(``UnsortedSegmentSum``, then ``AddN``), so two ``V x d`` buffers are alive at once;
with the logits gone, that copy is the largest thing left in a fused step. Here the head reads the embedding through a watched tensor whose gradient
the tape returns separately, and the lookup's rows are added into the head's gradient
in place (``InplaceAdd``, as the kernel gradient itself is written; under XLA
``tensor_scatter_nd_add``, which XLA performs in place). The step is otherwise
Keras' own ``train_step``; under a ``tf.distribute`` strategy with several replicas
Keras' step is used as it is.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from keras_ce_plugin.large_vocab import _tensorflow


def applies(model: Any) -> bool:
    """Whether this step applies: one replica, and the trainer's loss tracker exists."""
    return (
        tf.distribute.get_strategy().num_replicas_in_sync == 1
        and getattr(model, "_loss_tracker", None) is not None
        and getattr(model, "optimizer", None) is not None
    )


def _add_rows(dense: Any, lookup: Any) -> Any:
    """``dense`` plus the lookup's gradient (``IndexedSlices``, dense or None)."""
    if lookup is None:
        return dense
    if isinstance(lookup, tf.IndexedSlices):
        values = tf.cast(lookup.values, dense.dtype)
        if _tensorflow._in_xla():  # XLA updates the buffer in place
            return tf.tensor_scatter_nd_add(dense, tf.expand_dims(lookup.indices, -1), values)
        # Into the head's buffer itself (repeated rows add up, one after the other).
        return tf.raw_ops.InplaceAdd(x=dense, i=tf.cast(lookup.indices, tf.int32), v=values)
    return dense + tf.cast(lookup, dense.dtype)


def train_step(model: Any, data: Any, variable: Any) -> Any:
    """Keras' TensorFlow ``train_step``, with the tied ``variable``'s two gradients
    summed into the head's buffer."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
        kernel = tf.stop_gradient(tf.convert_to_tensor(variable))
        tape.watch(kernel)
        object.__setattr__(model, "_tied_kernel", kernel)
        try:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
        finally:
            object.__setattr__(model, "_tied_kernel", None)
        first = next(i for i in tf.nest.flatten(x) if i is not None)
        model._loss_tracker.update_state(loss, sample_weight=tf.shape(first)[0])
        loss = model.optimizer.scale_loss(loss)
    weights = list(model.trainable_weights)
    grads = tape.gradient(loss, weights + [kernel])
    head = grads.pop()
    index = next(i for i, w in enumerate(weights) if w is variable)
    if head is not None:
        grads[index] = _add_rows(head, grads[index])
    model.optimizer.apply_gradients(zip(grads, weights))
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

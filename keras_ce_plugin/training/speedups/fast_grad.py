"""The fast input gradient (``TrainConfig.fast_input_grad``) and its bit-identity probe.

TensorFlow computes a ``Dense`` layer's input gradient as ``dy @ W^T``; oneDNN
computes ``(W @ dy^T)^T`` faster for the head's large layers, and its kernels sum
each dot product in the same order, so on many CPUs it gives the very same bits.
The head's large ``Dense`` layers compute it that way in training, for each layer
and batch size only where :func:`same_bits_as_tensorflow`, run on random data
before ``fit``, shows bit-for-bit the output and gradients of TensorFlow's own;
elsewhere TensorFlow's formula is used. The run stays bitwise the same. A run that
does not promise TensorFlow's bits (the default, with the XLA-compiled update) skips
the probe and uses the fast gradient everywhere, so it is fast on any CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

#: Dense layers with fewer inputs or units than this keep TensorFlow's gradient
#: (too small to gain).
MIN_SIZE = 1024


def dense_fast_input_grad(layer: keras.layers.Layer, x: Any, fast_batches: Sequence[int]) -> Any:
    """``layer(x)`` for a plain float ``Dense`` layer whose gradient with respect to ``x``
    is computed as ``(W @ dy^T)^T`` for batch sizes in ``fast_batches`` (as TensorFlow's
    ``dy @ W^T`` for the others); forward, kernel and bias gradients as TensorFlow's."""
    import tensorflow as tf

    fast = tf.constant(sorted(fast_batches) or [-1], tf.int32)

    @tf.custom_gradient
    def matmul(x: Any, w: Any) -> tuple:
        def grad(dy: Any) -> tuple:
            dx = tf.cond(
                tf.reduce_any(tf.equal(tf.shape(dy)[0], fast)),
                lambda: tf.transpose(tf.matmul(w, dy, transpose_b=True)),
                lambda: tf.matmul(dy, w, transpose_b=True, grad_a=True),
            )
            return dx, tf.matmul(x, dy, transpose_a=True, grad_b=True)

        return keras.ops.matmul(x, w), grad

    y = matmul(x, layer.kernel.value)
    if layer.bias is not None:
        y = keras.ops.add(y, layer.bias)
    if layer.activation is not None:
        y = layer.activation(y)
    return y


def same_bits_as_tensorflow(
    layer: keras.layers.Layer,
    batches: Sequence[int],
    fast_batches: Sequence[int],
    fast: Callable[..., Any] | None = None,
) -> bool:
    """Whether ``fast`` (:func:`dense_fast_input_grad`) gives ``layer``'s output and
    gradients bit for bit at each of these batch sizes (random inputs, in a
    ``tf.function`` traced without the batch size, as in ``fit``)."""
    import tensorflow as tf

    dtype = layer.compute_dtype
    sources = [v.value for v in layer.trainable_variables]
    fast = fast or dense_fast_input_grad
    forwards = (lambda t: layer(t, training=True), lambda t: fast(layer, t, fast_batches))
    signature = [tf.TensorSpec([None, n], dtype) for n in (layer.kernel.shape[0], layer.units)]

    @tf.function(autograph=False, input_signature=signature)
    def both(x: Any, dy: Any) -> list:
        out = []
        for forward in forwards:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = forward(x)
            out += [y, *tape.gradient(y, [x, *sources], output_gradients=dy)]
        return out

    for batch in batches:
        rng = np.random.default_rng(batch)
        x, dy = (rng.standard_normal((batch, spec.shape[1])).astype(dtype) for spec in signature)
        values = [keras.ops.convert_to_numpy(v) for v in both(x, dy)]
        half = len(values) // 2
        if not all(np.array_equal(a, b) for a, b in zip(values[:half], values[half:])):
            return False
    return True


def fast_input_grad_layers(
    head_layers: Sequence[keras.layers.Layer],
    batch_sizes: Sequence[int],
    *,
    same_bits: bool = True,
) -> dict[str, tuple[int, ...]]:
    """``{name: batch sizes}``: the head's large ``Dense`` layers and the batch sizes at
    which their fast input gradient passes :func:`same_bits_as_tensorflow`, for layers
    whose gradient, fast at those sizes and TensorFlow's at the others, passes at all.

    Without ``same_bits`` (a run that does not promise TensorFlow's bits, such as one
    with the XLA-compiled update) there is no probe: every large layer gets the fast
    gradient at every batch size, whatever the CPU's kernels.
    """
    chosen = {}
    for layer in head_layers:
        if not (
            type(layer) is keras.layers.Dense
            and min(layer.kernel.shape) >= MIN_SIZE
            and not layer.lora_enabled
            and not layer.quantization_mode
            and layer.compute_dtype == layer.variable_dtype
        ):
            continue
        sizes = tuple(batch_sizes)
        if not same_bits:
            chosen[layer.name] = sizes
            continue
        if not same_bits_as_tensorflow(layer, sizes, sizes):  # fast at every size?
            sizes = tuple(b for b in batch_sizes if same_bits_as_tensorflow(layer, [b], [b]))
            if not sizes or not same_bits_as_tensorflow(layer, batch_sizes, sizes):
                continue
        chosen[layer.name] = sizes
    return chosen


class FastInputGradHead(keras.Sequential):
    """A ``keras.Sequential`` that, in training, runs the layers named in ``fast_dense``
    (``{name: batch sizes}``) through :func:`dense_fast_input_grad` (same bits, less
    time), the others as usual. ``fast_traces`` counts the traces that used it."""

    fast_dense: dict = {}  # noqa: RUF012 - replaced per instance, never mutated
    fast_traces = 0

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if not training or not self.fast_dense:
            return super().call(inputs, training=training, mask=mask)
        self.fast_traces += 1
        h = inputs
        for layer in self.layers:
            if layer.name in self.fast_dense:
                h = dense_fast_input_grad(layer, h, self.fast_dense[layer.name])
            else:
                h = layer(h, training=training)
        return h

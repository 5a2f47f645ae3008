"""Two XLA speed mechanisms for the head on cached features (TensorFlow backend).

* :func:`xla_adam_class` (``TrainConfig.xla_optimizer``): Adam's own per-variable
  update step, XLA-compiled, so its element-wise passes over each kernel fuse
  into one. XLA's fused multiply-adds round differently: the curves match the
  tutorial's to float rounding.
* :func:`xla_step_head_class` (``TrainConfig.xla_step``): the head's whole train
  step as one XLA computation, with the dropout masks drawn outside XLA exactly
  as Keras draws them, so a step is the tutorial's step up to rounding.

Each class counts how often its XLA code was traced (``xla_update_traces``,
``xla_step_traces``), which :func:`keras_ce_plugin.training.speedups.engaged` reports.
"""

from __future__ import annotations

from typing import Any

import keras

from keras_ce_plugin.errors import KerasCEError

_XLA_ADAM: type | None = None
_XLA_STEP_HEAD: type | None = None
XLA_STEP_LAYERS = (keras.layers.Flatten, keras.layers.Dense, keras.layers.Dropout)


def xla_adam_class() -> type:
    """``keras.optimizers.Adam`` whose per-variable ``update_step`` runs XLA-compiled.

    The body is Adam's own ``update_step``, wrapped in ``tf.function(jit_compile=True)``.
    Used only to train the head on cached features; the saved model gets a plain
    ``Adam`` with the same state (:func:`as_plain_adam`).
    """
    global _XLA_ADAM
    if _XLA_ADAM is None:
        import tensorflow as tf

        class XlaUpdateAdam(keras.optimizers.Adam):
            __doc__ = xla_adam_class.__doc__
            xla_update_traces = 0

            def update_step(self, gradient, variable, learning_rate):
                parent = super().update_step
                step = tf.function(
                    lambda g: parent(g, variable, learning_rate),
                    jit_compile=True,
                    autograph=False,
                )
                self.xla_update_traces += 1
                return step(gradient)

        _XLA_ADAM = XlaUpdateAdam
    return _XLA_ADAM


def make_optimizer(learning_rate: float, *, xla_update: bool) -> keras.optimizers.Optimizer:
    """Adam with this learning rate; its update step XLA-compiled if ``xla_update``."""
    if xla_update:
        return xla_adam_class()(learning_rate=learning_rate)
    return keras.optimizers.Adam(learning_rate=learning_rate)


def as_plain_adam(optimizer: keras.optimizers.Optimizer, variables: list) -> Any:
    """A ``keras.optimizers.Adam`` with ``optimizer``'s config and state."""
    if type(optimizer) is keras.optimizers.Adam:
        return optimizer
    plain = keras.optimizers.Adam.from_config(optimizer.get_config())
    plain.build(variables)
    if [tuple(v.shape) for v in plain.variables] != [tuple(v.shape) for v in optimizer.variables]:
        raise RuntimeError("optimizer state does not line up with a plain Adam")  # pragma: no cover
    for dst, src in zip(plain.variables, optimizer.variables):
        dst.assign(src)
    return plain


def check_xla_step_layers(head_layers: Any) -> None:
    """Raises :class:`KerasCEError` for a head layer whose step XLA cannot reproduce."""
    for layer in head_layers:
        if not isinstance(layer, XLA_STEP_LAYERS):
            raise KerasCEError(
                "`xla_step` handles Flatten, Dense and Dropout head layers only. "
                f"Received a {type(layer).__name__} layer ({layer.name!r})."
            )
        if isinstance(layer, keras.layers.Dropout) and (
            layer.noise_shape is not None or not 0 < layer.rate < 1
        ):
            raise KerasCEError(
                f"`xla_step` needs plain dropout (0 < rate < 1, no noise_shape). "
                f"Received: {layer.name} with rate={layer.rate}, "
                f"noise_shape={layer.noise_shape}"
            )


def xla_step_head_class() -> type:
    """A ``keras.Sequential`` whose ``train_step`` runs as one XLA computation.

    Keras' own ``jit_compile=True`` would also draw the dropout masks inside XLA,
    with another random algorithm than TensorFlow's kernels: other masks, another
    run. Here each ``Dropout`` layer's uniform noise is drawn outside XLA exactly as
    ``keras.random.dropout`` draws it (the layer's seed generator advanced once, then
    ``tf.random.stateless_uniform``), and the XLA computation applies it as
    ``tf.nn.experimental.stateless_dropout`` does (``where(noise >= rate, x / (1 -
    rate), 0)``), then computes the loss, the gradients and the optimizer update.
    Loss tracking and metrics are updated outside, as ``Model.train_step`` does.
    """
    global _XLA_STEP_HEAD
    if _XLA_STEP_HEAD is None:
        import tensorflow as tf

        class XlaStepHead(keras.Sequential):
            __doc__ = xla_step_head_class.__doc__
            xla_step_traces = 0

            def _dropout_noise(self, batch: Any) -> list:
                noise = []
                for layer in self.layers:
                    if isinstance(layer, keras.layers.Dropout):
                        seed = layer.seed_generator.next()
                        if seed.dtype != tf.int32:  # as keras' TF backend casts it
                            seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
                        shape = tf.concat([[batch], layer.output.shape[1:]], axis=0)
                        noise.append(
                            tf.random.stateless_uniform(shape, seed=seed, dtype=layer.compute_dtype)
                        )
                return noise

            def train_step(self, data: Any) -> dict:
                x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
                noise = self._dropout_noise(tf.shape(x)[0])
                loss, y_pred = self._xla_step(x, y, sample_weight, noise)
                for metric in self.metrics:
                    if metric.name == "loss":  # Model.train_step's loss tracker
                        metric.update_state(loss, sample_weight=tf.shape(x)[0])
                return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

            @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
            def _xla_step(self, x: Any, y: Any, sample_weight: Any, noise: list) -> tuple:
                self.xla_step_traces += 1
                with tf.GradientTape() as tape:
                    h, masks = x, iter(noise)
                    for layer in self.layers:
                        if isinstance(layer, keras.layers.Dropout):
                            scale = tf.constant(1 / (1 - layer.rate), h.dtype)
                            h = tf.where(
                                next(masks) >= layer.rate, h * scale, tf.zeros((), h.dtype)
                            )
                        else:
                            h = layer(h, training=True)
                    loss = self.compute_loss(x, y, h, sample_weight, training=True)
                grads = tape.gradient(loss, self.trainable_variables)
                self.optimizer.apply(grads, self.trainable_variables)
                return loss, h

        _XLA_STEP_HEAD = XlaStepHead
    return _XLA_STEP_HEAD

"""The speed mechanisms of training the head on cached features, one switch each.

=========================  ==============================  ==========================
``TrainConfig`` field      module                          effect on the curves
=========================  ==============================  ==========================
``xla_optimizer``          :mod:`.xla` (XLA Adam update)   float rounding
``xla_step``               :mod:`.xla` (XLA whole step)    float rounding, amplified
``fast_input_grad``        :mod:`.fast_grad`               none (probed), or rounding
=========================  ==============================  ==========================

They apply on the TensorFlow backend, in float32, without a distribution strategy
(:func:`available`). :func:`head_model` builds the head that ``fit`` trains and
:func:`engaged` reports which mechanisms were traced into its training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from keras_ce_plugin.training.speedups.fast_grad import FastInputGradHead, fast_input_grad_layers
from keras_ce_plugin.training.speedups.xla import (
    as_plain_adam,
    check_xla_step_layers,
    make_optimizer,
    xla_step_head_class,
)

__all__ = ["as_plain_adam", "available", "engaged", "head_model", "make_optimizer"]


def available(strategy: Any = None) -> bool:
    """Whether the mechanisms can run here: TensorFlow, float32, no strategy."""
    return (
        strategy is None
        and keras.backend.backend() == "tensorflow"
        and keras.config.dtype_policy().name == "float32"
    )


def head_model(
    input_shape: tuple,
    head_layers: Sequence[keras.layers.Layer],
    *,
    xla_step: bool,
    fast_input_grad_batches: Sequence[int] = (),
    same_bits: bool = True,
) -> keras.Model:
    """The head alone on feature inputs: the same layer objects as the full model's.

    ``xla_step`` makes its train step one XLA computation. Otherwise, with
    ``fast_input_grad_batches`` (the batch sizes ``fit`` will use), large ``Dense``
    layers that pass the bit-identity probe at each of them get the fast input
    gradient in training; all of them without ``same_bits`` (no probe: a run that
    does not promise TensorFlow's bits).
    """
    inputs = keras.Input(input_shape)
    if xla_step:
        check_xla_step_layers(head_layers)
        return xla_step_head_class()([inputs, *head_layers], name="head")
    if fast_input_grad_batches:
        head = FastInputGradHead([inputs, *head_layers], name="head")
        head.fast_dense = fast_input_grad_layers(
            head_layers, fast_input_grad_batches, same_bits=same_bits
        )
        return head
    return keras.Sequential([inputs, *head_layers], name="head")


def engaged(fit_model: keras.Model) -> dict[str, Any]:
    """Which mechanisms the trained ``fit_model`` traced into its training step.

    >>> engaged(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    {'xla_optimizer': False, 'xla_step': False, 'fast_input_grad': {}}
    """
    optimizer = getattr(fit_model, "optimizer", None)
    fast = getattr(fit_model, "fast_dense", {}) if getattr(fit_model, "fast_traces", 0) else {}
    return {
        "xla_optimizer": getattr(optimizer, "xla_update_traces", 0) > 0,
        "xla_step": getattr(fit_model, "xla_step_traces", 0) > 0,
        "fast_input_grad": dict(fast),
    }

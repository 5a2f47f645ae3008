"""The sharded (many-device) path of ``linear_ce``: dispatch, backend-neutral.

Under a ``keras.distribution`` setting (``DataParallel``, ``ModelParallel``) or on
inputs already sharded in a JAX mesh, :func:`plan` finds how the tokens and the
vocabulary are sharded; the work is then done by ``_sharded_jax`` (imported on the
JAX backend only). On the other backends, and on one device, :func:`plan` returns
``None`` and ``linear_ce`` runs as before.
"""

from __future__ import annotations

from typing import Any

import keras


def plan(hidden: Any, kernel: Any, spec: Any) -> Any:
    """How ``hidden``/``kernel`` are sharded (a ``_sharded_jax.Plan``), or ``None``.

    ``kernel`` is the argument as the caller gave it: a ``keras.Variable`` (whose
    layout the current distribution knows), or a tensor.
    """
    if keras.backend.backend() != "jax":
        return None
    from keras_ce_plugin.large_vocab import _sharded_jax

    return _sharded_jax.find_plan(hidden, kernel, spec)


def per_token(plan: Any, hidden: Any, kernel: Any, bias: Any, labels: Any, spec: Any) -> Any:
    """Per-token losses ``(N,)`` (gradients to ``hidden``/``kernel``/``bias``)."""
    from keras_ce_plugin.large_vocab import _sharded_jax

    return _sharded_jax.loss_and_argmax(plan, hidden, kernel, bias, labels, spec)[0]


def fused_sum(
    plan: Any,
    hidden: Any,
    kernel: Any,
    bias: Any,
    labels: Any,
    active: Any,
    weights: Any,
    spec: Any,
    compute_grads: bool,
) -> tuple[Any, Any]:
    """``sum(weights * loss)`` over the active tokens and the per-token correctness."""
    from keras import ops

    from keras_ce_plugin.large_vocab import _sharded_jax

    loss, amax = _sharded_jax.loss_and_argmax(plan, hidden, kernel, bias, labels, spec)
    if not compute_grads:
        loss = ops.stop_gradient(loss)
    total = ops.sum(ops.where(active, weights * loss, 0.0))
    hit = ops.logical_and(active, ops.equal(amax, labels))
    return total, ops.stop_gradient(ops.cast(hit, "float32"))

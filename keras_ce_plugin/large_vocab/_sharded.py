"""The sharded (many-device) path of ``linear_ce``: dispatch, backend-neutral.

Under a ``keras.distribution`` setting (``DataParallel``, ``ModelParallel``) or on
inputs already sharded in a JAX mesh, :func:`plan` finds how the tokens and the
vocabulary are sharded; the work is then done by ``_sharded_jax`` (imported on the
JAX backend only). On the other backends, and on one device, :func:`plan` returns
``None`` and ``linear_ce`` runs as before.
"""

from __future__ import annotations

import math
import re
from typing import Any

import keras

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4}
_BYTES.update({"f64": 8, "s64": 8, "u64": 8})
_COLLECTIVE = re.compile(
    r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


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
) -> tuple[Any, Any, Any]:
    """``sum(weights * loss)`` over the active tokens, the per-token correctness and the
    per-token losses (no gradient; 0 on inactive tokens)."""
    from keras import ops

    from keras_ce_plugin.large_vocab import _sharded_jax

    loss, amax = _sharded_jax.loss_and_argmax(plan, hidden, kernel, bias, labels, spec)
    if not compute_grads:
        loss = ops.stop_gradient(loss)
    total = ops.sum(ops.where(active, weights * loss, 0.0))
    hit = ops.logical_and(active, ops.equal(amax, labels))
    per_token = ops.stop_gradient(ops.where(active, loss, 0.0))
    return total, ops.stop_gradient(ops.cast(hit, "float32")), per_token


def collectives(hlo_text: str) -> list[tuple[str, int]]:
    """``(kind, bytes of the result)`` of each collective in compiled HLO text.

    What the tests and ``benchmarks/bench_sharded.py`` read from
    ``jax.jit(f).lower(...).compile().as_text()`` (per device, as XLA's SPMD
    programs are).
    """
    found = []
    for shapes, kind in _COLLECTIVE.findall(hlo_text):
        size = sum(
            _BYTES[t] * math.prod(int(x) for x in dims.split(",") if x)
            for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shapes)
            if t in _BYTES
        )
        found.append((kind, size))
    return found

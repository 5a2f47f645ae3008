"""torch ``train_step`` for a tied head: the lookup's rows added into the head's gradient.

A tied embedding is read twice in a step: by the input lookup and by the head. torch's
lookup (``F.embedding``) returns a dense ``V x d`` gradient, mostly zeros, which
autograd then adds to the head's: two ``V x d`` buffers alive at once. Here the head
reads the embedding through a second leaf tensor that shares its storage (``detach``:
no copy), and each plain lookup of the embedding goes through :class:`_Lookup`, whose
backward keeps its rows (tokens x d) instead of a dense gradient. After the backward
pass the rows are added into the head's gradient in place (``index_add_``); the step
is otherwise Keras' torch ``train_step``. A lookup that reads the embedding in
another way (a cast copy, other ``F.embedding`` options) keeps its own gradient,
which is added as well.
"""

from __future__ import annotations

from typing import Any

import keras
import torch
from torch.overrides import TorchFunctionMode


def applies(model: Any) -> bool:
    """Whether this step applies: the trainer's loss tracker and optimizer exist."""
    return (
        getattr(model, "_loss_tracker", None) is not None
        and getattr(model, "optimizer", None) is not None
    )


class _Lookup(torch.autograd.Function):
    """``F.embedding(indices, weight)`` whose backward keeps its rows (appended to
    ``found``) instead of returning a dense gradient."""

    @staticmethod
    def forward(ctx: Any, indices: Any, weight: Any, found: list) -> Any:
        ctx.save_for_backward(indices)
        ctx.found = found
        return torch.nn.functional.embedding(indices, weight)

    @staticmethod
    def backward(ctx: Any, upstream: Any) -> Any:
        (indices,) = ctx.saved_tensors
        index = indices.reshape(-1)
        ctx.found.append((index, upstream.reshape(index.shape[0], -1)))
        return None, None, None


# ``F.embedding``'s options as a plain lookup (Keras' ``ops.take``) leaves them.
_PLAIN = {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False, "sparse": False}


class _TiedLookups(TorchFunctionMode):
    """Reads each plain ``F.embedding`` of ``weight`` through :class:`_Lookup`; the
    rows of their gradients end up in ``found``."""

    def __init__(self, weight: Any) -> None:
        super().__init__()
        self.weight = weight
        self.found: list[tuple[Any, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func is torch.nn.functional.embedding
            and len(args) == 2
            and args[1] is self.weight
            and all(kwargs.get(key) == value for key, value in _PLAIN.items())
        ):
            return _Lookup.apply(args[0], args[1], self.found)
        return func(*args, **kwargs)


def _sum(grad: Any, other: Any, rows: list, like: Any) -> Any:
    """``grad`` plus ``other`` (either may be None) plus the lookups' ``rows``, in
    place where a gradient exists."""
    if grad is None or other is None:
        grad = other if grad is None else grad
    else:
        grad = grad.add_(other.to(grad.dtype))
    if grad is None and rows:
        grad = torch.zeros_like(like)
    for index, values in rows:
        grad.index_add_(0, index, values.to(grad.dtype))
    return grad


def train_step(model: Any, data: Any, variable: Any) -> Any:
    """Keras' torch ``train_step``, with the tied ``variable``'s lookup rows added into
    the head's gradient."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    head = variable.value.detach().requires_grad_()  # shares the storage: no copy
    lookups = _TiedLookups(variable.value)
    object.__setattr__(model, "_tied_kernel", head)
    try:
        with lookups:
            y_pred = model(x, training=True)
        model.zero_grad()
        loss = model.compute_loss(x, y, y_pred, sample_weight, training=True)
    finally:
        object.__setattr__(model, "_tied_kernel", None)
    first = next(i for i in keras.tree.flatten(x) if i is not None)
    model._loss_tracker.update_state(loss, sample_weight=first.shape[0])
    loss = model.optimizer.scale_loss(loss)
    loss.backward()
    weights = list(model.trainable_weights)
    grads = [w.value.grad for w in weights]
    index = next(i for i, w in enumerate(weights) if w is variable)
    grads[index] = _sum(head.grad, grads[index], lookups.found, head)
    with torch.no_grad():
        model.optimizer.apply(grads, weights)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

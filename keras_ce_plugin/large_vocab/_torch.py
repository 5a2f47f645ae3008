"""PyTorch pieces of the chunked linear cross-entropy.

Imported only when the Keras backend is torch. Eager execution frees each chunk as
soon as it is consumed, and the buffers are written in place (an
``autograd.Function`` runs its passes without recording them), so no ordering or
fusion tricks are needed.

The custom gradient is a ``torch.autograd.Function`` of our own rather than
``keras.ops.custom_gradient``: Keras' torch version accepts a single output
gradient and retries the forward pass on any exception, while ``fused_linear_ce_sum``
returns two outputs (the second not differentiable) and errors must surface once.
"""

from __future__ import annotations

from typing import Any

import torch
from keras import ops


def zeros(shape: Any, dtype: str = "float32") -> Any:
    return ops.zeros(tuple(int(s) for s in shape), dtype=dtype)


def set_row(buf: Any, i: Any, row: Any) -> Any:
    """``buf[i] = row`` in place; returns ``buf``."""
    buf[int(i)] = row
    return buf


def mm_nt(a: Any, b: Any) -> Any:
    """``a @ b.T``: a strided view, which the BLAS call reads transposed (no copy)."""
    return torch.matmul(a, b.T)


def mm_tn(a: Any, b: Any) -> Any:
    return torch.matmul(a.T, b)


def kernel_grad_buffer(dim: int, vocab: int, chunk: int, transpose: bool) -> Any:
    del chunk
    return zeros((vocab, dim) if transpose else (dim, vocab))


def add_kernel_grad(
    buf: Any, block: Any, start: int, dim: int, vocab: int, chunk: int, transpose: bool
) -> Any:
    del dim, vocab, chunk
    if transpose:
        buf[start : start + block.shape[0]] += block
    else:
        buf[:, start : start + block.shape[1]] += block
    return buf


def finish_kernel_grad(buf: Any, dim: int, vocab: int, transpose: bool) -> Any:
    del dim, vocab, transpose
    return buf


def fuse(fn: Any) -> Any:
    """Eager ops, one after the other (``torch.compile`` would recompile per chunk shape)."""
    return fn


def after(x: Any, dep: Any) -> Any:
    """Eager execution is already in order."""
    del dep
    return x


def take(held: list) -> Any:
    """The forward pass's gradients, handed to the backward pass once (``pop``): with
    no reference left here, autograd keeps the kernel gradient as the variable's
    ``.grad`` itself (a gradient that something else still holds, it copies). A
    retained graph's next backward pass recomputes them."""
    return held.pop()


def scale(g: Any, factor: Any) -> Any:
    """``g * factor``; ``g`` itself when the factor is 1 (no copy of a kernel-sized gradient)."""
    factor = torch.as_tensor(factor, dtype=g.dtype, device=g.device)
    return g if bool(factor == 1) else g * factor


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Any, *args: Any) -> Any:
        out, ctx.grad_fn = fn(*args)
        if isinstance(out, tuple):  # (value, non-differentiable extras...)
            ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx: Any, *upstream: Any) -> Any:
        return (None, *ctx.grad_fn(upstream=upstream[0]))


def custom_gradient(fn: Any) -> Any:
    """``fn(*args) -> (out, grad)`` as a differentiable function (as ``ops.custom_gradient``)."""

    def call(*args: Any) -> Any:
        return _Function.apply(fn, *args)

    return call

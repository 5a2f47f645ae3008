"""JAX pieces of the chunked linear cross-entropy.

Imported only when the Keras backend is JAX. Under ``jit`` (as in ``fit``), XLA
performs ``dynamic_update_slice`` on a loop-carried buffer in place, so the kernel
gradient is accumulated in one buffer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from keras import ops

custom_gradient = ops.custom_gradient


def zeros(shape: Any, dtype: str = "float32") -> Any:
    return jnp.zeros(tuple(int(s) for s in shape), dtype=dtype)


def set_row(buf: Any, i: Any, row: Any) -> Any:
    """``buf[i] = row``; returns the updated buffer (in place under ``jit``)."""
    start = (jnp.asarray(i, jnp.int32),) + (jnp.int32(0),) * (buf.ndim - 1)
    return jax.lax.dynamic_update_slice(buf, row[None].astype(buf.dtype), start)


def mm_nt(a: Any, b: Any) -> Any:
    return jnp.matmul(a, b.T, preferred_element_type=jnp.float32)


def mm_tn(a: Any, b: Any) -> Any:
    return jnp.matmul(a.T, b, preferred_element_type=jnp.float32)


def kernel_grad_buffer(dim: int, vocab: int, chunk: int, transpose: bool) -> Any:
    del chunk
    return jnp.zeros((vocab, dim) if transpose else (dim, vocab), jnp.float32)


def add_kernel_grad(
    buf: Any, block: Any, start: int, dim: int, vocab: int, chunk: int, transpose: bool
) -> Any:
    del dim, vocab, chunk
    if transpose:
        return buf.at[start : start + block.shape[0], :].add(block)
    return buf.at[:, start : start + block.shape[1]].add(block)


def finish_kernel_grad(buf: Any, dim: int, vocab: int, transpose: bool) -> Any:
    del dim, vocab, transpose
    return buf


def fuse(fn: Any) -> Any:
    """``jax.jit``: fused already inside an outer ``jit``, and compiled when called eagerly."""
    return jax.jit(fn)


def after(x: Any, dep: Any) -> Any:
    """``x`` (an array or a nest of them), made to depend on the value of ``dep`` (the
    same): ``x + 0 * (first element of each)``, 0 where not finite (a NaN stays in its own
    token). XLA's CPU scheduler otherwise runs every vocabulary chunk's matmul first and
    keeps all their logits at once (``tokens x V``, as much as the naive loss); an
    ``optimization_barrier`` does not survive its fusion passes, a data dependency does.
    The zero goes through a ``lax.cond``: without it, in a whole ``fit`` step XLA fused
    the elements' computation into the next chunk's kernel slice, so the chunks' own
    reductions ran late and kept their logits alive; a conditional's operand is
    computed before it, by the producers that compute the rest of ``dep``.
    """
    zero = jnp.zeros((), jnp.float32)
    for leaf in jax.tree_util.tree_leaves(dep):
        first = leaf[(0,) * leaf.ndim].astype(jnp.float32)  # no flattened copy
        zero = zero + jnp.where(jnp.isfinite(first), first, 0.0) * 0.0
    zero = jax.lax.cond(zero == 0.0, lambda z: z, jnp.zeros_like, zero)
    return jax.tree_util.tree_map(lambda a: a + zero.astype(a.dtype), x)


def take(held: list) -> Any:
    """The forward pass's gradients, for the backward pass (kept: a gradient function
    may be traced more than once)."""
    return held[0]


def scale(g: Any, factor: Any) -> Any:
    """``g * factor`` (XLA reuses the buffer of ``g``)."""
    return g * jnp.asarray(factor, g.dtype)

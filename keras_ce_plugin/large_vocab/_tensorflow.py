"""TensorFlow pieces of the chunked linear cross-entropy: buffers written in place.

Imported only when the Keras backend is TensorFlow. ``tf.raw_ops.InplaceAdd`` and
``InplaceUpdate`` write into their input's buffer (they alias it), so the kernel
gradient is assembled chunk by chunk in one ``d x V`` buffer without a concat or a
second copy. The buffers come from ``tf.raw_ops.Empty``, a stateful op that is never
constant-folded, so every call gets a fresh buffer.

XLA (``jit_compile=True``) has no kernel for those ops; inside an XLA cluster the
buffers are updated with ``dynamic_update_slice``, which XLA performs in place.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
from keras import ops

custom_gradient = ops.custom_gradient


def _in_xla() -> bool:
    """Whether ops are being traced into an XLA cluster (``jit_compile=True``)."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - TensorFlow layout changed
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _dus(buf: Any, update: Any, start: list) -> Any:
    from tensorflow.compiler.tf2xla.python import xla

    return xla.dynamic_update_slice(buf, update, tf.cast(tf.stack(start), tf.int32))


def zeros(shape: Any, dtype: str = "float32") -> Any:
    """A fresh zero-filled buffer that the in-place writes below may alias."""
    if _in_xla():
        return tf.zeros(shape, dtype)
    return tf.raw_ops.Empty(shape=tf.cast(shape, tf.int32), dtype=tf.as_dtype(dtype), init=True)


def set_row(buf: Any, i: Any, row: Any) -> Any:
    """``buf[i] = row`` in place; returns ``buf``."""
    if _in_xla():
        return _dus(buf, row[None], [i] + [0] * (len(buf.shape) - 1))
    return tf.raw_ops.InplaceUpdate(x=buf, i=tf.reshape(tf.cast(i, tf.int32), [1]), v=row[None])


def mm_nt(a: Any, b: Any) -> Any:
    """``a @ b.T`` without materialising the transpose.

    ``BatchMatMulV2`` rather than ``MatMul(transpose_b=True)``: on CPU the latter
    reorders the whole of ``b`` on every call, which costs the most where ``b`` is a
    ``d x V`` kernel (``benchmarks/bench_matmul_nt.py``)."""
    return tf.raw_ops.BatchMatMulV2(x=a, y=b, adj_y=True)


def mm_tn(a: Any, b: Any) -> Any:
    """``a.T @ b`` without materialising the transpose."""
    return tf.matmul(a, b, transpose_a=True)


def _group(vocab: int, chunk: int) -> int:
    # Rows of the flat kernel-gradient view: every vocabulary chunk (of width
    # `chunk`, the last one `vocab % chunk`) is a whole number of them.
    return math.gcd(vocab, chunk)


def kernel_grad_buffer(dim: int, vocab: int, chunk: int, transpose: bool) -> Any:
    """A zero buffer for the kernel gradient, in a row layout ``add_kernel_grad`` can use."""
    if _in_xla():
        return zeros([vocab, dim] if transpose else [dim, vocab])
    g = _group(vocab, chunk)
    if transpose:  # a chunk is whole rows of the (V, d) gradient: one flat row per g of them
        return zeros([vocab // g, g * dim])
    return zeros([dim * vocab // g, g])


def add_kernel_grad(
    buf: Any, block: Any, start: int, dim: int, vocab: int, chunk: int, transpose: bool
) -> Any:
    """Adds ``block`` (``d x w``, or ``w x d`` if ``transpose``) at vocabulary ``start``."""
    width = int(block.shape[0] if transpose else block.shape[1])
    if _in_xla():
        start_idx = [start, 0] if transpose else [0, start]
        size = [width, dim] if transpose else [dim, width]
        return _dus(buf, tf.slice(buf, start_idx, size) + block, start_idx)
    g = _group(vocab, chunk)
    if transpose:
        rows = np.arange(start // g, (start + width) // g, dtype=np.int32)
        return tf.raw_ops.InplaceAdd(x=buf, i=rows, v=tf.reshape(block, [width // g, g * dim]))
    per_row = vocab // g
    rows = (
        np.arange(dim, dtype=np.int32)[:, None] * per_row
        + start // g
        + np.arange(width // g, dtype=np.int32)[None, :]
    ).reshape(-1)
    return tf.raw_ops.InplaceAdd(x=buf, i=rows, v=tf.reshape(block, [dim * width // g, g]))


def finish_kernel_grad(buf: Any, dim: int, vocab: int, transpose: bool) -> Any:
    """The ``(d, V)`` (or ``(V, d)``) gradient: a reshape, which shares the buffer."""
    return tf.reshape(buf, [vocab, dim] if transpose else [dim, vocab])


def fuse(fn: Any) -> Any:
    """Compiles ``fn`` (elementwise work on one chunk) with XLA into one fused kernel.

    Only inside a ``tf.function`` (as in ``fit``): eagerly, the ops run one by one
    rather than compiling a kernel for every new chunk shape.
    """
    compiled = tf.function(fn, jit_compile=True, reduce_retracing=True)

    def call(*args: Any) -> Any:
        return fn(*args) if tf.executing_eagerly() or _in_xla() else compiled(*args)

    return call


def after(x: Any, dep: Any) -> Any:
    """``x`` (a tensor or a nest of them), available only once ``dep`` (the same) is
    computed (orders the chunks; no copy)."""
    with tf.control_dependencies(tf.nest.flatten(dep)):
        return tf.nest.map_structure(tf.identity, x)


def take(held: list) -> Any:
    """The forward pass's gradients, for the backward pass (kept: a gradient function
    may be traced more than once)."""
    return held[0]


def scale(g: Any, factor: Any) -> Any:
    """``g * factor``; ``g`` itself (no copy of a kernel-sized gradient) when it is 1."""
    factor = tf.cast(factor, g.dtype)
    return tf.cond(tf.equal(factor, 1), lambda: tf.identity(g), lambda: g * factor)

"""Data- and vocabulary-parallel ``linear_ce`` on JAX, with ``jax.shard_map``.

Each device runs the chunked online log-sum-exp over its own tokens and its own
vocabulary columns; the devices holding one token's vocabulary shards then
combine per-token scalars only: ``pmax`` of the running max, one ``psum`` of the
rescaled sum-exp and of the target (and label-smoothing) term, and a ``pmin`` for
the argmax. The backward pass recomputes each logits chunk from the combined
log-sum-exp: the kernel (and bias) gradient stays on the device holding that
shard (summed over the token axes only, as data parallelism does), the hidden
gradient is summed over the vocabulary axes.

``shard_map`` with explicit collectives, rather than sharding constraints on the
single-device code: the token loop (``fori_loop`` with in-place row updates) and
the per-chunk slices of the kernel are opaque to XLA's sharding propagation,
which then gathers the kernel or the batch; inside ``shard_map`` every shape is
the per-device one and the only communication is what is written here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import keras
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from keras_ce_plugin.large_vocab import _jax as impl
from keras_ce_plugin.large_vocab._chunked import (
    _elementwise,
    _init_state,
    _matmul,
    _Spec,
)

_BIG = jnp.iinfo(jnp.int32).max


class Plan(NamedTuple):
    mesh: Any  # jax.sharding.Mesh
    tokens: Any  # mesh axis name(s) sharding the tokens, or None
    vocab: Any  # mesh axis name(s) sharding the vocabulary, or None


def _names(axes: Any) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _size(mesh: Any, axes: Any) -> int:
    return math.prod(mesh.shape[a] for a in _names(axes))


def _axes(mesh: Any, axes: Any, exclude: Any = None) -> Any:
    """``axes`` without the size-1 ones (and ``exclude``): None, a name or a tuple."""
    names = tuple(a for a in _names(axes) if mesh.shape[a] > 1 and a not in _names(exclude))
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def _explicit(mesh: Any) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _own_sharding(x: Any) -> Any:
    """The ``NamedSharding`` of a concrete array, or of a traced one on an explicit mesh."""
    if isinstance(x, keras.Variable):
        x = x.value
    if isinstance(x, jax.core.Tracer):
        sharding = getattr(jax.typeof(x), "sharding", None)
        if isinstance(sharding, NamedSharding) and _explicit(sharding.mesh):
            return sharding
    elif isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
        return x.sharding
    return None


def _place(x: Any, mesh: Any, spec: Any) -> Any:
    """``x`` laid out as ``spec`` (moved eagerly; a constraint under ``jit``)."""
    target = NamedSharding(mesh, spec)
    if _explicit(mesh):
        return jax.sharding.reshard(x, target)
    return jax.lax.with_sharding_constraint(x, target)


def find_plan(hidden: Any, kernel: Any, spec: _Spec) -> Plan | None:
    """The mesh and the token/vocabulary axes, or None (one device, no sharding).

    The kernel's layout comes from the current ``keras.distribution`` (a Keras
    variable), else from the kernel's own ``NamedSharding`` (a concrete JAX
    array), else the kernel is taken as replicated. The tokens are sharded as the
    distribution shards the batch, else as ``hidden``'s ``NamedSharding`` says.
    """
    vdim = 0 if spec.transpose else 1
    dist = keras.distribution.distribution()
    own = _own_sharding(kernel)
    if dist is not None and isinstance(kernel, keras.Variable):
        mesh = dist.device_mesh.backend_mesh
        vocab = dist.get_variable_layout(kernel).axes[vdim]
        tokens = dist.batch_dim_name
    elif own is not None:
        mesh = own.mesh
        vocab = own.spec[vdim] if len(own.spec) > vdim else None
        data = _own_sharding(hidden)
        tokens = data.spec[0] if data is not None and data.mesh == mesh and data.spec else None
    elif dist is not None:  # a tensor under a distribution: the batch is sharded
        mesh, vocab, tokens = dist.device_mesh.backend_mesh, None, dist.batch_dim_name
    else:
        return None
    vocab = _axes(mesh, vocab)
    if vocab is not None and spec.vocab % _size(mesh, vocab):
        vocab = None
    tokens = _axes(mesh, tokens, exclude=vocab)
    rows = math.prod(hidden.shape[:-1]) if None not in hidden.shape[:-1] else None
    if tokens is not None and (rows is None or rows % _size(mesh, tokens)):
        tokens = None
    if tokens is None and vocab is None:
        return None
    return Plan(mesh, tokens, vocab)


def _local_spec(spec: _Spec, rows: int, cols: int) -> _Spec:
    return spec._replace(vocab=cols, tn=max(1, min(spec.tn, rows)), tv=min(spec.tv, cols))


def _pad_rows(x: Any, n_pad: int) -> Any:
    pad = n_pad - x.shape[0]
    return x if not pad else jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def _offset(plan: Plan, cols: int) -> Any:
    if plan.vocab is None:
        return jnp.int32(0)
    return jax.lax.axis_index(plan.vocab).astype(jnp.int32) * cols


def _vocab_loop(local: _Spec, k, b, carry, step):
    """``carry = step(carry, w, bias, c0)`` over the local vocabulary chunks, in turn.

    A ``fori_loop`` (the last, narrower chunk after it): one chunk's logits are
    alive at a time. Unrolled chunks would let XLA run them all at once.
    """
    axis = 0 if local.transpose else 1
    full = local.vocab // local.tv

    def chunk(c0, width):
        w = jax.lax.dynamic_slice_in_dim(k, c0, width, axis).astype(jnp.float32)
        if b is None:
            return w, jnp.zeros((1,), jnp.float32)
        return w, jax.lax.dynamic_slice_in_dim(b, c0, width).astype(jnp.float32)

    def body(j, c):
        c0 = (j * local.tv).astype(jnp.int32)
        return step(c, *chunk(c0, local.tv), c0)

    carry = jax.lax.fori_loop(0, full, body, carry)
    if local.vocab % local.tv:
        c0 = jnp.int32(full * local.tv)
        carry = step(carry, *chunk(c0, local.vocab - full * local.tv), c0)
    return carry


def _add_at(buf, block, start, axis: int):
    """``buf[start:start + len] += block`` along ``axis`` (in place under ``jit``)."""
    size = block.shape[axis]
    now = jax.lax.dynamic_slice_in_dim(buf, start, size, axis)
    return jax.lax.dynamic_update_slice_in_dim(buf, now + block, start, axis)


def _setup(plan: Plan, spec: _Spec, h, k, b, lab):
    n, cols = h.shape[0], (k.shape[0] if spec.transpose else k.shape[1])
    local = _local_spec(spec, n, cols)
    kernels = _elementwise("jax", spec.cap, spec.smoothing, spec.vocab, b is not None)
    n_chunks = -(-n // local.tn)
    lab = lab - _offset(plan, cols)  # labels of other shards match no local column
    return n, cols, local, kernels, n_chunks, _pad_rows(lab, n_chunks * local.tn)


def _local_forward(plan: Plan, spec: _Spec, h, k, b, lab):
    """Per-device: the online state over the local columns, combined across ``vocab``."""
    n, cols, local, (fold, _), n_chunks, lp = _setup(plan, spec, h, k, b, lab)
    tn = local.tn
    hp = _pad_rows(h, n_chunks * tn)

    def body(i, bufs):
        hi = jax.lax.dynamic_slice_in_dim(hp, i * tn, tn).astype(jnp.float32)
        li = jax.lax.dynamic_slice_in_dim(lp, i * tn, tn)

        def step(state, w, bias, c0):
            return fold(_matmul(impl, hi, w, local), bias, li, c0, *state)

        m, total, tgt, ssum, amax = _vocab_loop(local, k, b, _init_state(tn), step)
        lin = (1.0 - spec.smoothing) * tgt
        if spec.smoothing:
            lin = lin + (spec.smoothing / spec.vocab) * ssum
        return tuple(impl.set_row(buf, i, x) for buf, x in zip(bufs, (m, total, lin, amax)))

    init = (impl.zeros((n_chunks, tn)),) * 3 + (impl.zeros((n_chunks, tn), "int32"),)
    m, total, lin, amax = (x.reshape(-1)[:n] for x in jax.lax.fori_loop(0, n_chunks, body, init))
    amax = amax + _offset(plan, cols)
    if plan.vocab is not None:
        top = jax.lax.pmax(m, plan.vocab)
        total, lin = jax.lax.psum(jnp.stack([total * jnp.exp(m - top), lin]), plan.vocab)
        amax = jax.lax.pmin(jnp.where(m == top, amax, _BIG), plan.vocab)
        m = top
    lse = m + jnp.log(total)
    return lse - lin, lse, amax


def _local_backward(plan: Plan, spec: _Spec, h, k, b, lab, lse, up):
    """Per-device: d(sum(up * loss)) w.r.t. the local rows, kernel shard and bias shard."""
    n, cols, local, (_, dlogits), n_chunks, lp = _setup(plan, spec, h, k, b, lab)
    tn = local.tn
    hp, sp = _pad_rows(h, n_chunks * tn), _pad_rows(lse, n_chunks * tn)
    up = _pad_rows(up.astype(jnp.float32), n_chunks * tn)
    k_axis = 0 if spec.transpose else 1

    def body(i, bufs):
        dh_b, dk, db = bufs
        hi = jax.lax.dynamic_slice_in_dim(hp, i * tn, tn).astype(jnp.float32)
        li, si, ui = (jax.lax.dynamic_slice_in_dim(x, i * tn, tn) for x in (lp, sp, up))

        def step(carry, w, bias, c0):
            dh, dk, db = carry
            g, g_sum = dlogits(_matmul(impl, hi, w, local), bias, li, c0, si, ui)
            dh = dh + (jnp.matmul(g, w) if spec.transpose else impl.mm_nt(g, w))
            blk = impl.mm_tn(g, hi) if spec.transpose else impl.mm_tn(hi, g)
            db = _add_at(db, g_sum, c0, 0) if b is not None else db
            return dh, _add_at(dk, blk, c0, k_axis), db

        dh = jnp.zeros((tn, spec.dim), jnp.float32)
        dh, dk, db = _vocab_loop(local, k, b, (dh, dk, db), step)
        return impl.set_row(dh_b, i, dh), dk, db

    init = (
        impl.zeros((n_chunks, tn, spec.dim)),
        impl.kernel_grad_buffer(spec.dim, cols, local.tv, spec.transpose),
        jnp.zeros((cols if b is not None else 1,), jnp.float32),
    )
    dh, dk, db = jax.lax.fori_loop(0, n_chunks, body, init)
    dh = dh.reshape(-1, spec.dim)[:n]
    if plan.vocab is not None:
        dh = jax.lax.psum(dh, plan.vocab)
    if plan.tokens is not None:
        dk = jax.lax.psum(dk, plan.tokens)
        db = jax.lax.psum(db, plan.tokens) if b is not None else db
    return dh, dk, db


def _specs(plan: Plan, spec: _Spec) -> tuple[Any, Any, Any, Any]:
    """PartitionSpecs of the (N, d) hidden, the kernel, the bias and per-token vectors."""
    kernel = P(plan.vocab, None) if spec.transpose else P(None, plan.vocab)
    return P(plan.tokens, None), kernel, P(plan.vocab), P(plan.tokens)


def loss_and_argmax(plan: Plan, hidden: Any, kernel: Any, bias: Any, labels: Any, spec: _Spec):
    """Per-token losses (differentiable) and argmax ids, each ``(N,)`` float32/int32."""
    h_spec, k_spec, b_spec, t_spec = _specs(plan, spec)
    has_bias = bias is not None

    def smap(fn, in_specs, out_specs):
        run = jax.shard_map(
            fn, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

        def placed(*args):  # arrays placed otherwise are moved first
            return run(*(_place(a, plan.mesh, s) for a, s in zip(args, in_specs)))

        return placed

    def forward(h, k, b, lab):
        run = smap(
            lambda h, k, b, lab: _local_forward(plan, spec, h, k, b if has_bias else None, lab),
            (h_spec, k_spec, b_spec if has_bias else P(), t_spec),
            (t_spec, t_spec, t_spec),
        )
        return run(h, k, b, lab)

    @jax.custom_vjp
    def loss_fn(h, k, b, lab):
        loss, _, amax = forward(h, k, b, lab)
        return loss, amax

    def fwd(h, k, b, lab):
        loss, lse, amax = forward(h, k, b, lab)
        return (loss, amax), (h, k, b, lab, lse)

    def bwd(res, cts):
        h, k, b, lab, lse = res

        def local(h, k, b, lab, lse, up):
            return _local_backward(plan, spec, h, k, b if has_bias else None, lab, lse, up)

        run = smap(
            local,
            (h_spec, k_spec, b_spec if has_bias else P(), t_spec, t_spec, t_spec),
            (h_spec, k_spec, b_spec if has_bias else P()),
        )
        dh, dk, db = run(h, k, b, lab, lse, cts[0])
        db = db.astype(b.dtype) if has_bias else jnp.zeros_like(b)
        return dh.astype(h.dtype), dk.astype(k.dtype), db, None

    loss_fn.defvjp(fwd, bwd)
    h2 = jnp.reshape(hidden, (-1, spec.dim))
    b = bias if has_bias else jnp.zeros((1,), jnp.float32)
    return loss_fn(h2, kernel, b, jnp.asarray(labels, jnp.int32))

"""Chunk sizes from a memory budget and the shapes (``chunk_sizes``, ``chunk_budget_mib``).

The budget's contract is checked on what the code traces, not on the formula: in a
JAX subprocess the jaxpr of value-and-gradient holds no logits-like intermediate
(one without the hidden size ``d`` among its dimensions) larger than half the budget,
and larger budgets give larger chunks. Exactness with the chosen sizes is checked
against a float64 NumPy reference.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import REPO, require_backend, run_python

from keras_ce_plugin.large_vocab import LinearCE, chunk_sizes, linear_ce
from keras_ce_plugin.large_vocab._sizes import Held


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@pytest.mark.parametrize("tokens", [1, 37, 1000, 4096, 20000, None])
@pytest.mark.parametrize("dim", [16, 512, 4096])
@pytest.mark.parametrize("vocab", [203, 32768, 262144])
@pytest.mark.parametrize("budget", [None, 8.0, 256.0])
def test_chunk_sizes_fit_the_budget(tokens, dim, vocab, budget):
    """Logits chunk and its gradient, the kernel block and three token-chunk rows fit
    the budget unless the minimum sizes (16 tokens, 256 columns) already exceed it;
    the sizes are powers of two or the whole axis; no chunk exceeds the tokens."""
    tn, tv = chunk_sizes(tokens, dim, vocab, chunk_budget_mib=budget)
    elements = (budget or 64.0) * 2**20 / 4
    used = 2 * tn * tv + dim * tv + 3 * tn * dim
    at_minimum = tn <= 16 or (tokens is not None and tn == min(tokens, 16))
    assert used <= elements or (at_minimum and tv == min(vocab, 256)), (tn, tv, used)
    assert 1 <= tn <= (tokens or 4096) and tn <= 4096
    assert tv == vocab or _is_pow2(tv)
    assert tn == tokens or _is_pow2(tn)


# What each gradient-in-forward pass holds beside its token chunk's hidden rows, in
# float32 buffers (the passes' modules): tn x V rows, d x tv products, tn x tv copies,
# under a default budget of `budget_factor` times 64 MiB.
_ROW_PASSES = {
    "tf_own": Held(1, 2, 2),  # the row; two blocks' products, made at once, and their copies
    "tf_own_capped": Held(2, 2, 2),  # + the soft cap's derivative row
    "torch_own": Held(1, 0, 0, budget_factor=2),  # addmm_ adds in place: no blocks, 128 MiB
    "generic": Held(2, 1, 0),  # logits row and its gradient
}


def test_the_table_holds_what_tensorflows_pass_declares():
    from keras_ce_plugin.large_vocab import _tf_rows

    assert _tf_rows.held(False) == _ROW_PASSES["tf_own"]
    assert _tf_rows.held(True) == _ROW_PASSES["tf_own_capped"]


def _sizes(held, tokens, dim, vocab):
    return held.sizes(tokens, dim, vocab, None, None, None)


def _budget(held):
    """The pass's default budget, in float32 elements."""
    return held.budget_factor * 64 * 2**20 / 4


def _row_pass_elements(held, tn, tv, dim, vocab):
    """float32 elements a row pass holding ``held`` uses at ``tn x tv`` chunks: its rows,
    blocks and row copies, and the token chunk's hidden rows, gradient and accumulator."""
    return (
        held.row_buffers * tn * vocab
        + held.kernel_blocks * dim * tv
        + held.row_blocks * tn * tv
        + 3 * tn * dim
    )


@pytest.mark.parametrize("held", list(_ROW_PASSES.values()), ids=list(_ROW_PASSES))
@pytest.mark.parametrize("tokens", [300, 4096, None])
@pytest.mark.parametrize("dim", [128, 512, 1024, 4096])
@pytest.mark.parametrize("vocab", [32768, 131072, 262144])
def test_row_pass_sizes_fit_the_default_row_budget(held, tokens, dim, vocab):
    """A pass that keeps whole logits rows gets chunks whose rows, blocks and token
    rows fit its default budget (256 MiB; torch's own pass 128) unless 16-token chunks of
    256 columns already exceed it; TensorFlow's pass at 1024 x 131,072 counts its two
    kernel-gradient blocks (it once got 16,384 columns, 72M elements against 67M)."""
    tn, tv = _sizes(held, tokens, dim, vocab)
    used = _row_pass_elements(held, tn, tv, dim, vocab)
    assert used <= _budget(held) or (tn == 16 and tv == 256), (tn, tv, used)
    assert _is_pow2(tv) and (tn == tokens or _is_pow2(tn))


@pytest.mark.parametrize("held", list(_ROW_PASSES.values()), ids=list(_ROW_PASSES))
@pytest.mark.parametrize("tokens", [1024, 4096])
@pytest.mark.parametrize("dim", [128, 512, 1024])
@pytest.mark.parametrize("vocab", [131072, 256000, 262144])
def test_row_pass_halves_its_tokens_only_when_256_columns_do_not_fit(held, tokens, dim, vocab):
    """Each halving of a row pass's token chunk is one more pass over the d x V
    gradient, so the chunk keeps twice its rows whenever they fit beside 256 columns
    (at 512 x 256,000 with 1,024 tokens TensorFlow's pass once fell to 128-token chunks,
    and so to recomputation, because 1,024 columns did not fit beside 256 rows)."""
    tn, _ = _sizes(held, tokens, dim, vocab)
    if tn < tokens:
        need = _row_pass_elements(held, 2 * tn, 256, dim, vocab)
        assert need > _budget(held), (tn, need)


def test_chunk_sizes_keep_given_sizes_and_fewer_tokens_widen_the_vocab_chunk():
    assert chunk_sizes(4096, 512, 131072, token_chunk_size=100)[0] == 100
    assert chunk_sizes(4096, 512, 131072, vocab_chunk_size=300)[1] == 300
    assert chunk_sizes(64, 512, 131072, token_chunk_size=100)[0] == 64  # never > tokens
    widths = [chunk_sizes(n, 512, 131072)[1] for n in (8192, 4096, 1024, 256)]
    assert widths == sorted(widths) and widths[0] < widths[-1]


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "64"])
def test_chunk_budget_validated_in_init(bad):
    with pytest.raises(ValueError, match="`chunk_budget_mib` must be"):
        LinearCE(chunk_budget_mib=bad)


def test_chunk_budget_in_config_and_json_round_trip():
    loss = LinearCE(chunk_budget_mib=16.0, z_loss=1e-4)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(loss)))
    again = keras.saving.deserialize_keras_object(config)
    assert again.get_config() == loss.get_config()
    assert again.chunk_budget_mib == 16.0
    assert LinearCE.from_config({"name": "linear_ce"}).chunk_budget_mib is None  # older files


@pytest.mark.parametrize("budget", [0.05, 1.0, None])
def test_values_and_gradients_exact_with_chosen_sizes(rng, budget):
    """With the sizes the budget picks (several token and vocabulary chunks at 0.05
    MiB, one chunk by default), loss and hidden gradient equal float64 NumPy to 1e-5
    relative (float32 sums over ~1000 columns)."""
    import tensorflow as tf

    n, d, v = 300, 24, 1000
    h = rng.normal(size=(n, d)).astype("float32")
    k = (rng.normal(size=(d, v)) * 0.5).astype("float32")
    y = rng.integers(0, v, n).astype("int32")
    s = h.astype(np.float64) @ k
    m = s.max(1)
    p = np.exp(s - m[:, None])
    lse = np.log(p.sum(1)) + m
    loss = lse - s[np.arange(n), y]
    p /= p.sum(1, keepdims=True)
    p[np.arange(n), y] -= 1.0
    dh = p @ k.T.astype(np.float64)
    hv = tf.Variable(h)
    with tf.GradientTape() as tape:
        got = linear_ce(hv, k, y, chunk_budget_mib=budget)
        total = tf.reduce_sum(got)
    g = tape.gradient(total, hv)
    assert np.max(np.abs(np.asarray(got) - loss)) <= 1e-5 * np.max(np.abs(loss))
    assert np.max(np.abs(np.asarray(g) - dh)) <= 1e-5 * np.max(np.abs(dh))


_BUDGET_JAXPR = """
import jax, jax.numpy as jnp, numpy as np, keras
from keras_ce_plugin.large_vocab import fused_linear_ce_sum, linear_ce

N, D, V = 2048, 48, 16384  # D appears in no chunk's logits shape


def biggest_without_d(jaxpr):
    out = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            if D not in shape:
                out = max(out, int(np.prod(shape)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out = max(out, biggest_without_d(inner))
    return out


h = jnp.ones((N, D)); k = jnp.ones((D, V)); y = jnp.arange(N) % V; w = jnp.ones((N,))
out = {}
for budget in (1.0, 4.0):
    fns = {
        "linear_ce": lambda h, k: jnp.sum(linear_ce(h, k, y, chunk_budget_mib=budget)),
        "fused_sum": lambda h, k: fused_linear_ce_sum(h, k, y, w, chunk_budget_mib=budget)[0],
    }
    for name, fn in fns.items():
        jaxpr = jax.make_jaxpr(jax.value_and_grad(fn, argnums=(0, 1)))(h, k).jaxpr
        out[f"{name}@{budget}"] = biggest_without_d(jaxpr)
naive = lambda h, k: jnp.sum(keras.losses.sparse_categorical_crossentropy(
    y, h @ k, from_logits=True))
out["naive"] = biggest_without_d(jax.make_jaxpr(jax.value_and_grad(naive, argnums=(0, 1)))(h, k).jaxpr)
print(__import__("json").dumps(out))
"""


def test_budget_bounds_what_is_traced():
    """Structural (JAX jaxpr of value-and-gradient, loops and custom rules included):
    every intermediate without ``d`` among its dimensions (logits chunks, their
    gradients, per-token buffers) holds at most half the budget's float32 elements
    (the other half is the kernel block and the token rows), a larger budget gives
    larger chunks, and the naive loss (the control) holds all N x V logits."""
    require_backend("jax")
    proc = run_python(_BUDGET_JAXPR, cwd=REPO, env={"KERAS_BACKEND": "jax"})
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    half = {1.0: 2**20 // 8, 4.0: 4 * 2**20 // 8}
    for name in ("linear_ce", "fused_sum"):
        for budget, limit in half.items():
            assert sizes[f"{name}@{budget}"] <= limit, sizes
        assert sizes[f"{name}@4.0"] >= 2 * sizes[f"{name}@1.0"], sizes
    assert sizes["naive"] >= 2048 * 16384, sizes


_XLA_TEMP = """
import json, jax, jax.numpy as jnp, keras
from keras_ce_plugin.large_vocab import fused_linear_ce_sum, linear_ce

N, D, V = 4096, 64, 65536
h = jnp.ones((N, D)); k = jnp.ones((D, V)); y = jnp.arange(N) % V; w = jnp.ones((N,))
fns = {
    "linear_ce": lambda h, k: jnp.sum(linear_ce(h, k, y)),
    "fused_sum": lambda h, k: fused_linear_ce_sum(h, k, y, w)[0],
    "naive": lambda h, k: jnp.sum(keras.losses.sparse_categorical_crossentropy(
        y, h @ k, from_logits=True)),
}
out = {}
for name, fn in fns.items():
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(h, k).compile()
    out[name] = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps(out))
"""


def test_xla_holds_one_chunk_at_a_time():
    """Structural, on what XLA allocates (JAX subprocess): the compiled
    value-and-gradient's temporary memory stays within twice the default budget for
    ``linear_ce`` and ``fused_linear_ce_sum`` at N = 4096, V = 65,536, where the naive
    loss (the control) holds at least the N x V logits. Without the data dependency
    between chunks (``_jax.after``) XLA's CPU scheduler ran every chunk's matmul first
    and held all their logits: 2 N x V for the forward pass."""
    require_backend("jax")
    proc = run_python(_XLA_TEMP, cwd=REPO, env={"KERAS_BACKEND": "jax"})
    temp = json.loads(proc.stdout.strip().splitlines()[-1])
    logits = 4096 * 65536 * 4
    assert temp["naive"] >= logits, temp
    for name in ("linear_ce", "fused_sum"):
        assert temp[name] <= 2 * 64 * 2**20, temp

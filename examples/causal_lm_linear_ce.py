"""A small causal LM trained with the naive loss and with the fused ``LinearCE``.

The model: token ids -> ``keras.layers.ReversibleEmbedding`` -> one causal
self-attention block -> final hidden states -> the same embedding, reversed (a tied
head), as in keras-hub's ``CausalLM``. ``LinearCEModel(backbone, head=embedding)``
outputs the logits as before; compiled with ``LinearCE`` its ``fit`` never forms
them. Both runs start from the same weights and see the same batches; the script
prints their loss curves and the peak memory of ``fit`` side by side, then saves
the fused model to ``.keras``, reloads it with ``safe_mode=True`` and checks that
``predict`` gives the same logits.

    python examples/causal_lm_linear_ce.py                  # V=32768, a few batches
    python examples/causal_lm_linear_ce.py --vocab 8192 --steps 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ce_plugin  # noqa: E402, F401 - registers the customloss names
from keras_ce_plugin.large_vocab import LinearCE, LinearCEModel  # noqa: E402


def build(vocab: int, dim: int, seq: int, seed: int = 0) -> LinearCEModel:
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((seq,), dtype="int32", name="tokens")
    embedding = keras.layers.ReversibleEmbedding(vocab, dim, name="token_embedding")
    x = embedding(tokens)
    a = keras.layers.MultiHeadAttention(4, dim // 4, name="attention")(x, x, use_causal_mask=True)
    x = keras.layers.LayerNormalization(name="norm_1")(x + a)
    f = keras.layers.Dense(2 * dim, activation="gelu", name="ffn_in")(x)
    x = keras.layers.LayerNormalization(name="norm_2")(
        x + keras.layers.Dense(dim, name="ffn_out")(f)
    )
    backbone = keras.Model(tokens, x, name="backbone")
    return LinearCEModel(backbone, head=embedding, name="causal_lm")


def _peak_bytes() -> int | None:
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf.config.experimental.get_memory_info("CPU:0")["peak"]


def _reset_peak() -> None:
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("CPU:0")


def train(model: LinearCEModel, loss, data, batch: int, steps: int) -> tuple[list[float], Any]:
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    x, y, w = data
    model.fit(x[:batch], y[:batch], sample_weight=w[:batch], batch_size=batch, verbose=0)  # build
    _reset_peak()
    losses = []
    for step in range(steps):
        sl = slice(step * batch, (step + 1) * batch)
        logs = model.train_on_batch(x[sl], y[sl], sample_weight=w[sl], return_dict=True)
        losses.append(float(logs["loss"]))
    return losses, _peak_bytes()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    n = args.batch * (args.steps + 1)
    # Zipf-like tokens so that the loss has something to learn; the last positions
    # are padding (sample weight 0), as keras-hub passes its padding mask.
    ids = np.minimum(rng.zipf(1.3, size=(n, args.seq + 1)), args.vocab) - 1
    x, y = ids[:, :-1].astype("int32"), ids[:, 1:].astype("int32")
    w = np.ones_like(y, dtype="float32")
    w[:, -args.seq // 8 :] = 0.0
    data = (x, y, w)

    naive = build(args.vocab, args.dim, args.seq)
    fused = build(args.vocab, args.dim, args.seq)
    fused.set_weights(naive.get_weights())
    base = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    naive_curve, naive_peak = train(naive, base, data, args.batch, args.steps)
    fused_curve, fused_peak = train(fused, LinearCE(), data, args.batch, args.steps)

    print(
        f"backend={keras.backend.backend()} V={args.vocab} d={args.dim} "
        f"tokens/batch={args.batch * args.seq}"
    )
    print(f"{'step':>4} {'naive loss':>12} {'LinearCE loss':>14} {'rel. diff':>10}")
    for i, (a, b) in enumerate(zip(naive_curve, fused_curve)):
        print(f"{i:>4} {a:12.8f} {b:14.8f} {abs(a - b) / abs(a):10.2e}")
    if naive_peak is not None:
        print(
            f"peak memory of fit (TF allocator): naive {naive_peak / 2**20:.1f} MiB, "
            f"LinearCE {fused_peak / 2**20:.1f} MiB ({fused_peak / naive_peak:.0%})"
        )

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "causal_lm.keras")
        fused.save(path)
        reloaded = keras.models.load_model(path, safe_mode=True)
        a, b = fused.predict(x[:2], verbose=0), reloaded.predict(x[:2], verbose=0)
        print(
            f"reloaded .keras: predict max |diff| = {np.max(np.abs(a - b)):.3g}, "
            f"logits shape {a.shape}, loss {type(reloaded.loss).__name__}"
        )


if __name__ == "__main__":
    main()

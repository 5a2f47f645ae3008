"""A causal LM trained with ``LinearCE`` on 8 devices, the vocabulary sharded.

On this CPU the 8 devices are virtual (``XLA_FLAGS`` is set here, before JAX
starts); on 8 accelerators drop that line. The tied embedding ``(V, d)`` is laid
out ``("model", None)`` by a ``keras.distribution.LayoutMap``: each device holds
``V / model`` rows of it. Nothing else changes in the training code:
``LinearCEModel`` + ``LinearCE`` find the layout themselves, each device computes
its shard's log-sum-exp over its own vocabulary chunks and the devices exchange
per-token numbers only. The script trains the same model from the same weights on
one device and on the mesh and prints both loss curves.

    python examples/many_devices.py                   # mesh 2 x 4, V=32768
    python examples/many_devices.py --mesh 1x8 --vocab 8192 --steps 3
"""

from __future__ import annotations

import argparse
import os

os.environ["KERAS_BACKEND"] = "jax"  # Keras' distribution API runs on JAX
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_ce_plugin.large_vocab import LinearCE, LinearCEModel  # noqa: E402


def build(vocab: int, dim: int, seq: int) -> LinearCEModel:
    tokens = keras.Input((seq,), dtype="int32", name="tokens")
    embedding = keras.layers.ReversibleEmbedding(vocab, dim, name="token_embedding")
    x = embedding(tokens)
    a = keras.layers.MultiHeadAttention(4, dim // 4, name="attention")(x, x, use_causal_mask=True)
    x = keras.layers.LayerNormalization(name="norm")(x + a)
    backbone = keras.Model(tokens, x, name="backbone")
    return LinearCEModel(backbone, head=embedding, name="causal_lm")


def train(weights, args, x, y) -> list[float]:
    model = build(args.vocab, args.dim, args.seq)
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LinearCE())
    hist = model.fit(x, y, batch_size=args.batch, epochs=args.steps, shuffle=False, verbose=0)
    return hist.history["loss"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="2x4", help="batch x model, 8 devices in all")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.mesh.split("x"))

    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.3, size=(args.batch, args.seq + 1)), args.vocab) - 1
    x, y = ids[:, :-1].astype("int32"), ids[:, 1:].astype("int32")
    keras.utils.set_random_seed(0)
    weights = build(args.vocab, args.dim, args.seq).get_weights()
    one = train(weights, args, x, y)

    # The whole multi-device part: a mesh, a layout for the embedding, a scope.
    mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["token_embedding/embeddings"] = ("model", None)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        many = train(weights, args, x, y)
        table = build(args.vocab, args.dim, args.seq).get_layer("backbone")
        emb = table.get_layer("token_embedding").embeddings
        shard = emb.value.addressable_shards[0].data.shape

    print(f"{len(keras.distribution.list_devices())} devices, mesh {shape} (batch, model)")
    print(f"embedding {tuple(emb.shape)}, one device holds {shard}")
    print(f"{'step':>4} {'1 device':>12} {'mesh':>12} {'rel. diff':>10}")
    for i, (a, b) in enumerate(zip(one, many)):
        print(f"{i:>4} {a:12.8f} {b:12.8f} {abs(a - b) / abs(a):10.2e}")


if __name__ == "__main__":
    main()

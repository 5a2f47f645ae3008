"""Fine-tune a keras-hub causal LM with the fused loss: ``fused_trainer(causal_lm)``.

A tiny Gemma built from its config (no preset: runs offline) is trained twice from
the same weights: with its own ``fit`` (keras-hub computes the ``N x V`` logits) and
through ``keras_ce_plugin.large_vocab.fused_trainer`` (the logits are never
formed). The script prints both loss curves, then generates with the
fused-trained ``GemmaCausalLM`` and reloads it from ``.keras``.

    python examples/hub_causal_lm_fused.py
    python examples/hub_causal_lm_fused.py --vocab 32000 --layers 2 --seq 256
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_ce_plugin.large_vocab import fused_trainer  # noqa: E402


def gemma(vocab: int, layers: int, dim: int):
    import keras_hub  # the [hub] extra

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocab,
        num_layers=layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=dim,
        intermediate_dim=2 * dim,
        head_dim=dim // 2,
        final_logit_soft_cap=30.0,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    naive, fused = (
        gemma(args.vocab, args.layers, args.dim),
        gemma(args.vocab, args.layers, args.dim),
    )
    fused.set_weights(naive.get_weights())
    rng = np.random.default_rng(0)
    ids = rng.integers(1, args.vocab, (4 * args.batch, args.seq)).astype("int32")
    mask = np.ones_like(ids, bool)
    mask[:, -args.seq // 4 :] = False  # padding, as the preprocessor writes it
    ids[~mask] = 0
    # What `causal_lm.preprocessor` returns: x, next-token labels, padding weights.
    x, y, sw = {"token_ids": ids, "padding_mask": mask}, np.roll(ids, -1, 1), mask.astype("f4")
    fit = {"batch_size": args.batch, "epochs": 3, "verbose": 0, "shuffle": False}

    naive.compile(optimizer=keras.optimizers.SGD(0.5), weighted_metrics=[])
    h_naive = naive.fit(x, y, sample_weight=sw, **fit).history["loss"]
    trainer = fused_trainer(fused)  # shares fused's variables
    trainer.compile(optimizer=keras.optimizers.SGD(0.5))
    h_fused = trainer.fit(x, y, sample_weight=sw, **fit).history["loss"]
    print("epoch  causal_lm.fit  fused_trainer")
    for i, (a, b) in enumerate(zip(h_naive, h_fused)):
        print(f"{i + 1:5d}  {a:13.6f}  {b:13.6f}")

    fused.compile(sampler="greedy")
    prompt = {"token_ids": ids[:1].copy(), "padding_mask": mask[:1].copy()}
    prompt["padding_mask"][:, 4:] = False
    prompt["token_ids"][:, 4:] = 0
    out = fused.generate(prompt, max_length=12, stop_token_ids=None)["token_ids"]
    print("generated:", np.asarray(out)[0, :12].tolist())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gemma.keras")
        fused.save(path)
        reloaded = keras.models.load_model(path)
        reloaded.compile(sampler="greedy")
        again = reloaded.generate(prompt, max_length=12, stop_token_ids=None)["token_ids"]
        assert np.array_equal(np.asarray(again), np.asarray(out))
        print("saved, reloaded, same generation")


if __name__ == "__main__":
    main()

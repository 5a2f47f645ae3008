"""Whole ``fit`` steps with a large vocabulary: naive vs fused, time and memory.

Two models, each method in its own process (TensorFlow):

* ``--model gemma`` (default): a Gemma-shaped ``keras_hub.models.GemmaCausalLM``
  (2 layers, tied embedding, V = 256,000 by default) trained by ``causal_lm.fit``
  (naive: full logits + keras-hub's loss) or by ``fused_trainer(causal_lm).fit``;
* ``--model dense``: an ``Embedding`` backbone and a ``Dense(V)`` head, as a
  ``keras.Sequential`` with ``SparseCategoricalCrossentropy`` (naive) or a
  ``LinearCEModel`` with ``LinearCE`` (fused): ``LinearCE`` in ``fit`` at the loss
  benchmark's shapes.

Each case runs ``naive`` (the loss alone: ``weighted_metrics=[]``), ``naive_acc`` (as
``naive`` with a token accuracy: keras-hub's default ``compile``, or
``sparse_categorical_accuracy`` for the dense model), ``fused`` (the fused trainer as
made by default, which reports ``token_accuracy``: to compare with ``naive_acc``) and
``fused_noacc`` (``token_accuracy=False``: the loss alone, to compare with ``naive``);
the ratios are against ``naive``.

``--frozen`` freezes the head (as LoRA or a frozen embedding leaves it).
``--backend jax`` or ``torch`` runs the same there, where memory is the process RSS high-water
mark of a step after the warm-up (large blocks are returned to the system when freed,
so each step shows its own peak) in both columns.

Time: median of ``--repeats`` training steps after one warm-up step, timed from each
batch's begin to its end inside one ``fit`` call (wall and process CPU time; a whole
``fit`` call's wall time on TensorFlow can include an idle wait at its end). Memory,
two ways, each above the built model (weights, optimizer state, the inputs) and one
set of gradients (the trainable weights' size, which any method holds while it
applies them): the TensorFlow CPU allocator's high-water mark in a step after
the warm-up, and the process RSS high-water mark (``/proc/self/clear_refs``) of the
first step, tracing included (TensorFlow's oneDNN allocator keeps freed memory pooled,
so later steps leave the RSS flat).

``--memory-limit GIB``: for each method, the largest tokens per batch (sequences of
512, doubling from ``--tokens``) whose first ``fit`` step (tracing included) keeps the
process RSS within ``GIB`` above the built model: how much longer sequences can get.

    python benchmarks/bench_hub.py --cases 128x256000,512x256000 --tokens 1024
    python benchmarks/bench_hub.py --model dense --cases 512x131072 --tokens 4096
    python benchmarks/bench_hub.py --cases 128x256000 --memory-limit 4
    python benchmarks/bench_hub.py --cases 512x256000 --dtype mixed_bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_large_vocab import _reset_peak, _status_kib  # the same directory

GIB = 1024**3
SEQ = 512


def _build(args: argparse.Namespace):
    """The model to train, its ``x`` and ``y``, and the trainable bytes."""
    import keras
    import numpy as np

    from keras_ce_plugin.large_vocab import LinearCE, LinearCEModel, fused_trainer

    dim, vocab = (int(v) for v in args.case.split("x"))
    keras.utils.set_random_seed(0)
    batch = max(1, args.tokens // SEQ)
    ids = np.random.default_rng(0).integers(1, vocab, (batch, SEQ)).astype("int32")
    y = np.roll(ids, -1, 1)
    optimizer = keras.optimizers.SGD(1e-3)
    accuracy = args.method != "fused_noacc"  # the fused models' token_accuracy
    if args.model == "gemma":
        import keras_hub

        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=vocab,
            num_layers=2,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=dim,
            intermediate_dim=2 * dim,
            head_dim=dim // 2,
            dtype=args.dtype,
        )
        lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
        if args.frozen:
            backbone.token_embedding.trainable = False
        x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
        model = (
            lm if args.method.startswith("naive") else fused_trainer(lm, token_accuracy=accuracy)
        )
        # naive: the loss alone; naive_acc: keras-hub's default compile, whose
        # weighted_metrics add a token accuracy (as the fused trainer's default does).
        kwargs = {"weighted_metrics": []} if args.method == "naive" else {}
        if args.method == "fused_float32":  # the trainer with float32 matmuls
            kwargs = {"loss": LinearCE()}
        model.compile(optimizer=optimizer, **kwargs)
    else:
        inputs = keras.Input((SEQ,), dtype="int32")
        backbone = keras.Model(inputs, keras.layers.Embedding(1000, dim)(inputs))
        head = keras.layers.Dense(vocab, trainable=not args.frozen)
        x = ids % 1000
        if args.method.startswith("naive"):
            model = keras.Sequential([backbone, head])
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            acc = ["sparse_categorical_accuracy"] if args.method == "naive_acc" else []
            model.compile(optimizer=optimizer, loss=loss, weighted_metrics=acc)
        else:
            head.build((None, SEQ, dim))
            model = LinearCEModel(backbone, head=head, token_accuracy=accuracy)
            model.compile(optimizer=optimizer, loss=LinearCE())
        model.build((None, SEQ))
    trainable = sum(int(np.prod(w.shape)) * 4 for w in model.trainable_weights)
    return model, x, y, batch, trainable


def _timed_steps(model, x, y, batch: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU time of ``repeats`` training steps, each from its batch's begin to
    its end in one ``fit`` call over ``repeats + 1`` copies of the batch (the first one
    a warm-up). Not whole ``fit`` calls: on TensorFlow, a ``fit`` call's end may wait,
    idle, for tf.data's autotuning thread to wake (README, "Fine-tune a keras-hub
    model"), which would round its wall time up."""
    import keras
    import numpy as np

    def tiled(a):
        if isinstance(a, dict):
            return {k: tiled(v) for k, v in a.items()}
        return np.tile(a, (repeats + 1, 1))

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, batch, logs=None):
            self.wall.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    clock = Clock()
    model.fit(
        tiled(x), tiled(y), batch_size=batch, epochs=1, verbose=0, shuffle=False, callbacks=[clock]
    )
    return clock.wall[1:], clock.cpu[1:]


def _child(args: argparse.Namespace) -> None:
    model, x, y, batch, trainable = _build(args)

    def step():
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)

    if args.backend != "tensorflow":
        step()  # warm-up

        def rss_of(run):
            rss0 = _status_kib("VmRSS") * 1024
            _reset_peak()
            run()
            return (_status_kib("VmHWM") * 1024 - rss0 - trainable) / GIB

        rss = rss_of(step)
        times, cpu = _timed_steps(model, x, y, batch, args.repeats)
        result = {"median_s": statistics.median(times), "cpu_s": statistics.median(cpu)}
        print(json.dumps({**result, "peak_gib": rss, "rss_gib": rss}))
        return

    import tensorflow as tf

    def memory(run):
        tf.config.experimental.reset_memory_stats("CPU:0")
        base = tf.config.experimental.get_memory_info("CPU:0")["current"]
        rss0 = _status_kib("VmRSS") * 1024
        _reset_peak()
        run()
        alloc = tf.config.experimental.get_memory_info("CPU:0")["peak"] - base
        rss = _status_kib("VmHWM") * 1024 - rss0
        return (alloc - trainable) / GIB, (rss - trainable) / GIB

    # RSS: the first step (tracing included), as TensorFlow's oneDNN allocator keeps
    # freed memory pooled: later steps reuse the pool and leave the RSS flat.
    _, rss = memory(step)
    if args.memory_limit:
        print(json.dumps({"tokens": args.tokens, "rss_gib": rss}))
        return
    alloc, _ = memory(step)
    times, cpu = _timed_steps(model, x, y, batch, args.repeats)
    result = {"median_s": statistics.median(times), "cpu_s": statistics.median(cpu)}
    print(json.dumps({**result, "peak_gib": alloc, "rss_gib": rss}))


def _run(args: argparse.Namespace, case: str, method: str, tokens: int) -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": args.backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    cmd = [sys.executable, __file__, "--child", "--case", case, "--method", method]
    cmd += ["--tokens", str(tokens), "--repeats", str(args.repeats), "--model", args.model]
    cmd += ["--frozen"] if args.frozen else []
    cmd += ["--dtype", args.dtype, "--backend", args.backend]
    cmd += ["--memory-limit", str(args.memory_limit)] if args.memory_limit else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{case} {method} N={tokens} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _largest(args: argparse.Namespace, case: str, method: str) -> tuple[int, list[dict]]:
    """Doubling the tokens until the step's RSS exceeds the limit (or ``--max-tokens``)."""
    tokens, best, seen = args.tokens, 0, []
    while tokens <= args.max_tokens:
        r = _run(args, case, method, tokens)
        seen.append(r)
        print(f"  {case} {method:>6} N={tokens:>7} rss {r['rss_gib']:.3f} GiB", flush=True)
        if r["rss_gib"] > args.memory_limit:
            break
        best, tokens = tokens, tokens * 2
    return best, seen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="128x256000", help="comma-separated dxV")
    p.add_argument("--model", default="gemma", choices=["gemma", "dense"])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frozen", action="store_true", help="freeze the head (LoRA-like)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "mixed_bfloat16"],
        help="the Gemma model's dtype policy; with mixed_bfloat16 the fused trainer runs "
        "twice: its default (matmul_precision='input') and fused_float32",
    )
    p.add_argument("--memory-limit", type=float, default=0.0, help="GiB above the model")
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax", "torch"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.backend != "tensorflow" and args.memory_limit:
        p.error(f"--backend {args.backend}: --memory-limit needs TensorFlow")
    if args.child:
        _child(args)
        return
    print(
        f"model={args.model} backend={args.backend} frozen={args.frozen} N={args.tokens} "
        f"repeats={args.repeats} "
        f"load={os.getloadavg()}"
    )
    if args.memory_limit:
        print(f"largest tokens per batch within {args.memory_limit} GiB of RSS above the model")
        for case in args.cases.split(","):
            found = {m: _largest(args, case, m)[0] for m in ("naive", "fused")}
            ratio = found["fused"] / found["naive"] if found["naive"] else float("inf")
            print(f"{case:>12} naive {found['naive']} fused {found['fused']} ({ratio:.0f}x)")
        print(f"load after: {os.getloadavg()}")
        return
    print(
        f"{'case dxV':>12} {'method':>11} {'step s':>7} {'cpu s':>7} {'x naive':>8} "
        f"{'peak GiB':>9} {'%':>6} {'rss GiB':>8} {'%':>6}"
    )
    for case in args.cases.split(","):
        methods = ("naive", "naive_acc", "fused", "fused_noacc")
        methods += ("fused_float32",) if args.dtype != "float32" else ()
        results = {m: _run(args, case, m, args.tokens) for m in methods}
        ref = results["naive"]
        for m, r in results.items():
            print(
                f"{case:>12} {m:>11} {r['median_s']:7.2f} {r['cpu_s']:7.2f} "
                f"{r['cpu_s'] / ref['cpu_s']:8.2f} {r['peak_gib']:9.3f} "
                f"{100 * r['peak_gib'] / ref['peak_gib']:5.1f}% {r['rss_gib']:8.3f} "
                f"{100 * r['rss_gib'] / ref['rss_gib']:5.1f}%",
                flush=True,
            )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

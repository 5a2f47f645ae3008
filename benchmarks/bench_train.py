"""The tutorial's plain ``model.fit`` vs ``keras-ce train``, back to back, end to end.

Both run as fresh processes on the same images, epochs, batch size and seed and are
timed from process start to exit (imports, data loading, training; ``keras-ce train``
also saves model.keras, history.json, metrics.json and curves.png):

* ``tutorial``: the tutorial's script -- build VGG16 + head, ``compile(Adam,
  customloss>CategoricalCE)``, ``model.fit(x, y, epochs, batch_size,
  validation_data=(x_test, y_test))`` on the full model (the frozen base runs on
  every image in every epoch);
* ``keras-ce train``: the package's command (VGG16 features computed once, the
  head trained on them).

It prints both wall times, their ratio (median over ``--repeats``, order alternated),
the processes' CPU times (less sensitive to other load on a shared machine) and the
largest per-epoch difference between the two runs' curves.

``--ablations`` also times, one fresh process per variant on a subset, the
tutorial's plain ``fit``, the feature cache alone, and each speed mechanism of
``keras_ce_plugin.training.speedups`` switched on alone through its ``TrainConfig``
field (``fast_input_grad``, ``xla_optimizer``, ``xla_step``) and with the defaults,
one line each with whether the mechanism engaged; then the alternatives tried for
the head (Keras' ``jit_compile``, tf.data prefetch, thread settings, extraction
batch size). Each line says how far its curves are from the tutorial's.

    python benchmarks/bench_train.py --skip-end-to-end --ablations --ablation-train 64 \\
        --ablation-test 32 --ablation-epochs 2 --ablation-repeats 1   # a quick smoke run

``--probe-fails`` runs the ablations as on a CPU where the fast input gradient's
bit-identity probe fails, to show which mechanisms engage there.

    python benchmarks/bench_train.py --data-dir ../shared/data/cifar10-sample/cifar-10-batches-py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-sample" / "cifar-10-batches-py"

TUTORIAL = textwrap.dedent(
    """
    import json, sys
    import keras
    import keras_ce_plugin  # noqa: F401  (the loss name)
    from keras_ce_plugin.data import load_cifar10
    from keras_ce_plugin.models import build_vgg16_classifier

    data_dir, limit_train, limit_test, epochs, batch_size, seed, weights, out = sys.argv[1:]
    limit = lambda s: None if s == "all" else int(s)
    (x_train, y_train), (x_test, y_test) = load_cifar10(
        data_dir, limit_train=limit(limit_train), limit_test=limit(limit_test)
    )
    keras.utils.set_random_seed(int(seed))
    model = build_vgg16_classifier(None if weights == "none" else weights)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="customloss>CategoricalCE",
                  metrics=["accuracy"])
    keras.utils.set_random_seed(int(seed))  # the data order, as keras-ce train seeds it
    hist = model.fit(x_train, y_train, epochs=int(epochs), batch_size=int(batch_size),
                     validation_data=(x_test, y_test), verbose=0)
    json.dump({k: [float(v) for v in vs] for k, vs in hist.history.items()}, open(out, "w"))
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


CPU_S: dict[str, list[float]] = collections.defaultdict(list)


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], name: str) -> float:
    t, cpu = time.perf_counter(), _cpu_children()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    CPU_S[name].append(_cpu_children() - cpu)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return wall


def run_tutorial(args: argparse.Namespace, out: Path) -> tuple[float, dict]:
    hist = out / "tutorial_history.json"
    wall = _run(
        [
            sys.executable,
            "-c",
            TUTORIAL,
            str(args.data_dir),
            str(args.limit_train or "all"),
            str(args.limit_test or "all"),
            str(args.epochs),
            str(args.batch_size),
            str(args.seed),
            args.weights,
            str(hist),
        ],
        "tutorial",
    )
    return wall, json.loads(hist.read_text())


def run_keras_ce(args: argparse.Namespace, out: Path, xla: str) -> tuple[float, dict, dict]:
    run_dir = out / f"run-{xla}"
    cmd = [
        sys.executable,
        "-m",
        "keras_ce_plugin.cli",
        "train",
        "--data-dir",
        str(args.data_dir),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--weights",
        args.weights,
        "--xla",
        xla,
        "--out",
        str(run_dir),
        "--overwrite",
        "--quiet",
    ]
    if args.limit_train:
        cmd += ["--limit-train", str(args.limit_train)]
    if args.limit_test:
        cmd += ["--limit-test", str(args.limit_test)]
    wall = _run(cmd, f"keras-ce train --xla {xla}")
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return wall, history, metrics


def end_to_end(args: argparse.Namespace) -> None:
    names = ["tutorial", *(f"keras-ce train --xla {m}" for m in args.xla)]
    walls: dict[str, list[float]] = {name: [] for name in names}
    runs: dict[str, tuple[dict, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                if name == "tutorial":
                    wall, ref = run_tutorial(args, out)
                else:
                    wall, hist, metrics = run_keras_ce(args, out, name.rsplit(" ", 1)[1])
                    runs[name] = (hist, metrics)
                walls[name].append(wall)
                print(f"  repeat {r + 1}: {name}: {wall:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in CPU_S.items()}
    metrics = next(iter(runs.values()))[1]
    print()
    print(
        f"{metrics['num_train']} train / {metrics['num_test']} test images, {args.epochs} "
        f"epochs, batch {args.batch_size}, --weights {args.weights}, seed {args.seed}, "
        f"median of {args.repeats}; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print()
    print(
        "| run | wall time (s) | per epoch (s) | CPU time (s) | test accuracy | speed-up "
        "(wall) | speed-up (CPU) | largest curve difference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| tutorial `model.fit` | {med['tutorial']:.1f} | {med['tutorial'] / args.epochs:.1f} | "
        f"{cpu['tutorial']:.1f} | {ref['val_accuracy'][-1]:.4f} | 1.00x | 1.00x | - |"
    )
    for name, (hist, m) in runs.items():
        diff = max(max(abs(a - b) for a, b in zip(ref[k], hist[k])) for k in hist)
        print(
            f"| `{name}` | {med[name]:.1f} | {med[name] / args.epochs:.1f} | {cpu[name]:.1f} | "
            f"{m['test_accuracy']:.4f} | {med['tutorial'] / med[name]:.2f}x | "
            f"{cpu['tutorial'] / cpu[name]:.2f}x | {diff:.1e} |"
        )
    print()
    print("(CPU time depends less on what else runs on the machine than wall time)")
    for name, (_, m) in runs.items():
        print(f"{name} phases (s): {json.dumps(m['timings_s'], sort_keys=True)}")


# --------------------------------------------------------------------------- #
# Ablations: each speed mechanism on its own, then what else was tried
# --------------------------------------------------------------------------- #
ABLATION = textwrap.dedent(
    """
    import dataclasses, json, os, sys, time
    import numpy as np
    variant, data_dir, n_train, n_test, epochs = sys.argv[1:6]
    import tensorflow as tf
    if variant.startswith("threads"):
        inter, intra = map(int, variant[len("threads"):].split("x"))
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    import keras
    import keras_ce_plugin  # noqa: F401
    from keras_ce_plugin.data import load_cifar10
    from keras_ce_plugin.models import build_vgg16_classifier, split_base_and_head
    from keras_ce_plugin.training import TrainConfig, extract_features, speedups, train

    if os.environ.get("KERAS_CE_BENCH_PROBE_FAILS"):  # a CPU where the probe fails
        from keras_ce_plugin.training.speedups import fast_grad
        fast_grad.same_bits_as_tensorflow = lambda *args, **kwargs: False

    (x, y), (xt, yt) = load_cifar10(data_dir, limit_train=int(n_train), limit_test=int(n_test))
    times = []
    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()
        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)
    # The library's own switches (TrainConfig), each alone on the feature cache.
    cached = TrainConfig(weights=None, epochs=int(epochs), verbose=False, xla_optimizer=False,
                         xla_step=False, fast_input_grad=False)
    configs = {
        "tutorial": dataclasses.replace(cached, feature_cache=False),
        "cached": cached,
        "fast_input_grad": dataclasses.replace(cached, fast_input_grad=True),
        "xla_optimizer": dataclasses.replace(cached, xla_optimizer=True),
        "xla_step": dataclasses.replace(cached, xla_step=True),
        "default": TrainConfig(weights=None, epochs=int(epochs), verbose=False),
    }
    if variant in configs:
        fit = keras.Model.fit
        def timed_fit(self, *args, callbacks=None, **kwargs):
            return fit(self, *args, callbacks=[*(callbacks or []), Clock()], **kwargs)
        keras.Model.fit = timed_fit
        result = train(configs[variant], ((x, y), (xt, yt)))
        history, engaged = result.history, result.speedups
        extract = float("nan")
    else:  # alternatives tried for the head on cached features (plain Adam)
        keras.utils.set_random_seed(0)
        model = build_vgg16_classifier(None)
        base, head_layers = split_base_and_head(model)
        bs = int(variant[len("extract"):]) if variant.startswith("extract") else 128
        extract_features(base, x[:bs], batch_size=bs, verbose=False)  # warm up
        t = time.perf_counter()
        f = extract_features(base, x, batch_size=bs, verbose=False)
        extract = len(x) / (time.perf_counter() - t)
        ft = extract_features(base, xt, batch_size=bs, verbose=False)
        head = speedups.head_model(f.shape[1:], head_layers, xla_step=False)
        head.compile(optimizer=speedups.make_optimizer(1e-3, xla_update=False),
                     loss="customloss>CategoricalCE", metrics=["accuracy"],
                     jit_compile=variant == "keras_jit")
        keras.utils.set_random_seed(0)
        if variant == "prefetch":
            train_ds = tf.data.Dataset.from_tensor_slices((f, y)).shuffle(len(f), seed=0)
            train_ds = train_ds.batch(32).prefetch(tf.data.AUTOTUNE)
            val_ds = tf.data.Dataset.from_tensor_slices((ft, yt)).batch(32)
            val_ds = val_ds.prefetch(tf.data.AUTOTUNE)
            hist = head.fit(train_ds, epochs=int(epochs), validation_data=val_ds, verbose=0,
                            callbacks=[Clock()])
        else:
            hist = head.fit(f, y, batch_size=32, epochs=int(epochs), validation_data=(ft, yt),
                            shuffle=True, verbose=0, callbacks=[Clock()])
        history = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
        engaged = None
    later = sorted(times[1:]) or times
    print(json.dumps({"epoch_s": later[len(later) // 2], "extract_img_s": extract,
                      "history": history, "engaged": engaged}))
    """
)

# One line per speed mechanism (the library's TrainConfig switches), then alternatives.
MECHANISMS = {
    "tutorial": "plain fit on the full model, as the tutorial (feature_cache=False)",
    "cached": "feature cache alone (all three mechanisms off)",
    "fast_input_grad": "cache + fast_input_grad",
    "xla_optimizer": "cache + xla_optimizer",
    "xla_step": "cache + xla_step",
    "default": "cache + xla_optimizer + fast_input_grad (the default)",
}
ALTERNATIVES = {
    "keras_jit": "cache + Keras' own jit_compile=True (other dropout masks)",
    "prefetch": "cache + tf.data shuffle/batch/prefetch(AUTOTUNE)",
    "threads1x2": "cache + inter-op 1 / intra-op 2 threads",
    "threads2x1": "cache + inter-op 2 / intra-op 1 threads",
    "extract32": "cache, features extracted in batches of 32",
    "extract256": "cache, features extracted in batches of 256",
}
VARIANTS = {**MECHANISMS, **ALTERNATIVES}


def _ablation_run(args: argparse.Namespace, name: str) -> dict | None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            ABLATION,
            name,
            str(args.data_dir),
            str(args.ablation_train),
            str(args.ablation_test),
            str(args.ablation_epochs),
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(f"{name}: failed\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _engaged(name: str, engaged: dict | None) -> str:
    """Whether the variant's own mechanism was traced into training ("-": not one)."""
    if engaged is None or name not in ("fast_input_grad", "xla_optimizer", "xla_step", "default"):
        return "-"
    on = [k for k, v in engaged.items() if v]
    return ", ".join(on) if on else "NONE"


def ablations(args: argparse.Namespace) -> None:
    variants = args.ablation_variants or list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.ablation_repeats):  # interleaved, order alternated: shared-CPU noise
        names = variants if r % 2 == 0 else variants[::-1]
        for name in names:
            result = _ablation_run(args, name)
            if result is not None:
                runs[name].append(result)
                print(f"  repeat {r + 1}: {name}: {result['epoch_s']:.2f} s/epoch", flush=True)
    med = {
        name: {
            "epoch_s": statistics.median(r["epoch_s"] for r in rs),
            "extract_img_s": statistics.median(r["extract_img_s"] for r in rs),
            "history": rs[0]["history"],
            "engaged": rs[0]["engaged"],
        }
        for name, rs in runs.items()
        if rs
    }
    ref_name = next((n for n in ("tutorial", "cached") if n in med), None)
    if ref_name is None:
        sys.exit("neither the tutorial nor the cached variant ran; nothing to compare with")
    ref = med[ref_name]
    print()
    print(
        f"{args.ablation_train} train / {args.ablation_test} test images, batch 32; median "
        f"over {args.ablation_repeats} interleaved repeats of the median epoch of epochs "
        f"2-{args.ablation_epochs} (epoch 1 includes tracing and XLA compilation); curves "
        f"compared with `{ref_name}`; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
        + ("; the fast input gradient's probe made to fail" if args.probe_fails else "")
        + ":"
    )
    print()
    print(
        f"| variant | s/epoch | speed-up vs {ref_name} | mechanism engaged | extraction img/s "
        f"| max curve diff vs {ref_name} |"
    )
    print("|---|---:|---:|---|---:|---:|")
    for name in variants:
        if name not in med:
            continue
        r = med[name]
        keys = [k for k in ref["history"] if k in r["history"]]
        diff = max(abs(a - b) for k in keys for a, b in zip(ref["history"][k], r["history"][k]))
        extract = "-" if r["extract_img_s"] != r["extract_img_s"] else f"{r['extract_img_s']:.0f}"
        print(
            f"| {name}: {VARIANTS[name]} | {r['epoch_s']:.2f} | "
            f"{ref['epoch_s'] / r['epoch_s']:.2f}x | {_engaged(name, r['engaged'])} | "
            f"{extract} | {diff:.1e} |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="none", help="none (default here: no download) or a path")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--xla",
        type=lambda text: text.split(","),
        default=["update", "step"],
        help="comma-separated keras-ce train --xla modes to time (default: update,step)",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also time each speed mechanism alone, beside the tutorial, and the "
        "alternatives tried",
    )
    p.add_argument("--ablation-train", type=int, default=2048)
    p.add_argument("--ablation-test", type=int, default=256)
    p.add_argument("--ablation-epochs", type=int, default=4)
    p.add_argument("--ablation-repeats", type=int, default=2)
    p.add_argument(
        "--ablation-variants",
        type=lambda text: text.split(","),
        default=None,
        help=f"comma-separated subset of: {', '.join(VARIANTS)} (default: all)",
    )
    p.add_argument(
        "--probe-fails",
        action="store_true",
        help="ablations as on a CPU where the fast input gradient's bit-identity probe "
        "fails (the probe answers no): which mechanisms engage there",
    )
    p.add_argument("--skip-end-to-end", action="store_true")
    args = p.parse_args(argv)
    if not args.skip_end_to_end:
        end_to_end(args)
    if args.ablations:
        if args.probe_fails:
            os.environ["KERAS_CE_BENCH_PROBE_FAILS"] = "1"
        print()
        ablations(args)


if __name__ == "__main__":
    main()

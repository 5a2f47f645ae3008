"""Serving benchmark: Keras vs the SavedModel signature vs ONNX Runtime (float, int8).

Measured side by side in one process on the tutorial's VGG16 classifier (frozen
VGG16 base + Flatten, Dense 4096, Dropout, Dense 4096, Dropout, Dense 10 softmax):

* throughput (images/s) at batch 1 and batch 256: median over repeats, the
  runtimes interleaved within each repeat so they see the same machine load;
* latency at batch 1: p50 and p99 over ``--latency-runs`` calls each.

Runtimes: ``keras.predict`` (``model.predict``), ``keras.call`` (``model(x)``),
``savedmodel`` (``serving_default`` of the exported SavedModel, fed NumPy),
``onnx`` and ``onnx.int8`` (ONNX Runtime, CPU, options from
``keras_ce_plugin.export._serve_onnx.session_options``: all graph optimisations,
sequential, ``--threads`` intra-op threads). ``--sweep-ort`` also measures other
ONNX Runtime settings so the chosen ones are justified by numbers.

Without ``--model``, the classifier is built with random VGG16 weights (no download)
and its head is trained briefly on CIFAR-10 images (features of the frozen base
cached) so the int8 top-1 agreement is measured on a model with real margins.

    python benchmarks/bench_serve.py [--model run/model.keras] [--data-dir D]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-sample" / "cifar-10-batches-py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a .keras classifier (default: build + train the VGG16 head)")
    p.add_argument(
        "--data-dir",
        default=os.environ.get("KERAS_CE_CIFAR10_DIR") or str(DEFAULT_DATA),
        help="cifar-10-batches-py directory (head training, int8 calibration, eval)",
    )
    p.add_argument("--train-images", type=int, default=2048, help="head training images")
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--eval-images", type=int, default=1000, help="test images for agreement")
    p.add_argument("--batch", type=int, default=256, help="large batch size")
    p.add_argument("--repeats", type=int, default=5, help="repeats at the large batch")
    p.add_argument("--latency-runs", type=int, default=100, help="batch-1 calls per runtime")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all)")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--sweep-ort", action="store_true", help="also compare ORT settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the exported artifacts (temp dir)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_model(args, x_train, y_train):
    import keras

    from keras_ce_plugin.models import build_vgg16_classifier, split_base_and_head

    keras.utils.set_random_seed(args.seed)
    model = build_vgg16_classifier(weights=None)
    model.compile(optimizer="adam", loss="customloss>CategoricalCE", metrics=["accuracy"])
    base, head_layers = split_base_and_head(model)
    # No ImageNet weights offline: He-initialise the frozen convolutions so their random
    # features keep their scale through 13 ReLU layers (Glorot's shrink ~2x per layer
    # and leave the head nothing to learn from). Timing does not depend on the values.
    # (One seed per layer: a seeded initializer repeats its values for equal shapes.)
    convs = [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]
    for i, layer in enumerate(convs):
        init = keras.initializers.HeNormal(seed=args.seed * 1000 + i)
        layer.kernel.assign(init(layer.kernel.shape))
    t0 = time.perf_counter()
    features = base.predict(x_train, batch_size=256, verbose=0)
    head = keras.Sequential([keras.Input(features.shape[1:]), *head_layers])
    head.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="customloss>CategoricalCE", metrics=["accuracy"]
    )
    hist = head.fit(features, y_train, epochs=args.head_epochs, batch_size=64, verbose=0)
    log(
        f"head trained on {len(x_train)} images in {time.perf_counter() - t0:.0f} s "
        f"(train accuracy {hist.history['accuracy'][-1]:.3f})"
    )
    return model


def timed(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def measure(runtimes: dict, x_big: np.ndarray, args) -> dict:
    x1 = x_big[:1]
    for fn in runtimes.values():  # warm-up: tracing, allocation, kernel selection
        fn(x_big)
        fn(x1)
        fn(x1)
    big = {k: [] for k in runtimes}
    for _ in range(args.repeats):
        for name, fn in runtimes.items():
            big[name].append(timed(fn, x_big))
    lat = {k: [] for k in runtimes}
    block = 10
    for _ in range(max(1, args.latency_runs // block)):
        for name, fn in runtimes.items():
            lat[name].extend(timed(fn, x1) for _ in range(block))
    out = {}
    for name in runtimes:
        b, la = np.array(big[name]), np.array(lat[name])
        out[name] = {
            "ips_big": len(x_big) / np.median(b),
            "ips_1": 1.0 / np.median(la),
            "p50_ms": 1000 * np.percentile(la, 50),
            "p99_ms": 1000 * np.percentile(la, 99),
        }
    return out


def ort_sweep(onnx_path: str, x_big: np.ndarray, args) -> None:
    import onnxruntime as ort

    from keras_ce_plugin.export._serve_onnx import session_options

    n_cpu = len(os.sched_getaffinity(0))
    variants = {}
    for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        for threads in sorted({1, n_cpu}):
            for spin in ("1", "0"):
                opts = session_options(threads)
                opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
                opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
                sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
                name = sess.get_inputs()[0].name
                variants[f"{level[11:].lower():<8} threads={threads} spin={spin}"] = (
                    lambda x, s=sess, n=name: s.run(None, {n: x})
                )
    sweep_args = argparse.Namespace(repeats=3, latency_runs=30)
    res = measure(variants, x_big, sweep_args)
    print("\nONNX Runtime settings, float model (median; same run):")
    print(f"| graph optimisation, intra-op threads, spinning | img/s @{len(x_big)} | p50 ms @1 |")
    print("|---|---:|---:|")
    for name, r in res.items():
        print(f"| {name} | {r['ips_big']:.0f} | {r['p50_ms']:.2f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras
    import onnxruntime as ort
    import tensorflow as tf

    from keras_ce_plugin import export as ex
    from keras_ce_plugin.data import load_cifar10
    from keras_ce_plugin.export._serve_onnx import OnnxPredictor
    from keras_ce_plugin.files import load_keras_model

    n_train = max(args.train_images, ex.INT8_CALIBRATION_IMAGES)
    (x_train, y_train), (x_test, y_test) = load_cifar10(
        args.data_dir, limit_train=n_train, limit_test=args.eval_images
    )
    if args.model:
        model = load_keras_model(args.model, compile=False)
        source = args.model
    else:
        model = build_model(args, x_train, y_train)
        source = "VGG16 classifier (He-initialised random base, head trained briefly)"

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    t0 = time.perf_counter()
    ex.export_savedmodel(model, work / "saved_model")
    t_sm = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex.export_onnx(model, work / "model.onnx")
    t_onnx = time.perf_counter() - t0
    log(f"exported: SavedModel {t_sm:.1f} s, ONNX {t_onnx:.1f} s -> {work}")
    if not args.no_int8:
        quant = ex.quantize_int8(
            work / "model.onnx",
            work / "model.int8.onnx",
            x_train[: ex.INT8_CALIBRATION_IMAGES],
            x_test,
            min_speedup=0.0,  # keep it whatever it measures: the benchmark reports it
            min_agreement=0.0,
        )
        log(f"int8: quantized in {quant['quantize_s']:.0f} s")

    sm = tf.saved_model.load(str(work / "saved_model")).signatures["serving_default"]
    onnx_float = OnnxPredictor(str(work / "model.onnx"), threads=args.threads)
    runtimes = {
        "keras.predict": lambda x: model.predict(x, batch_size=len(x), verbose=0),
        "keras.call": lambda x: model(x, training=False).numpy(),
        "savedmodel": lambda x: sm(images=tf.constant(x))["probabilities"].numpy(),
        "onnx": lambda x: onnx_float.session.run(None, {"images": x})[0],
    }
    if not args.no_int8:
        onnx_int8 = OnnxPredictor(str(work / "model.int8.onnx"), threads=args.threads)
        runtimes["onnx.int8"] = lambda x: onnx_int8.session.run(None, {"images": x})[0]

    # Outputs on the test images, before timing anything.
    def run_all(fn):
        return np.concatenate([fn(x_test[i : i + 256]) for i in range(0, len(x_test), 256)])

    ref = model.predict(x_test, batch_size=256, verbose=0)
    truth = y_test.argmax(1)
    quality = {}
    for name, fn in runtimes.items():
        out = run_all(fn)
        quality[name] = {
            "max_abs_diff": float(np.max(np.abs(out - ref))),
            "agreement": float(np.mean(out.argmax(1) == ref.argmax(1))),
            "accuracy": float(np.mean(out.argmax(1) == truth)),
        }
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = float(np.median(top2[:, 1] - top2[:, 0]))

    rng = np.random.default_rng(args.seed)
    x_big = np.ascontiguousarray(x_test[rng.choice(len(x_test), args.batch, replace=True)])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = measure(runtimes, x_big, args)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()[0]

    threads = onnx_float.session.get_session_options().intra_op_num_threads
    print(
        f"bench_serve: {source}; {model.count_params():,} parameters; test accuracy "
        f"{quality['keras.predict']['accuracy']:.3f}, median top-1 margin {margin:.3f} "
        f"({len(x_test)} test images)"
    )
    print(
        f"keras {keras.__version__}, tensorflow {tf.__version__}, onnxruntime {ort.__version__}; "
        f"{len(os.sched_getaffinity(0))} CPUs ({platform_cpu()}); ORT intra-op threads "
        f"{threads}; load average {load_before:.1f} -> {load_after:.1f}; timed {wall:.0f} s"
    )
    b = args.batch
    print(
        f"\n| runtime | img/s @1 | img/s @{b} | p50 ms @1 | p99 ms @1 | thrpt @{b} vs "
        "keras.predict | p50 @1 lower by | max abs diff | top-1 agree | accuracy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = res["keras.predict"]
    for name, r in res.items():
        q = quality[name]
        print(
            f"| {name} | {r['ips_1']:.1f} | {r['ips_big']:.1f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['ips_big'] / base['ips_big']:.2f}x | "
            f"{base['p50_ms'] / r['p50_ms']:.2f}x | {q['max_abs_diff']:.2g} | "
            f"{q['agreement']:.2%} | {q['accuracy']:.3f} |"
        )
    o = res["onnx"]
    ratio_big, ratio_p50 = o["ips_big"] / base["ips_big"], base["p50_ms"] / o["p50_ms"]
    print(
        f"\ntargets: ONNX >= 1.5x keras.predict throughput at batch {b}: {ratio_big:.2f}x "
        f"({'met' if ratio_big >= 1.5 else 'NOT met'}); ONNX >= 3x lower p50 at batch 1: "
        f"{ratio_p50:.2f}x ({'met' if ratio_p50 >= 3 else 'NOT met'})"
    )
    if not args.no_int8:
        i8, q8 = res["onnx.int8"], quality["onnx.int8"]
        speed = i8["ips_big"] / o["ips_big"]
        keep = speed >= ex.INT8_MIN_SPEEDUP and q8["agreement"] >= ex.INT8_MIN_AGREEMENT
        print(
            f"int8 vs float ONNX: {speed:.2f}x throughput at batch {b}, "
            f"{o['p50_ms'] / i8['p50_ms']:.2f}x lower p50 at batch 1, top-1 agreement "
            f"{q8['agreement']:.2%}: `keras-ce export --quantize int8` would "
            f"{'keep' if keep else 'NOT keep'} it (needs >= {ex.INT8_MIN_SPEEDUP:g}x and "
            f">= {ex.INT8_MIN_AGREEMENT:.0%})"
        )
    if args.sweep_ort:
        ort_sweep(str(work / "model.onnx"), x_big, args)
    if args.keep:
        log(f"artifacts kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def platform_cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())

"""The ``keras-ce`` command line.

Sub-commands: ``train``, ``compare`` (see :mod:`keras_ce_plugin.train`) and
``export``, ``verify``, ``predict`` (see :mod:`keras_ce_plugin.export`).
The train and export modules are imported only for the sub-command that
runs. A :class:`~keras_ce_plugin.errors.KerasCEError` (bad input) is
printed as one paragraph without a traceback and exits with status 2.

>>> parser = build_parser()
>>> args = parser.parse_args(["train", "--out", "run", "--weights", "none"])
>>> (args.command, args.epochs, args.batch_size, args.loss, args.weights)
('train', 10, 32, 'customloss>CategoricalCE', 'none')
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence

from keras_ce_plugin.errors import KerasCEError

EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _add_data_flags(p: argparse.ArgumentParser, *, train: bool = True) -> None:
    p.add_argument(
        "--data-dir",
        help="a local cifar-10-batches-py directory (default: $KERAS_CE_CIFAR10_DIR, "
        "else keras.datasets.cifar10 downloads it)",
    )
    if train:
        p.add_argument("--limit-train", type=_positive_int, help="use the first N training images")
    p.add_argument("--limit-test", type=_positive_int, help="use the first N test images")


def _add_train_flags(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    _add_data_flags(p)
    p.add_argument(
        "--weights",
        default="imagenet",
        help="VGG16 base weights: imagenet (downloads), none (random), or a local "
        ".h5/.weights.h5 path (default: imagenet)",
    )
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="train the full model with plain fit instead of caching the frozen "
        "base's features (same result, slower)",
    )
    p.add_argument(
        "--xla",
        choices=["update", "step", "none"],
        default="update",
        help="with the feature cache on TensorFlow: XLA-compile Adam's update (update, "
        "the default: curves within ~1e-7 of the tutorial's), the head's whole train step "
        "(step: the curves drift by float rounding, ~1e-3 over 10 epochs; slower than update "
        "on the 2-core test machine), or "
        "nothing (none: bitwise the tutorial's curves)",
    )
    p.add_argument("--out", required=out_required, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``keras-ce`` (all sub-commands)."""
    parser = argparse.ArgumentParser(
        prog="keras-ce",
        description="Train, compare, export, verify and serve models that use the "
        "keras_ce_plugin losses.",
    )
    from keras_ce_plugin import __version__

    parser.add_argument("--version", action="version", version=f"keras-ce {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train the frozen VGG16 + dense head on CIFAR-10",
        description="Train the tutorial's frozen VGG16 + dense head on CIFAR-10.",
    )
    _add_train_flags(p, out_required=False)  # --resume RUN_DIR names it too
    p.add_argument(
        "--loss",
        default="customloss>CategoricalCE",
        help="loss name as given to compile (default: customloss>CategoricalCE)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=0,
        help="save a resumable checkpoint every N epochs (0: never)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue the killed run in RUN_DIR (or in --out) from its checkpoint",
    )
    p.add_argument(
        "--strategy",
        choices=["none", "mirrored", "multiworker"],
        default="none",
        help="tf.distribute strategy (multiworker reads TF_CONFIG)",
    )
    p.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="with --strategy mirrored on a CPU-only machine: split the CPU into N logical devices",
    )
    p.add_argument(
        "--mixed-precision",
        choices=["float16", "bfloat16"],
        default=None,
        help="set the Keras mixed precision policy (the loss stays float32)",
    )

    p = sub.add_parser(
        "compare",
        help="train with customloss>CategoricalCE and with Keras' built-in, side by side",
        description="Train twice from the same seed and initial weights, once with "
        "customloss>CategoricalCE and once with keras.losses.CategoricalCrossentropy(), "
        "and report the differences.",
    )
    _add_train_flags(p)
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="largest absolute per-epoch difference accepted (default: 1e-5)",
    )

    p = sub.add_parser(
        "export",
        help="export a .keras model to SavedModel and ONNX",
        description="Export a .keras model for serving, with a manifest of SHA-256 hashes.",
    )
    p.add_argument("model", help="path to a .keras file")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument(
        "--formats",
        default="savedmodel,onnx",
        help="comma-separated: savedmodel, onnx (default: both)",
    )
    p.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset")
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="also write model.int8.onnx (kept only if >= 2x faster with >= 99%% top-1 agreement)",
    )
    p.add_argument(
        "--data-dir",
        help="cifar-10-batches-py directory whose training images --quantize int8 calibrates "
        "on (default: $KERAS_CE_CIFAR10_DIR, else Keras downloads CIFAR-10)",
    )
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser(
        "verify",
        help="check every exported artifact against the Keras model",
        description="Load each artifact in its own fresh process and compare its "
        "predictions with the Keras model on real test images.",
    )
    p.add_argument("export_dir", help="directory written by `keras-ce export`")
    _add_data_flags(p, train=False)
    p.add_argument("--atol", type=float, default=1e-5)

    p = sub.add_parser(
        "predict",
        help="classify images with a .keras, SavedModel or .onnx artifact",
        description="Classify PNG/JPEG files (resized to 32x32) or .npy batches.",
    )
    p.add_argument("artifact", help="a .keras file, a SavedModel directory or an .onnx file")
    p.add_argument("images", nargs="+", help="PNG/JPEG files or .npy batches")
    p.add_argument("--top-k", type=_positive_int, default=3)
    return parser


def _print_error(message: str) -> None:
    text = " ".join(str(message).split())
    print(textwrap.fill(f"keras-ce: error: {text}", width=100), file=sys.stderr)


def _resolve_run_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``train --resume RUN_DIR`` means ``--resume --out RUN_DIR``; one of them names it."""
    if isinstance(args.resume, str):
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            parser.error(f"--resume {args.resume} and --out {args.out} name different runs")
        args.out, args.resume = args.resume, True
    if args.out is None:
        parser.error("the following arguments are required: --out (or --resume RUN_DIR)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keras-ce`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        _resolve_run_dir(parser, args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.command in ("train", "compare"):
            from keras_ce_plugin import train

            handler = train.train_command if args.command == "train" else train.compare_command
        else:
            from keras_ce_plugin import export

            handler = {
                "export": export.export_command,
                "verify": export.verify_command,
                "predict": export.predict_command,
            }[args.command]
        return int(handler(args) or 0)
    except KerasCEError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

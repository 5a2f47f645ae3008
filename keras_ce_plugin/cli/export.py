"""``keras-ce export``, ``verify`` and ``predict``: serving artifacts."""

from __future__ import annotations

import argparse

from keras_ce_plugin.cli._args import add_data_flags, positive_int

EXTRA = "export"


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``export``, ``verify`` and ``predict`` sub-commands to ``sub``."""
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
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset")
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
    p.set_defaults(handler=export_command, check=None, extra=EXTRA)

    p = sub.add_parser(
        "verify",
        help="check every exported artifact against the Keras model",
        description="Load each artifact in its own fresh process and compare its "
        "predictions with the Keras model on real test images.",
    )
    p.add_argument("export_dir", help="directory written by `keras-ce export`")
    add_data_flags(p, train=False)
    p.add_argument("--atol", type=float, default=1e-5)
    p.set_defaults(handler=verify_command, check=None, extra=EXTRA)

    p = sub.add_parser(
        "predict",
        help="classify images with a .keras, SavedModel or .onnx artifact",
        description="Classify PNG/JPEG files (resized to 32x32) or .npy batches.",
    )
    p.add_argument("artifact", help="a .keras file, a SavedModel directory or an .onnx file")
    p.add_argument("images", nargs="+", help="PNG/JPEG files or .npy batches")
    p.add_argument("--top-k", type=positive_int, default=3)
    p.set_defaults(handler=predict_command, check=None, extra=EXTRA)


def export_command(args: argparse.Namespace) -> int:
    from keras_ce_plugin import export

    return export.export_command(args)


def verify_command(args: argparse.Namespace) -> int:
    from keras_ce_plugin import export

    return export.verify_command(args)


def predict_command(args: argparse.Namespace) -> int:
    from keras_ce_plugin import export

    return export.predict_command(args)

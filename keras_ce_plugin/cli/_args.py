"""Argument types and flag groups shared by the ``keras-ce`` sub-commands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_data_flags(p: argparse.ArgumentParser, *, train: bool = True) -> None:
    """``--data-dir``, ``--limit-test`` and (for training) ``--limit-train``."""
    p.add_argument(
        "--data-dir",
        help="a local cifar-10-batches-py directory (default: $KERAS_CE_CIFAR10_DIR, "
        "else keras.datasets.cifar10 downloads it)",
    )
    if train:
        p.add_argument("--limit-train", type=positive_int, help="use the first N training images")
    p.add_argument("--limit-test", type=positive_int, help="use the first N test images")


IMPORT_HELP = (
    "import MODULE (a dotted name or a path/to/file.py) first, so that a loss it "
    "registers (e.g. my_losses>Focal) is known; repeatable"
)


def add_import_flag(p: argparse.ArgumentParser, help: str = IMPORT_HELP) -> None:
    """``--import MODULE`` (repeatable), stored as ``args.imports``."""
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help=help,
    )

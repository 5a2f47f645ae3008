"""``keras-ce train`` and ``keras-ce compare``: the tutorial's CIFAR-10 experiment."""

from __future__ import annotations

import argparse
import os

from keras_ce_plugin.cli._args import add_data_flags, non_negative_int, positive_int

EXTRA = "experiment"


def _add_train_flags(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    add_data_flags(p)
    p.add_argument(
        "--weights",
        default="imagenet",
        help="VGG16 base weights: imagenet (downloads), none (random), or a local "
        ".h5/.weights.h5 path (default: imagenet)",
    )
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=32)
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
        "the default: curves within float rounding of the tutorial's), the head's whole "
        "train step (step: the curves drift by float rounding over the epochs), or "
        "nothing (none: bitwise the tutorial's curves)",
    )
    p.add_argument("--out", required=out_required, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``train`` and ``compare`` sub-commands to ``sub``."""
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
        type=non_negative_int,
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
        type=positive_int,
        default=None,
        help="with --strategy mirrored on a CPU-only machine: split the CPU into N logical devices",
    )
    p.add_argument(
        "--mixed-precision",
        choices=["float16", "bfloat16"],
        default=None,
        help="set the Keras mixed precision policy (the loss stays float32)",
    )
    p.set_defaults(handler=train_command, check=_resolve_run_dir, extra=EXTRA)

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
    p.set_defaults(handler=compare_command, check=None, extra=EXTRA)


def _resolve_run_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``train --resume RUN_DIR`` means ``--resume --out RUN_DIR``; one of them names it."""
    if isinstance(args.resume, str):
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            parser.error(f"--resume {args.resume} and --out {args.out} name different runs")
        args.out, args.resume = args.resume, True
    if args.out is None:
        parser.error("the following arguments are required: --out (or --resume RUN_DIR)")


def train_command(args: argparse.Namespace) -> int:
    from keras_ce_plugin import train

    return train.train_command(args)


def compare_command(args: argparse.Namespace) -> int:
    from keras_ce_plugin import train

    return train.compare_command(args)

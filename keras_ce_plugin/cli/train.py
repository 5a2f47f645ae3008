"""``keras-ce train`` and ``keras-ce compare``: the tutorial's CIFAR-10 experiment.

The flags and what they mean; the work is :func:`keras_ce_plugin.training.train_run`
and :func:`keras_ce_plugin.training.run_compare`, imported when a command runs.

>>> args = _parse(["train", "--out", "run", "--xla", "none", "--weights", "None"])
>>> config = _config_from_args(args, loss=args.loss)
>>> config.weights, config.xla_optimizer, config.xla_step, config.checkpoint_every
(None, False, False, 0)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from keras_ce_plugin.cli._args import (
    add_data_flags,
    add_import_flag,
    non_negative_int,
    positive_int,
)
from keras_ce_plugin.errors import KerasCEError

EXTRA = "experiment"
# Kept in step with keras_ce_plugin.training (not imported here: it needs TensorFlow).
DEFAULT_LOSS = "customloss>CategoricalCE"
DEFAULT_TOLERANCE = 1e-5

# Flags that define a run: a resumed run takes them from its checkpoint.
_RUN_FLAGS = (
    "data_dir",
    "limit_train",
    "limit_test",
    "weights",
    "loss",
    "imports",
    "epochs",
    "batch_size",
    "learning_rate",
    "seed",
    "no_feature_cache",
    "xla",
    "checkpoint_every",
    "strategy",
    "devices",
    "mixed_precision",
)


def _add_train_flags(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    add_data_flags(p)
    p.add_argument(
        "--weights",
        default="imagenet",
        help="VGG16 base weights: imagenet (downloads), none (random, He-initialised, "
        "with a fixed standardisation of its features before the head), or a local "
        ".h5/.weights.h5 path (default: imagenet)",
    )
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Adam learning rate (default: the tutorial's 1e-3; 1e-4 with --weights none, "
        "where the head learns on a random base's standardised features); a value given "
        "here is always used",
    )
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
    p.add_argument(
        "--loss",
        default=DEFAULT_LOSS,
        metavar="TARGET",
        help="the loss: a registered P>N name, package.module:Attr, path/to/file.py:Attr "
        f"or a Keras identifier such as categorical_crossentropy (default: {DEFAULT_LOSS})",
    )
    add_import_flag(
        p,
        "import MODULE (a dotted name or a .py file) before resolving --loss, e.g. the "
        "module that registers a P>N name; repeatable",
    )
    p.add_argument(
        "--out",
        required=out_required,
        help="run directory to write (checked before any work: it must be a directory "
        "that can be created or written)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the summary line: no epoch lines, feature bar or checkpoint notes",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``train`` and ``compare`` sub-commands to ``sub``."""
    p = sub.add_parser(
        "train",
        help="train the frozen VGG16 + dense head on CIFAR-10",
        description="Train the tutorial's frozen VGG16 + dense head on CIFAR-10.",
    )
    _add_train_flags(p, out_required=False)  # --resume RUN_DIR names it too
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
        help="train with --loss and with Keras' CategoricalCrossentropy(), side by side",
        description="Train twice from the same seed and initial weights, once with --loss "
        "(default: customloss>CategoricalCE) and once with "
        "keras.losses.CategoricalCrossentropy(), and report both curves, their "
        "differences and both test accuracies.",
    )
    _add_train_flags(p)
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest absolute per-epoch difference accepted; gives a pass/fail verdict "
        f"(exit status 1 when exceeded). Default: {DEFAULT_TOLERANCE:g} for the default "
        "--loss; for any other --loss, no verdict unless given",
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


def _parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the ``train`` and ``compare`` sub-commands alone."""
    parser = argparse.ArgumentParser(prog="keras-ce")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as JSON values, recorded in metrics.json and the checkpoint."""
    out: dict[str, Any] = {}
    for key, value in sorted(vars(args).items()):
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = [str(v) for v in value]
        else:
            out[key] = str(value)
    return out


def _weights_arg(text: str | None) -> str | None:
    if text is None or text.lower() == "none":
        return None
    if text.lower() == "imagenet":
        return "imagenet"
    return text


def _config_from_args(args: argparse.Namespace, *, loss: Any) -> Any:
    """The :class:`~keras_ce_plugin.training.TrainConfig` of ``train`` or ``compare``."""
    from keras_ce_plugin.training import TrainConfig

    return TrainConfig(
        weights=_weights_arg(args.weights),
        loss=loss,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        feature_cache=not args.no_feature_cache,
        xla_optimizer=args.xla == "update",
        xla_step=args.xla == "step",
        verbose=not args.quiet,
        checkpoint_every=getattr(args, "checkpoint_every", 0),  # compare has no such flag
    )


def _data(args: argparse.Namespace) -> Any:
    from keras_ce_plugin.training import DataSpec

    return DataSpec(args.data_dir, limit_train=args.limit_train, limit_test=args.limit_test)


def _resumed_args(args: argparse.Namespace, recorded: dict[str, Any]) -> argparse.Namespace:
    """``args`` with the run-defining flags of the run being resumed (``recorded``); a
    flag given now that differs from both its default and the recorded value is refused."""
    defaults = vars(_parse(["train", "--out", str(args.out)]))
    merged = argparse.Namespace(**vars(args))
    for key in _RUN_FLAGS:
        # A flag newer than the checkpoint's run had its default there.
        given, before = getattr(args, key), recorded.get(key, defaults[key])
        if given != defaults[key] and given != before:
            flag = "--" + key.replace("_", "-")
            raise KerasCEError(
                f"{flag} {given} differs from the run being resumed ({flag} {before}). A "
                "resumed run continues with the arguments it was started with; leave the "
                "flag out (or start a new run with --overwrite)."
            )
        setattr(merged, key, before)
    return merged


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _absolute_paths(args: argparse.Namespace) -> None:
    """``.py`` files in ``--import`` and ``--loss file.py:Attr`` made absolute, so that
    the recorded arguments (and ``--resume``) find them from any working directory."""
    args.imports = [os.path.abspath(m) if _is_file_spec(m) else m for m in args.imports]
    module, sep, attr = args.loss.rpartition(":")
    if sep and module and _is_file_spec(module):
        args.loss = f"{os.path.abspath(module)}:{attr}"


def _check_out(args: argparse.Namespace) -> None:
    """``--out`` must be a directory this process can create or write (one line if not)."""
    from pathlib import Path

    from keras_ce_plugin._writable import check_writable_dir

    check_writable_dir(Path(args.out), flag="--out")


def _loss_target(args: argparse.Namespace) -> Any:
    """``--import`` each module, then resolve ``--loss`` (a one-line error if either fails)."""
    from keras_ce_plugin.targets import resolve_loss

    return resolve_loss(args.loss, args.imports)


def _loss_arguments(args: argparse.Namespace, target: Any) -> dict[str, Any]:
    """The recorded arguments with what ``--loss`` resolved to: the name the model is
    compiled with (``None``: a loss object) and the module that defines it."""
    return {**_arguments(args), "loss_identifier": target.identifier, "loss_module": target.module}


def train_command(args: argparse.Namespace) -> int:
    """``keras-ce train``: trains and writes ``--out``; returns the exit status.

    ``--resume`` continues the killed run in ``--out`` from its checkpoint, with the
    arguments it was started with (its ``--loss`` and ``--import`` modules included).
    """
    _absolute_paths(args)
    _check_out(args)
    from keras_ce_plugin.training import RUN_FILES, run

    checkpoint = None
    if args.resume:
        checkpoint = run.resume_checkpoint(args.out)
        args = _resumed_args(args, checkpoint.meta.get("arguments", {}))
    # Before TensorFlow initialises its devices.
    strategy = run.distribution(args.strategy, args.devices, args.mixed_precision)
    target = _loss_target(args)
    config = _config_from_args(args, loss=target.instance())
    config.validate()
    common = dict(
        data=_data(args),
        arguments=_loss_arguments(args, target),
        resume=checkpoint,
        strategy=strategy,
    )
    if not run.writes_out(args.strategy):
        who = run.worker_name()
        _say(args, f"{who}: not the chief; the chief writes {args.out}")
        result = run.train_as_worker(config, **common)
        print(
            f"{who}: done, test accuracy {result.test_accuracy:.4f}; wrote nothing "
            f"(the chief wrote {args.out})",
            flush=True,
        )
        return 0
    result, metrics = run.train_run(args.out, config, overwrite=args.overwrite, **common)
    print(
        f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f} "
        f"({result.num_train} train / {result.num_test} test images, "
        f"{config.epochs} epochs, {metrics['wall_time_s']:.1f} s); wrote "
        f"{', '.join(RUN_FILES)} to {args.out}",
        flush=True,
    )
    return 0


def compare_command(args: argparse.Namespace) -> int:
    """``keras-ce compare``: the same training with ``--loss`` and with Keras' built-in.

    Returns 1 when a verdict was asked for (``--tolerance``, or the default loss) and
    some per-epoch difference exceeds it, else 0.
    """
    _absolute_paths(args)
    _check_out(args)
    from keras_ce_plugin.training import COMPARE_FILES, run_compare

    target = _loss_target(args)
    summary = run_compare(
        args.out,
        _config_from_args(args, loss=target.instance()),
        data=_data(args),
        tolerance=args.tolerance,
        arguments=_loss_arguments(args, target),
        overwrite=args.overwrite,
        label=target.label,
    )
    worst, tolerance = summary["max_abs_diff_overall"], summary["tolerance"]
    accuracy = summary["test_accuracy"]
    if summary["agree"] is None:
        verdict = "COMPARED (no verdict; give --tolerance for one)"
        within = ""
    else:
        verdict = "AGREE" if summary["agree"] else "DIFFER"
        within = f" (tolerance {tolerance:g})"
    within += f", first epoch {summary['first_epoch_max_abs_diff']:.3e}"
    print(
        f"{verdict}: largest per-epoch |custom - built-in| = {worst:.3e}{within}; test "
        f"accuracy custom ({target.label}) {accuracy['custom']:.4f}, built-in "
        f"{accuracy['builtin']:.4f}; wrote {', '.join(COMPARE_FILES)} to {args.out}",
        flush=True,
    )
    return 1 if summary["agree"] is False else 0

"""The ``keras-ce`` command line.

Sub-commands: ``train``, ``compare`` (:mod:`keras_ce_plugin.cli.train`),
``export``, ``verify``, ``predict`` (:mod:`keras_ce_plugin.cli.export`) and
``check-loss`` (:mod:`keras_ce_plugin.cli.check_loss`). Each
command module only turns arguments into calls of the library, which it imports
when its command runs. A :class:`~keras_ce_plugin.errors.KerasCEError` (bad
input) is printed on one line without a traceback and exits with status 2; so is
a missing optional dependency, naming the extra to install.

>>> parser = build_parser()
>>> args = parser.parse_args(["train", "--out", "run", "--weights", "none"])
>>> (args.command, args.epochs, args.batch_size, args.loss, args.weights)
('train', 10, 32, 'customloss>CategoricalCE', 'none')
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from keras_ce_plugin.cli._output import one_line_warnings, print_error
from keras_ce_plugin.errors import KerasCEError

EXIT_USAGE = 2

# What each sub-command needs before it starts (checked up front, so that a missing
# extra is named at once rather than after loading data or a model).
_REQUIRES = {
    "train": ("tensorflow", "matplotlib"),
    "compare": ("tensorflow", "matplotlib"),
    "export": ("tensorflow",),
    "verify": ("tensorflow",),
}


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:
        return True


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``keras-ce`` (all sub-commands)."""
    from keras_ce_plugin import __version__
    from keras_ce_plugin.cli import check_loss, export, train

    parser = argparse.ArgumentParser(
        prog="keras-ce",
        description="Train, compare, export, verify and serve models that use the "
        "keras_ce_plugin losses.",
    )
    parser.add_argument("--version", action="version", version=f"keras-ce {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.register(sub)
    export.register(sub)
    check_loss.register(sub)
    return parser


def missing_extra_message(command: str, name: str, extra: str | None) -> str | None:
    """The one-line message for a sub-command whose optional dependency is missing.

    ``extra`` is the extra that installs it; ``None`` for a command of the core
    install, whose missing module is then named alone.

    >>> missing_extra_message("export", "tf2onnx.convert", "export")
    "`keras-ce export` needs tf2onnx, which is not installed. Install the [export] extra: pip install 'keras-ce-plugin[export]'"
    >>> missing_extra_message("check-loss", "jax", None)
    '`keras-ce check-loss` needs jax, which is not installed: pip install jax'
    """
    name = name.split(".")[0]
    if not name or name == "keras_ce_plugin":
        return None
    if extra is None:
        return f"`keras-ce {command}` needs {name}, which is not installed: pip install {name}"
    return (
        f"`keras-ce {command}` needs {name}, which is not installed. Install the "
        f"[{extra}] extra: pip install 'keras-ce-plugin[{extra}]'"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keras-ce`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The dispatch entries are not arguments: a run records ``vars(args)``.
    handler, check, extra = args.handler, args.check, args.extra
    del args.handler, args.check, args.extra
    if check is not None:
        check(parser, args)
    for module in _REQUIRES.get(args.command, ()):
        if _missing(module):
            print_error(missing_extra_message(args.command, module, extra))
            return EXIT_USAGE
    try:
        with one_line_warnings():
            return int(handler(args) or 0)
    except KerasCEError as exc:
        print_error(exc)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        message = missing_extra_message(args.command, exc.name or "", extra)
        if message is None:
            raise
        print_error(message)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

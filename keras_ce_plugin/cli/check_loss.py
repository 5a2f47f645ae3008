"""``keras-ce check-loss``: the loss contract checker on the command line."""

from __future__ import annotations

import argparse
import json

from keras_ce_plugin.cli._args import add_import_flag
from keras_ce_plugin.errors import KerasCEError

EXTRA = None  # the core install: no extra to name
EXIT_FAILED_CHECKS = 1


def _expected(text: str) -> tuple[str, str]:
    check, sep, reason = text.partition("=")
    if not sep or not check or not reason:
        raise argparse.ArgumentTypeError(f"expected CHECK=REASON, got {text!r}")
    return check, reason


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``check-loss`` sub-command to ``sub``."""
    p = sub.add_parser(
        "check-loss",
        help="check that a loss survives compile by name, save, reload, weights, backends",
        description="Run the loss contract checks (keras_ce_plugin.testing.check_loss) on "
        "each TARGET: package.module:Attr, path/to/file.py:Attr or a registered P>N name. "
        "Exit status: 0 if every check passes, 1 if one fails, 2 if a TARGET cannot be found.",
    )
    p.add_argument("targets", nargs="+", metavar="TARGET", help="the loss(es) to check")
    add_import_flag(p)
    p.add_argument(
        "--targets",
        dest="target_kind",
        choices=["categorical", "sparse", "binary"],
        default=None,
        help="the kind of labels the loss takes (default: the loss's own for Keras' and "
        "the plugin's cross-entropies, e.g. sparse for LinearCE; categorical, one-hot, "
        "for any other)",
    )
    p.add_argument(
        "--expected-failed",
        dest="expected_failed",
        type=_expected,
        action="append",
        default=[],
        metavar="CHECK=REASON",
        help="CHECK is a known, documented limitation (REASON): reported as xfailed; if it "
        "passes, xpassed, which fails the run; repeatable",
    )
    p.add_argument(
        "--checks",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=None,
        metavar="CHECK[,CHECK...]",
        help="run only these checks (default: all)",
    )
    p.add_argument("--json", action="store_true", help="print the report(s) as JSON")
    p.set_defaults(handler=check_loss_command, check=None, extra=EXTRA)


def check_loss_command(args: argparse.Namespace) -> int:
    from keras_ce_plugin.targets import resolve_loss
    from keras_ce_plugin.testing import check_losses

    items = []
    for target in args.targets:
        resolved = resolve_loss(target, args.imports, what="check-loss")
        if isinstance(resolved.obj, str):  # a Keras identifier, passed to Keras unchanged
            raise KerasCEError(
                f"check-loss {target}: a Keras identifier is a name for `--loss`, not a loss "
                "to check; give a registered `P>N` name or `module:Attr`, e.g. "
                "keras.losses:CategoricalCrossentropy."
            )
        module = target.rpartition(":")[0] if target.rpartition(":")[0].endswith(".py") else None
        kwargs = {
            "targets": args.target_kind,
            "expected_failed_checks": dict(args.expected_failed) or None,
            "module": module,
            "checks": args.checks,
        }
        items.append((resolved.obj, kwargs))
    from keras_ce_plugin.testing import CHECKS

    for name in [*(args.checks or []), *dict(args.expected_failed)]:
        if name not in CHECKS:
            raise KerasCEError(f"Unknown loss check {name!r}. Valid checks: {', '.join(CHECKS)}")
    reports = check_losses(items)
    if args.json:
        payload = [report.to_dict() for report in reports]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    else:
        print("\n\n".join(str(report) for report in reports))
    return 0 if all(report.ok for report in reports) else EXIT_FAILED_CHECKS

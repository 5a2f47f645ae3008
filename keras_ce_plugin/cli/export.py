"""``keras-ce export``, ``verify`` and ``predict``: serving artifacts.

Each command turns its arguments into calls of :mod:`keras_ce_plugin.export`
(imported when the command runs) and prints the results. ``--import MODULE``
imports a module that registers the model's loss first; a warning (such as a
model loaded for inference without its loss) is printed on one line,
``keras-ce: warning: ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from keras_ce_plugin.cli._args import add_data_flags, add_import_flag, positive_int

EXTRA = "export"
_IMPORT_HELP = (
    "import MODULE (a dotted name or a path/to/file.py) before loading the model, so "
    "that a loss it registers (e.g. my_losses>Focal) is known; repeatable"
)


def _import_modules(imports: Sequence[str]) -> None:
    if imports:
        from keras_ce_plugin.targets import import_modules

        import_modules(imports)


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``export``, ``verify`` and ``predict`` sub-commands to ``sub``."""
    p = sub.add_parser(
        "export",
        help="export a .keras model to SavedModel and ONNX",
        description="Export a .keras model for serving, with a manifest of SHA-256 hashes.",
    )
    p.add_argument("model", help="path to a .keras file")
    p.add_argument(
        "--out",
        required=True,
        help="export directory (checked before any work: not a file, not under a file, "
        "in a directory you can write to)",
    )
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
        help="also write model.int8.onnx, kept only if it meets the speed-up and top-1 "
        "agreement thresholds (both recorded in manifest.json)",
    )
    p.add_argument(
        "--data-dir",
        help="cifar-10-batches-py directory whose training images --quantize int8 calibrates "
        "on (default: $KERAS_CE_CIFAR10_DIR, else Keras downloads CIFAR-10)",
    )
    p.add_argument("--overwrite", action="store_true")
    add_import_flag(p, _IMPORT_HELP)
    p.set_defaults(handler=export_command, check=None, extra=EXTRA)

    p = sub.add_parser(
        "verify",
        help="check every exported artifact against the Keras model",
        description="Load each artifact in its own fresh process and compare its "
        "predictions with the Keras model on real test images (an image classifier) or "
        "on seeded generated inputs of the model's signature (any other model).",
    )
    p.add_argument("export_dir", help="directory written by `keras-ce export`")
    add_data_flags(p, train=False)
    p.add_argument("--atol", type=float, default=1e-5)
    add_import_flag(
        p,
        _IMPORT_HELP + " (the process that checks the Keras model imports it too)",
    )
    p.set_defaults(handler=verify_command, check=None, extra=EXTRA)

    p = sub.add_parser(
        "predict",
        help="classify images with a .keras, SavedModel or .onnx artifact",
        description="Classify PNG/JPEG files (resized to 32x32; a smaller image is "
        "upscaled, with a warning) or .npy batches with an image classifier (another "
        "model is refused: serve it with `keras-ce export`, or call model.predict).",
    )
    p.add_argument("artifact", help="a .keras file, a SavedModel directory or an .onnx file")
    p.add_argument("images", nargs="+", help="PNG/JPEG files or .npy batches")
    p.add_argument("--top-k", type=positive_int, default=3)
    add_import_flag(p, _IMPORT_HELP)
    p.set_defaults(handler=predict_command, check=None, extra=EXTRA)


def export_command(args: argparse.Namespace) -> int:
    """``keras-ce export MODEL --out DIR [--formats ...] [--opset N] [--quantize int8]
    [--import M]``."""
    from keras_ce_plugin import export

    out = Path(args.out)
    export.check_out_dir(out, overwrite=bool(args.overwrite))  # before any work
    _import_modules(getattr(args, "imports", None) or [])
    print(f"Exporting {args.model} to {out}/")
    manifest = export.export_model_dir(
        args.model,
        out,
        formats=export.parse_formats(args.formats),
        opset=args.opset,
        quantize=args.quantize,
        overwrite=bool(args.overwrite),
        data_dir=getattr(args, "data_dir", None),
        log=print,
    )
    skipped = manifest.get("skipped") or {}
    print(
        f"Wrote {out}/ ({', '.join(manifest['formats'])}; {len(manifest['files'])} files "
        f"hashed in {export.MANIFEST_FILE}"
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        + f"). Check it with: keras-ce verify {out}"
    )
    return 0


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def verify_command(args: argparse.Namespace) -> int:
    """``keras-ce verify DIR [--data-dir D] [--limit-test N] [--atol 1e-5] [--import M]``."""
    from keras_ce_plugin import export

    export_dir = Path(args.export_dir)
    imports = getattr(args, "imports", None) or []
    _import_modules(imports)  # here too: a bad MODULE is named before any work
    manifest, n_files = export.check_export(export_dir)
    print(f"{export_dir}/{export.MANIFEST_FILE}: {n_files} files, sizes and SHA-256 match")
    inputs, labels, what = export.verification_inputs(manifest, args.data_dir, args.limit_test)
    result = export.compare_artifacts(
        export_dir, manifest, inputs, labels, atol=args.atol, imports=imports
    )
    print(f"Predictions on {what}, each artifact in a fresh process (atol {result['atol']:g}):")
    for fmt, why in (manifest.get("skipped") or {}).items():
        print(f"{fmt:<11} skipped at export: {why}")
    print(
        f"{'format':<11} {'runtime':<20} {'max |Δ| vs Keras':>16} {'top-1 agree':>11} "
        f"{'accuracy':>8} {'load s':>6}  result"
    )
    for r in result["rows"]:
        status = "reference" if r["format"] == "keras" else ("ok" if r["ok"] else "FAIL")
        if r["problem"]:
            status += f" ({r['problem']})"
        print(
            f"{r['format']:<11} {r['runtime']:<20} {_fmt(r['max_abs_diff'], '.3g'):>16} "
            f"{_fmt(r['agreement'], '.2%'):>11} {_fmt(r['accuracy'], '.4f'):>8} "
            f"{_fmt(r['load_s'], '.2f'):>6}  {status}"
        )
    if not result["ok"]:
        failed = ", ".join(r["format"] for r in result["rows"] if not r["ok"])
        print(f"keras-ce verify: FAILED: {failed} differ from the Keras model", file=sys.stderr)
        return 1
    print("OK: every artifact matches the Keras model")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    """``keras-ce predict ARTIFACT IMAGE... [--top-k 3] [--import M]``: top classes per image."""
    from keras_ce_plugin import export

    _import_modules(getattr(args, "imports", None) or [])
    images, labels = export.load_images(args.images)
    probabilities, class_names = export.predict_images(args.artifact, images)
    width = max(len(label) for label in labels)
    for label, ranked in zip(labels, export.top_classes(probabilities, class_names, args.top_k)):
        print(f"{label:<{width}}  " + ", ".join(f"{name} {p:.4f}" for name, p in ranked))
    return 0

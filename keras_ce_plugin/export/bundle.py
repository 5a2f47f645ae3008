"""The export directory: its layout, the manifest, file hashes and the atomic swap.

An export directory holds::

    DIR/model.keras        a copy of the source model (the reference)
    DIR/saved_model/       SavedModel, signature serving_default
    DIR/model.onnx         ONNX, input "images", output "probabilities"
    DIR/model.int8.onnx    only with quantize="int8", and only if it pays off
    DIR/manifest.json      formats, SHA-256 of every file, signature, versions, and
                           each format skipped (with why) under "skipped"

An image classifier is served as ``images`` -> ``probabilities``; any other model
with its own input and output names
(:func:`~keras_ce_plugin.export.signature.serving_signature`). A format that
cannot express the model (the converter fails) is skipped with one line saying
why, and the others are still written; if every requested format fails, nothing
is written and the error names each reason.

The whole directory is assembled in a temporary sibling and swapped into place
(:func:`keras_ce_plugin.files.atomic_dir`), so an interrupted export never leaves
a half-written export where a good one was.

>>> parse_formats("onnx, savedmodel")
('savedmodel', 'onnx')
>>> parse_formats("tflite")
Traceback (most recent call last):
...
keras_ce_plugin.errors.KerasCEError: `--formats` must be a comma-separated list of savedmodel, onnx. Received: formats='tflite'
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from keras_ce_plugin._version import __version__
from keras_ce_plugin._versions import versions as _versions
from keras_ce_plugin._writable import check_writable_dir
from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.export._common import ArtifactExistsError, describe, make_readable
from keras_ce_plugin.export.onnx import check_opset, export_onnx, opset_of
from keras_ce_plugin.export.quantize import (
    INT8_CALIBRATION_IMAGES,
    INT8_EVAL_IMAGES,
    INT8_FILE,
    quantize_int8,
)
from keras_ce_plugin.export.savedmodel import export_savedmodel
from keras_ce_plugin.export.signature import (
    IMAGE_CLASSIFIER,
    IMAGE_SIZE,
    PREPROCESSING,
    SIGNATURE_KEY,
    default_class_names,
    describe_signature,
    serving_signature,
)
from keras_ce_plugin.files import atomic_dir, atomic_path, load_keras_model, sha256_file, write_json

FORMATS = ("savedmodel", "onnx")
KERAS_FILE = "model.keras"
SAVEDMODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
#: Where each format lives in an export directory.
ARTIFACTS = {
    "keras": KERAS_FILE,
    "savedmodel": SAVEDMODEL_DIR,
    "onnx": ONNX_FILE,
    "onnx_int8": INT8_FILE,
}


def parse_formats(text: str) -> tuple[str, ...]:
    """``"onnx,savedmodel"`` -> ``("savedmodel", "onnx")`` (validated, canonical order)."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if not names or any(name not in FORMATS for name in names):
        raise KerasCEError(
            f"`--formats` must be a comma-separated list of {', '.join(FORMATS)}. "
            f"Received: formats={text!r}"
        )
    return tuple(fmt for fmt in FORMATS if fmt in names)


def _file_entries(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE:
            rel = path.relative_to(root).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def check_out_dir(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raises KerasCEError unless an export can be written at ``out``.

    ``out`` must be writable (:func:`keras_ce_plugin._writable.check_writable_dir`),
    and an existing ``out`` is replaced only with ``overwrite`` and only if it is
    empty or an export (it has a manifest). Called before any export work.
    """
    out = Path(out)
    check_writable_dir(out, flag="--out")
    if not out.exists():
        return
    if not overwrite:
        raise ArtifactExistsError(
            f"Export directory {out} already exists. Pass `--overwrite` to replace it."
        )
    if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise KerasCEError(
            f"Refusing to replace {out}: it is not empty and has no {MANIFEST_FILE}, so it "
            "does not look like a `keras-ce export` directory. Choose another `--out`."
        )


def _quantize_guard(manifest: dict) -> str | None:
    """Why ``--quantize int8`` cannot run on this export (None: it can)."""
    if "onnx" not in manifest["formats"]:
        return "no ONNX model to quantize (onnx was skipped)"
    if manifest["kind"] != IMAGE_CLASSIFIER or manifest["input"]["shape"][1:] != [
        *IMAGE_SIZE,
        3,
    ]:
        return (
            f"int8 calibration feeds {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} CIFAR-10 images; the "
            f"model takes {describe_signature(manifest).split(' -> ')[0]}"
        )
    return None


def _quantize_into(tmp: Path, manifest: dict, data_dir, log: Callable[[str], Any]) -> None:
    from keras_ce_plugin.data import load_cifar10

    why = _quantize_guard(manifest)
    if why is not None:
        manifest["quantization"] = {"kept": False, "skipped": True, "reason": why}
        manifest["skipped"]["onnx_int8"] = why
        log(f"  int8        skipped: {why}")
        return

    (x_train, _), (x_test, _) = load_cifar10(data_dir, limit_train=INT8_CALIBRATION_IMAGES)
    record = quantize_int8(tmp / ONNX_FILE, tmp / INT8_FILE, x_train, x_test[:INT8_EVAL_IMAGES])
    manifest["quantization"] = record
    if record["kept"]:
        manifest["formats"].append("onnx_int8")
        manifest["artifacts"]["onnx_int8"] = INT8_FILE
    log(
        f"  int8        {'kept' if record['kept'] else 'not kept'}: "
        f"{record['speedup']:.2f}x float ONNX throughput at batch "
        f"{record['batch_size']} ({record['int8_images_per_s']:.0f} vs "
        f"{record['float_images_per_s']:.0f} images/s), top-1 agreement "
        f"{record['agreement']:.2%} on {record['eval_images']} test images"
        + ("" if record["kept"] else f" ({record['reason']})")
    )


def export_model_dir(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    formats: Sequence[str] = FORMATS,
    opset: int | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
    data_dir: str | os.PathLike | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Writes an export directory for the ``.keras`` file ``model_path``; returns its manifest.

    The model is loaded with :func:`keras_ce_plugin.files.load_keras_model`
    (``compile=False``; its checks apply). The whole directory is assembled in a
    temporary sibling and renamed into place, so a previous export at ``out``
    stays intact until the new one is complete. Before any work, ``out`` is checked
    (:func:`check_out_dir`: not a file, not under a file, in a directory that
    accepts a new directory; an existing one only with ``overwrite``). ``quantize="int8"`` calibrates on
    CIFAR-10 training images from ``data_dir`` (default ``$KERAS_CE_CIFAR10_DIR``,
    see :func:`keras_ce_plugin.data.load_cifar10`). ``log`` receives one line per
    artifact written.
    """
    model_path, out = Path(model_path), Path(out)
    formats = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    if quantize not in (None, "int8"):
        raise KerasCEError(f"`quantize` must be None or 'int8'. Received: quantize={quantize!r}")
    if quantize and "onnx" not in formats:
        raise KerasCEError("`--quantize int8` quantizes the ONNX model: add onnx to `--formats`.")
    opset = check_opset(opset)
    check_out_dir(out, overwrite)
    model = load_keras_model(model_path, compile=False)
    try:
        signature = serving_signature(model)
    except (TypeError, ValueError) as exc:
        raise KerasCEError(f"Cannot export {model_path}: {exc}") from None
    image = signature["kind"] == IMAGE_CLASSIFIER
    class_names = default_class_names(signature["output"]["shape"][-1] or 0) if image else None
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "created_by": f"keras_ce_plugin {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(model_path), "sha256": sha256_file(model_path)},
        "formats": ["keras"],
        "artifacts": {"keras": KERAS_FILE},
        "signature": SIGNATURE_KEY,
        **signature,
        "class_names": list(class_names) if class_names else None,
        "preprocessing": PREPROCESSING if image else None,
        "onnx": None,
        "quantization": None,
        "skipped": {},
        "versions": _versions(),
    }
    if not image:
        log(f"  signature   {describe_signature(signature)} (not an image classifier)")
    writers: dict[str, Callable[[Path], Any]] = {
        "savedmodel": lambda tmp: export_savedmodel(model, tmp / SAVEDMODEL_DIR),
        "onnx": lambda tmp: export_onnx(
            model, tmp / ONNX_FILE, opset=opset, class_names=class_names
        ),
    }
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        with atomic_path(tmp / KERAS_FILE, suffix=".keras") as dst:
            shutil.copyfile(model_path, dst)
        for fmt in formats:
            t0 = time.perf_counter()
            try:
                writers[fmt](tmp)
            except ArtifactExistsError:  # pragma: no cover - tmp is a fresh directory
                raise
            except Exception as exc:  # a format that cannot express this model
                why = (
                    " ".join(str(exc).split())
                    if isinstance(exc, KerasCEError)
                    else describe(exc, limit=300)
                )
                manifest["skipped"][fmt] = why
                log(f"  {fmt:<11} skipped: {why}")
                _remove(tmp / ARTIFACTS[fmt])
                continue
            manifest["formats"].append(fmt)
            manifest["artifacts"][fmt] = ARTIFACTS[fmt]
            if fmt == "onnx":
                manifest["onnx"] = opset_of(tmp / ONNX_FILE)
            log(f"  {fmt:<11} {out / ARTIFACTS[fmt]}  ({time.perf_counter() - t0:.1f} s)")
        if len(manifest["formats"]) == 1:
            raise KerasCEError(
                f"Cannot export {model_path} to "
                + "; ".join(f"{fmt} ({why})" for fmt, why in manifest["skipped"].items())
            )
        if quantize == "int8":
            _quantize_into(tmp, manifest, data_dir, log)
        manifest["files"] = _file_entries(tmp)
        write_json(tmp / MANIFEST_FILE, manifest)
        make_readable(tmp)
    return manifest


def _remove(path: Path) -> None:
    """Removes what a failed writer left at ``path`` (a file or a directory)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def read_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates ``export_dir/manifest.json`` (KerasCEError naming the problem)."""
    export_dir = Path(export_dir)
    if not export_dir.exists():
        raise KerasCEError(f"Export directory not found: {export_dir}")
    if not export_dir.is_dir():
        raise KerasCEError(f"{export_dir} is not a directory written by `keras-ce export`.")
    path = export_dir / MANIFEST_FILE
    if not path.is_file():
        raise KerasCEError(
            f"{path} is missing: {export_dir} is not a complete `keras-ce export` directory."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KerasCEError(f"{path} is not valid JSON (truncated or edited?): {exc}") from None
    problems = []
    if not isinstance(manifest, dict):
        problems.append("it is not a JSON object")
    else:
        if manifest.get("manifest_version") != MANIFEST_VERSION:
            problems.append(f"manifest_version is {manifest.get('manifest_version')!r}")
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(v, dict)
            and isinstance(v.get("sha256"), str)
            and isinstance(v.get("bytes"), int)
            for v in files.values()
        ):
            problems.append("'files' is not a mapping of paths to {sha256, bytes}")
        formats, artifacts = manifest.get("formats"), manifest.get("artifacts")
        if not isinstance(formats, list) or "keras" not in formats:
            problems.append("'formats' does not list keras")
        elif not isinstance(artifacts, dict) or any(
            artifacts.get(f) != ARTIFACTS.get(f) for f in formats
        ):
            problems.append("'artifacts' does not match 'formats'")
    if problems:
        raise KerasCEError(f"{path} is not a valid export manifest: {'; '.join(problems)}.")
    return manifest


def check_files(export_dir: str | os.PathLike, manifest: dict[str, Any]) -> int:
    """Checks every file against its size and SHA-256 in the manifest; returns the count.

    Raises KerasCEError naming every missing, truncated, modified or unexpected file.
    """
    export_dir = Path(export_dir)
    files = manifest["files"]
    problems = []
    for rel, info in files.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
            problems.append(f"{MANIFEST_FILE} names a path outside the export: {rel!r}")
            continue
        path = export_dir / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != info["bytes"]:
            problems.append(
                f"{path} is {size} bytes, the manifest records {info['bytes']} "
                f"({'truncated' if size < info['bytes'] else 'changed'})"
            )
            continue
        digest = sha256_file(path)
        if digest != info["sha256"]:
            problems.append(
                f"{path} does not match its SHA-256 in the manifest (modified or corrupted "
                f"after export; expected {info['sha256'][:12]}..., found {digest[:12]}...)"
            )
    for fmt in manifest["formats"]:
        artifact = ARTIFACTS[fmt]
        listed = [r for r in files if r == artifact or r.startswith(artifact + "/")]
        if not listed:
            problems.append(f"the manifest lists format {fmt!r} but no file under {artifact}")
        if fmt == "savedmodel":
            root = export_dir / artifact
            for path in sorted(root.rglob("*")) if root.is_dir() else []:
                rel = path.relative_to(export_dir).as_posix()
                if path.is_file() and rel not in files:
                    problems.append(f"{path} is not in the manifest (unexpected file)")
    if problems:
        raise KerasCEError(
            f"Export {export_dir} failed its integrity check: "
            + "; ".join(problems)
            + ". Re-export it with `keras-ce export MODEL --out DIR --overwrite`."
        )
    return len(files)


def manifest_class_names(export_dir: str | os.PathLike) -> list[str] | None:
    """The class names in ``export_dir/manifest.json``, or None (no readable manifest)."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        text = (Path(export_dir) / MANIFEST_FILE).read_text()
        names = json.loads(text).get("class_names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return None

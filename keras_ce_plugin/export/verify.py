"""Check an export: manifest hashes, then every artifact in its own fresh process.

Each artifact is loaded by a worker in a new Python process (:data:`WORKERS`):
the Keras model with this package; the SavedModel with ``keras`` and
``keras_ce_plugin`` made unimportable (``_serve_savedmodel.py``); the ONNX
models with ONNX Runtime and without TensorFlow (``_serve_onnx.py``). The two
serving workers are run as scripts by path, so they need nothing but NumPy and
their runtime. Each writes its predictions and a JSON report; the predictions are
compared with the Keras model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.export.bundle import ARTIFACTS, check_files, read_manifest
from keras_ce_plugin.export.quantize import INT8_MIN_AGREEMENT
from keras_ce_plugin.export.signature import (
    IMAGE_CLASSIFIER,
    INPUT_NAME,
    describe_signature,
    generate_inputs,
)

_HERE = Path(__file__).resolve().parent
_PACKAGE_ROOT = _HERE.parent.parent  # the directory that holds keras_ce_plugin/
_WORKER_TIMEOUT_S = 1800
#: How many inputs ``verify`` generates for a model that is not an image classifier
#: (``--limit-test`` overrides), and their seed.
GENERATED_INPUTS = 64
VERIFY_SEED = 0
# Runs a worker script by path without adding the working directory to sys.path.
_RUN_SCRIPT = (
    "import runpy, sys; del sys.path[0]; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
_RUN_KERAS = (
    "import sys; from keras_ce_plugin.export.verify import keras_worker; "
    "sys.exit(keras_worker(sys.argv[1:]))"
)
#: format -> (what it is, the runtime of its worker process).
WORKERS = {
    "keras": ("Keras model", "keras + keras_ce_plugin"),
    "savedmodel": ("SavedModel", "TensorFlow without keras/keras_ce_plugin"),
    "onnx": ("ONNX model", "ONNX Runtime without TensorFlow"),
    "onnx_int8": ("int8 ONNX model", "ONNX Runtime without TensorFlow"),
}
_SCRIPTS = {
    "savedmodel": "_serve_savedmodel.py",
    "onnx": "_serve_onnx.py",
    "onnx_int8": "_serve_onnx.py",
}


def keras_worker(argv: Sequence[str]) -> int:
    """Worker: predicts INPUTS.npz with the .keras model; writes OUT.npz and a report.

    ``argv`` is ``ARTIFACT INPUTS OUT REPORT [MODULE...]`` (arrays by input name in,
    by output name out, as in the serving signature): each MODULE (a dotted
    name or an absolute ``.py`` path, see :func:`keras_ce_plugin.targets.import_modules`)
    is imported first, so that a loss it registers is known. The model is loaded
    with :func:`keras_ce_plugin.files.load_keras_model` (``compile=False``); its
    warnings go into the report, a :class:`KerasCEError` is printed on one line
    (exit 2).
    """
    import keras

    from keras_ce_plugin.export.signature import model_feed, serving_signature
    from keras_ce_plugin.files import load_keras_model

    artifact, inputs_path, out_path, report_path, *imports = argv
    t0 = time.perf_counter()
    try:
        if imports:
            from keras_ce_plugin.targets import import_modules

            import_modules(imports)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            model = load_keras_model(artifact, compile=False)
    except KerasCEError as exc:
        print(" ".join(str(exc).split()), file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    signature = serving_signature(model)
    with np.load(inputs_path, allow_pickle=False) as data:
        feeds = {spec["name"]: data[spec["name"]] for spec in signature["inputs"]}
    t0 = time.perf_counter()
    predicted = model.predict(model_feed(model, feeds, signature), batch_size=256, verbose=0)
    predict_s = time.perf_counter() - t0
    outputs: dict[str, Any] = {}
    for spec, value in zip(signature["outputs"], keras.tree.flatten(predicted)):
        value = np.asarray(value)
        outputs[spec["name"]] = value.astype(np.float32) if value.dtype.kind == "f" else value
    with open(out_path, "wb") as f:
        np.savez(f, **outputs)
    with open(report_path, "w") as f:
        json.dump(
            {
                "runtime": f"keras {keras.__version__}",
                "load_s": load_s,
                "predict_s": predict_s,
                "forbidden_modules_present": [],
                "warnings": list(
                    dict.fromkeys(
                        str(w.message) for w in caught if issubclass(w.category, UserWarning)
                    )
                ),
            },
            f,
        )
    return 0


def _worker_imports(imports: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--import`` specs as the Keras worker (another directory) takes them.

    A ``.py`` path becomes absolute. A dotted name stays as it is; the folder its
    top-level package was imported from here (if it is already imported) is
    returned too, to put on the worker's ``PYTHONPATH``.
    """
    specs, folders = [], []
    for spec in imports:
        spec = str(spec)
        if spec.endswith(".py") or "/" in spec or "\\" in spec:
            specs.append(str(Path(spec).resolve()))
            continue
        specs.append(spec)
        top = sys.modules.get(spec.split(".")[0])
        where = getattr(top, "__file__", None)
        if where:
            folder = Path(where).resolve().parent
            if Path(where).name == "__init__.py":
                folder = folder.parent
            folders.append(str(folder))
    return specs, list(dict.fromkeys(folders))


def _worker_command(
    fmt: str, artifact: Path, io_paths: Sequence[str], imports: Sequence[str] = ()
) -> list[str]:
    if fmt == "keras":
        return [sys.executable, "-c", _RUN_KERAS, str(artifact), *io_paths, *imports]
    script = _HERE / _SCRIPTS[fmt]
    return [sys.executable, "-c", _RUN_SCRIPT, str(script), str(artifact), *io_paths]


def _run_worker(
    fmt: str, artifact: Path, inputs_path: Path, work: Path, imports: Sequence[str] = ()
):
    what, runtime = WORKERS[fmt]
    out_path, report_path = work / f"{fmt}.npz", work / f"{fmt}.json"
    env = {**os.environ}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    specs: list[str] = []
    if fmt == "keras":  # importable even when the package is used from a source tree
        specs, folders = _worker_imports(imports)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_ROOT), *folders, env.get("PYTHONPATH", "")) if p
        )
    io_paths = [str(inputs_path), str(out_path), str(report_path)]
    cmd = _worker_command(fmt, artifact, io_paths, specs)
    try:
        proc = subprocess.run(
            cmd, cwd=work, env=env, capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise KerasCEError(
            f"The {what} {artifact} did not answer within {_WORKER_TIMEOUT_S} s in a fresh "
            f"process ({runtime})."
        ) from None
    if proc.returncode != 0 or not out_path.is_file() or not report_path.is_file():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise KerasCEError(
            f"The {what} {artifact} failed to load or predict in a fresh process "
            f"({runtime}; exit status {proc.returncode}): {reason}"
        )
    report = json.loads(report_path.read_text())
    if report.get("forbidden_modules_present"):
        raise KerasCEError(
            f"The {what} process imported {report['forbidden_modules_present']}, "
            f"which it must serve without."
        )
    for message in report.get("warnings", ()):
        warnings.warn(message, UserWarning, stacklevel=3)
    with np.load(out_path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}, report


def verification_images(
    data_dir: str | os.PathLike | None, limit_test: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 test images and one-hot labels ``verify`` predicts."""
    from keras_ce_plugin.data import load_cifar10

    # Only test images are used; limit_train=1 skips converting the training set.
    (_, _), (x_test, y_test) = load_cifar10(data_dir, limit_train=1, limit_test=limit_test)
    return x_test, y_test


def verification_inputs(
    manifest: dict[str, Any],
    data_dir: str | os.PathLike | None,
    limit_test: int | None,
    *,
    seed: int = VERIFY_SEED,
) -> tuple[Any, np.ndarray | None, str]:
    """What ``verify`` predicts: ``(inputs, labels_or_None, description)``.

    An image classifier (or an export from before the ``kind`` field) gets CIFAR-10
    test images; any other model :data:`GENERATED_INPUTS` (or ``limit_test``) seeded
    inputs of its signature (:func:`~keras_ce_plugin.export.signature.generate_inputs`).
    """
    if manifest.get("kind", IMAGE_CLASSIFIER) == IMAGE_CLASSIFIER:
        images, labels = verification_images(data_dir, limit_test)
        return images, labels, f"{len(images)} CIFAR-10 test images"
    n = GENERATED_INPUTS if limit_test is None else int(limit_test)
    feeds = generate_inputs(manifest, n, seed)
    return feeds, None, f"{n} generated inputs (seed {seed}) of {describe_signature(manifest)}"


def check_export(export_dir: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """Reads the manifest and checks every file's size and SHA-256.

    Returns ``(manifest, number_of_files)``; raises KerasCEError naming each problem.
    """
    manifest = read_manifest(export_dir)
    return manifest, check_files(export_dir, manifest)


def _row(
    fmt: str, outputs, report, reference, truth, atol: float, classifier: bool
) -> dict[str, Any]:
    row = {
        "format": fmt,
        "runtime": report.get("runtime", ""),
        "load_s": report.get("load_s"),
        "max_abs_diff": None,
        "agreement": None,
        "accuracy": None,
        "ok": True,
        "problem": "",
    }
    reference = outputs if reference is None else reference
    if sorted(outputs) != sorted(reference):
        row.update(ok=False, problem=f"outputs {sorted(outputs)}, expected {sorted(reference)}")
        return row
    diffs = []
    for name, ref in reference.items():
        out = outputs[name]
        if out.shape != ref.shape or not np.array_equal(np.isfinite(out), np.isfinite(ref)):
            row.update(ok=False, problem=f"{name}: output shape {out.shape} or non-finite values")
            return row
        finite = np.isfinite(ref)
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))[finite]
        diffs.append(float(diff.max()) if diff.size else 0.0)
    first, ref = next(iter(outputs.values())), next(iter(reference.values()))
    top1 = first.argmax(-1) if first.ndim >= 2 and first.shape[-1] > 1 else None
    if truth is not None and top1 is not None:
        row["accuracy"] = float(np.mean(top1 == truth))
    if fmt == "keras":
        return row
    row["max_abs_diff"] = max(diffs)
    if top1 is not None:
        row["agreement"] = float(np.mean(top1 == ref.argmax(-1)))
    if fmt == "onnx_int8":  # lossy by design: judged by top-1 agreement only
        if (row["agreement"] or 0.0) < INT8_MIN_AGREEMENT:
            row.update(ok=False, problem=f"top-1 agreement < {INT8_MIN_AGREEMENT:.0%}")
    elif row["max_abs_diff"] > atol:
        row.update(ok=False, problem=f"max |diff| > atol {atol:g}")
    elif classifier and row["agreement"] is not None and row["agreement"] < 1.0:
        row.update(ok=False, problem="top-1 differs")
    return row


def compare_artifacts(
    export_dir: str | os.PathLike,
    manifest: dict[str, Any],
    images: Any,
    labels: np.ndarray | None = None,
    *,
    atol: float = 1e-5,
    imports: Sequence[str] = (),
) -> dict[str, Any]:
    """Predicts ``images`` with every artifact in ``manifest``, each in a fresh process.

    ``images`` is an array of images for an image classifier, else a mapping of
    input name to array (see :func:`verification_inputs`). The manifest must have
    passed :func:`check_export`. Returns ``{"ok", "images",
    "atol", "rows"}`` as :func:`verify_export` does (without ``files``). ``imports``
    (``--import MODULE``: dotted names or ``.py`` paths) are imported by the Keras
    worker before it loads the model; its load warnings are re-issued here.
    """
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise KerasCEError(f"`--atol` must be a number >= 0. Received: atol={atol!r}")
    export_dir = Path(export_dir)
    classifier = manifest.get("kind", IMAGE_CLASSIFIER) == IMAGE_CLASSIFIER
    if classifier:
        images = np.ascontiguousarray(images, dtype=np.float32)
        expected = tuple(manifest["input"]["shape"][1:])
        if images.shape[1:] != expected:
            raise KerasCEError(
                f"The export takes images of shape (batch, {', '.join(map(str, expected))}). "
                f"Received: {images.shape}"
            )
        feeds: dict[str, Any] = {INPUT_NAME: images}
    else:
        feeds = {k: np.ascontiguousarray(v) for k, v in dict(images).items()}
    n = len(next(iter(feeds.values())))
    truth = None if labels is None else np.asarray(labels).reshape(n, -1).argmax(-1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="keras-ce-verify-") as tmp:
        work = Path(tmp)
        inputs_path = work / "inputs.npz"
        with open(inputs_path, "wb") as f:
            np.savez(f, **feeds)
        reference = None
        for fmt in manifest["formats"]:
            artifact = (export_dir / ARTIFACTS[fmt]).resolve()
            outputs, report = _run_worker(fmt, artifact, inputs_path, work, imports)
            if fmt == "keras":
                reference = outputs
            rows.append(_row(fmt, outputs, report, reference, truth, atol, classifier))
    return {"ok": all(r["ok"] for r in rows), "images": n, "atol": atol, "rows": rows}


def verify_export(
    export_dir: str | os.PathLike,
    images: Any,
    labels: np.ndarray | None = None,
    *,
    atol: float = 1e-5,
    imports: Sequence[str] = (),
) -> dict[str, Any]:
    """Checks the manifest hashes, then predicts ``images`` with every artifact.

    Each artifact is loaded in its own fresh process (see :data:`WORKERS`). A float
    format passes if its largest absolute difference from the Keras model is at
    most ``atol`` (and, for an image classifier, it agrees on the top-1 class of
    every image); the int8 model,
    lossy by design, passes if it agrees on the top-1 class of at least
    :data:`~keras_ce_plugin.export.quantize.INT8_MIN_AGREEMENT` of the images (its
    max |diff| is reported, not judged). ``imports`` are passed to the Keras worker
    (see :func:`compare_artifacts`).

    Returns:
        ``{"ok": bool, "files": n, "images": n, "atol": atol, "rows": [...]}`` with
        one row per format (``format``, ``runtime``, ``max_abs_diff``, ``agreement``,
        ``accuracy``, ``load_s``, ``ok``, ``problem``).
    """
    manifest, n_files = check_export(export_dir)
    result = compare_artifacts(export_dir, manifest, images, labels, atol=atol, imports=imports)
    return {"ok": result["ok"], "files": n_files, **result}

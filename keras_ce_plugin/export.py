"""Export for serving: a SavedModel and an ONNX model that provably match Keras.

Both formats are traced from one ``tf.function``, the *serving signature*: it takes
``images: float32[batch, 32, 32, 3]`` (RGB pixels divided by 255, NHWC; the shape
comes from the model) and returns ``probabilities: float32[batch, 10]``, calling the
model with ``training=False``.

* :func:`export_savedmodel` writes a TensorFlow SavedModel whose ``serving_default``
  signature is that function. It loads with ``tf.saved_model.load`` (or TensorFlow
  Serving) where neither Keras nor this package is installed.
* :func:`export_onnx` converts the same function with ``tf2onnx.convert.from_function``
  (``tf2onnx.convert.from_keras`` does not work on Keras 3 models) and records the
  package version, class names and preprocessing in the model's ``metadata_props``.
* ``keras-ce export`` (:func:`export_command`) writes an export directory::

      DIR/model.keras        a copy of the source model (the reference)
      DIR/saved_model/       SavedModel, signature serving_default
      DIR/model.onnx         ONNX, input "images", output "probabilities"
      DIR/model.int8.onnx    only with --quantize int8, and only if it pays off
      DIR/manifest.json      formats, SHA-256 of every file, input/output, versions

* ``keras-ce verify`` (:func:`verify_command`) loads every artifact in its own fresh
  process -- Keras with the plugin; the SavedModel with ``keras``/``keras_ce_plugin``
  made unimportable; ONNX Runtime without TensorFlow -- and compares predictions on
  real CIFAR-10 test images with the Keras model.
* ``keras-ce predict`` (:func:`predict_command`) classifies PNG/JPEG files or ``.npy``
  batches with any of the three artifact kinds.

Every artifact is written to a temporary sibling and renamed into place
(:mod:`keras_ce_plugin.files`), so an interrupted export never leaves a half-written
artifact where a good one was, and nothing is replaced without ``overwrite=True``.

>>> parse_formats("onnx, savedmodel")
('savedmodel', 'onnx')
>>> parse_formats("tflite")
Traceback (most recent call last):
...
keras_ce_plugin.errors.KerasCEError: `--formats` must be a comma-separated list of savedmodel, onnx. Received: formats='tflite'
>>> default_class_names(3)
('class_0', 'class_1', 'class_2')
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from keras_ce_plugin import __version__
from keras_ce_plugin._versions import versions as _versions
from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.files import atomic_dir, atomic_path, sha256_file, write_json

__all__ = [
    "ArtifactExistsError",
    "export_command",
    "export_model_dir",
    "export_onnx",
    "export_savedmodel",
    "predict_command",
    "quantize_int8",
    "serving_signature",
    "verify_command",
    "verify_export",
]

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
SIGNATURE_KEY = "serving_default"
PREPROCESSING = (
    "RGB pixels, NHWC, float32 = uint8 / 255 (values in [0, 1]); no mean/std normalisation"
)
FORMATS = ("savedmodel", "onnx")
KERAS_FILE = "model.keras"
SAVEDMODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
#: Where each format lives in an export directory.
ARTIFACTS = {
    "keras": KERAS_FILE,
    "savedmodel": SAVEDMODEL_DIR,
    "onnx": ONNX_FILE,
    "onnx_int8": INT8_FILE,
}
#: ``--quantize int8`` keeps model.int8.onnx only if it is at least this much faster
#: than the float ONNX model at batch 256 ...
INT8_MIN_SPEEDUP = 2.0
#: ... and agrees with it on the top-1 class of at least this share of test images.
INT8_MIN_AGREEMENT = 0.99
INT8_CALIBRATION_IMAGES = 256
INT8_EVAL_IMAGES = 1000
IMAGE_SIZE = (32, 32)
_PACKAGE_DIR = Path(__file__).resolve().parent
_WORKER_TIMEOUT_S = 1800


class ArtifactExistsError(KerasCEError, FileExistsError):
    """An export target exists and ``overwrite`` was not given."""


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #
def _cifar10_classes() -> tuple[str, ...]:
    from keras_ce_plugin.data import CIFAR10_CLASSES

    return tuple(CIFAR10_CLASSES)


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """The CIFAR-10 names for 10 classes, else ``class_0`` ... ``class_{n-1}``."""
    cifar = _cifar10_classes()
    if num_classes == len(cifar):
        return cifar
    return tuple(f"class_{i}" for i in range(num_classes))


def parse_formats(text: str) -> tuple[str, ...]:
    """``"onnx,savedmodel"`` -> ``("savedmodel", "onnx")`` (validated, canonical order)."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if not names or any(name not in FORMATS for name in names):
        raise KerasCEError(
            f"`--formats` must be a comma-separated list of {', '.join(FORMATS)}. "
            f"Received: formats={text!r}"
        )
    return tuple(fmt for fmt in FORMATS if fmt in names)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _require_tensorflow_backend(what: str) -> None:
    import keras

    if keras.config.backend() != "tensorflow":
        raise KerasCEError(
            f"{what} traces the model with TensorFlow and needs the TensorFlow backend "
            f"(KERAS_BACKEND=tensorflow). Received: keras.config.backend()="
            f"{keras.config.backend()!r}"
        )


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be a bool. Received: overwrite={overwrite!r}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ArtifactExistsError(
            f"{path} already exists. Pass overwrite=True (`--overwrite`) to replace it."
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _make_readable(root: Path) -> None:
    """Gives ``root`` (and everything under it) the modes a plain write would have.

    The atomic writers create private temporaries (mode 0600/0700); a serving
    artifact must be readable by the server's user (e.g. a TF Serving container).
    """
    mask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


# --------------------------------------------------------------------------- #
# The serving signature
# --------------------------------------------------------------------------- #
def serving_signature(model: Any) -> dict[str, dict[str, Any]]:
    """Names, shapes and dtypes of the serving signature of ``model``.

    The shapes come from the model (batch axis always ``None``); the model must
    have exactly one input and one output.

    >>> import keras
    >>> m = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
    ...                       keras.layers.Dense(10, activation="softmax")])
    >>> sig = serving_signature(m)
    >>> sig["input"]
    {'name': 'images', 'shape': [None, 32, 32, 3], 'dtype': 'float32'}
    >>> sig["output"]
    {'name': 'probabilities', 'shape': [None, 10], 'dtype': 'float32'}
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a keras.Model. Received: model={model!r} of type "
            f"{type(model).__name__}"
        )
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(
            "`model` must be built with a known input shape (a Functional or Sequential "
            f"model with an Input). Received: model={model.name!r} without inputs/outputs"
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            "`model` must have exactly one input and one output to be served as "
            f"{INPUT_NAME} -> {OUTPUT_NAME}. Received: {len(inputs)} inputs, "
            f"{len(outputs)} outputs"
        )
    in_shape = [None, *[None if d is None else int(d) for d in inputs[0].shape[1:]]]
    out_shape = [None, *[None if d is None else int(d) for d in outputs[0].shape[1:]]]
    return {
        "input": {"name": INPUT_NAME, "shape": in_shape, "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": out_shape, "dtype": "float32"},
    }


def _serving_function(model: Any, signature: dict[str, dict[str, Any]]):
    """The ``tf.function`` both formats are made from, and its concrete function."""
    import tensorflow as tf

    spec = tf.TensorSpec(signature["input"]["shape"], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec], autograph=False)
    def serve(images):
        return {OUTPUT_NAME: tf.cast(model(images, training=False), tf.float32)}

    return serve, serve.get_concrete_function(), spec


# --------------------------------------------------------------------------- #
# SavedModel
# --------------------------------------------------------------------------- #
def export_savedmodel(model: Any, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes ``model`` as a TensorFlow SavedModel for serving.

    The ``serving_default`` signature takes ``images: float32[None, H, W, C]`` and
    returns ``probabilities: float32[None, num_classes]`` (the model called with
    ``training=False``). It loads with ``tf.saved_model.load`` without Keras or this
    package, and serves with TensorFlow Serving's REST API
    (``{"instances": [...]}`` or ``{"inputs": {"images": [...]}}``).

    Only the variables the signature reads are saved, once each (Keras 3.15's own
    ``model.export(format="tf_saved_model")`` stores every weight twice).

    Args:
        model: A built single-input, single-output ``keras.Model``.
        out_dir: The SavedModel directory to create.
        overwrite: Replace an existing ``out_dir``.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ArtifactExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    import tensorflow as tf

    out_dir = Path(out_dir)
    _refuse_existing(out_dir, overwrite)
    _require_tensorflow_backend("SavedModel export")
    signature = serving_signature(model)
    serve, concrete, _ = _serving_function(model, signature)
    module = tf.Module()
    module.serve = serve
    # Track exactly the variables the signature captures (public ConcreteFunction API).
    module.serving_variables = list(concrete.variables)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE_KEY: concrete})
        _make_readable(tmp)
    return out_dir


# --------------------------------------------------------------------------- #
# ONNX
# --------------------------------------------------------------------------- #
def _check_opset(opset: Any) -> int | None:
    if opset is None:
        return None
    try:
        from tf2onnx import constants
    except ImportError as exc:
        raise _missing_export_extra(exc) from None
    high = max(constants.OPSET_TO_IR_VERSION)
    if (
        isinstance(opset, bool)
        or not isinstance(opset, (int, np.integer))
        or not 10 <= opset <= high
    ):
        raise KerasCEError(
            f"`opset` must be an integer from 10 to {high} (what tf2onnx "
            f"{importlib.metadata.version('tf2onnx')} supports). Received: opset={opset!r}"
        )
    return int(opset)


def _missing_export_extra(exc: ImportError) -> KerasCEError:
    return KerasCEError(
        f"ONNX export needs tf2onnx, onnx and onnxruntime ({_one_line(exc)}). Install them "
        'with `pip install "keras-ce-plugin[export]"`.'
    )


def _onnx_metadata(signature: dict, class_names: Sequence[str]) -> dict[str, str]:
    versions = _versions()
    return {
        "keras_ce_plugin_version": __version__,
        "class_names": json.dumps(list(class_names)),
        "preprocessing": PREPROCESSING,
        "input_name": INPUT_NAME,
        "input_shape": json.dumps(signature["input"]["shape"]),
        "output_name": OUTPUT_NAME,
        "output_shape": json.dumps(signature["output"]["shape"]),
        "layout": "NHWC",
        "keras_version": versions.get("keras", ""),
        "tensorflow_version": versions.get("tensorflow", ""),
        "tf2onnx_version": versions.get("tf2onnx", ""),
    }


def _set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for prop in keep:
        proto.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)


def _check_class_names(class_names: Any, num_classes: int | None) -> tuple[str, ...]:
    if class_names is None:
        return default_class_names(num_classes or 0)
    names = tuple(class_names)
    if not all(isinstance(n, str) for n in names) or (
        num_classes is not None and len(names) != num_classes
    ):
        raise ValueError(
            f"`class_names` must be {num_classes} strings, one per model output. "
            f"Received: class_names={class_names!r}"
        )
    return names


def export_onnx(
    model: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    overwrite: bool = False,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Writes ``model`` as an ONNX model with the serving signature.

    Converted with ``tf2onnx.convert.from_function`` from the same ``tf.function`` as
    the SavedModel: input ``images`` (float32, dynamic batch axis ``batch``), output
    ``probabilities``. The model passes ``onnx.checker.check_model(full_check=True)``
    and its ``metadata_props`` record ``keras_ce_plugin_version``, ``class_names``
    (JSON), ``preprocessing`` (pixels / 255), input/output names and shapes and the
    Keras/TensorFlow/tf2onnx versions.

    Args:
        model: A built single-input, single-output ``keras.Model`` (float32).
        path: The ``.onnx`` file to create.
        opset: ONNX opset (default: tf2onnx's default).
        overwrite: Replace an existing file.
        class_names: One name per output (default: CIFAR-10's for 10 outputs).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ArtifactExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    _refuse_existing(path, overwrite)
    opset = _check_opset(opset)
    _require_tensorflow_backend("ONNX export")
    signature = serving_signature(model)
    names = _check_class_names(class_names, signature["output"]["shape"][-1])
    try:
        import onnx
        import tf2onnx
    except ImportError as exc:
        raise _missing_export_extra(exc) from None
    compute_dtype = getattr(getattr(model, "dtype_policy", None), "compute_dtype", "float32")
    if compute_dtype != "float32":
        raise ValueError(
            "ONNX export needs a float32 model (convert a mixed-precision model by "
            "rebuilding it under the float32 policy and copying the weights). Received: "
            f"compute dtype {compute_dtype!r}"
        )
    serve, _, spec = _serving_function(model, signature)
    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=opset)
    except Exception as exc:
        raise KerasCEError(
            f"tf2onnx could not convert the model to ONNX (opset={opset}): {_one_line(exc)}"
        ) from exc
    graph = proto.graph
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [
        OUTPUT_NAME
    ]:  # pragma: no cover - tf2onnx names them after the signature
        raise KerasCEError(
            f"Unexpected ONNX graph: inputs {[i.name for i in graph.input]}, outputs "
            f"{[o.name for o in graph.output]}"
        )
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    _set_metadata(proto, _onnx_metadata(signature, names))
    proto.doc_string = (
        f"Exported by keras_ce_plugin {__version__}: {INPUT_NAME} (pixels / 255, NHWC) -> "
        f"{OUTPUT_NAME}"
    )
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
        _make_readable(tmp)
    return path


# --------------------------------------------------------------------------- #
# int8 quantization
# --------------------------------------------------------------------------- #
def _throughput(fn, images: np.ndarray, repeats: int = 3) -> float:
    fn(images[:8])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - t0)
    return len(images) / float(np.median(times))


def quantize_int8(
    float_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_images: np.ndarray,
    eval_images: np.ndarray,
    *,
    min_speedup: float = INT8_MIN_SPEEDUP,
    min_agreement: float = INT8_MIN_AGREEMENT,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Static int8 quantization with ONNX Runtime; keeps the result only if it pays off.

    QDQ format, per-channel symmetric int8 weights, uint8 activations, MinMax
    calibration on ``calibration_images`` (CIFAR-10 training images). The int8 model
    is measured against the float model in this process: top-1 agreement on
    ``eval_images`` and throughput at batch 256 (median of 3, side by side). It is
    written to ``out_path`` only if it is at least ``min_speedup`` times faster and
    agrees on at least ``min_agreement`` of the images.

    Returns:
        The measurements: ``kept``, ``reason``, ``speedup``, ``agreement``,
        ``float_images_per_s``, ``int8_images_per_s``, ... (stored in the manifest).
    """
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise _missing_export_extra(exc) from None
    from keras_ce_plugin._serve_onnx import OnnxPredictor

    out_path = Path(out_path)
    _refuse_existing(out_path, overwrite)
    calibration_images = np.ascontiguousarray(calibration_images, dtype=np.float32)
    eval_images = np.ascontiguousarray(eval_images, dtype=np.float32)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                [
                    {INPUT_NAME: calibration_images[i : i + 32]}
                    for i in range(0, len(calibration_images), 32)
                ]
            )

        def get_next(self):
            return next(self._batches, None)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize.") as tmp:
        tmp_model, prepared = Path(tmp) / INT8_FILE, Path(tmp) / "prepared.onnx"
        # ONNX Runtime's recommended pre-processing: shape inference + graph cleanup.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(tmp_model),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(tmp_model))
        metadata = {p.key: p.value for p in onnx.load(str(float_path)).metadata_props}
        metadata["quantization"] = (
            f"static int8 (QDQ, per-channel int8 weights, uint8 activations, MinMax "
            f"calibration on {len(calibration_images)} CIFAR-10 training images)"
        )
        _set_metadata(proto, metadata)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp_model))
        quantize_s = time.perf_counter() - t0

        float_model = OnnxPredictor(str(float_path))
        int8_model = OnnxPredictor(str(tmp_model))
        p_float = float_model(eval_images)
        p_int8 = int8_model(eval_images)
        agreement = float(np.mean(p_float.argmax(-1) == p_int8.argmax(-1)))
        bench = np.ascontiguousarray(np.resize(eval_images, (256, *eval_images.shape[1:])))
        float_ips, int8_ips = [], []
        for _ in range(2):  # interleaved, so both see the same machine load
            float_ips.append(_throughput(float_model, bench))
            int8_ips.append(_throughput(int8_model, bench))
        f_ips, i_ips = max(float_ips), max(int8_ips)
        speedup = i_ips / f_ips
        reasons = []
        if speedup < min_speedup:
            reasons.append(f"speedup {speedup:.2f}x < {min_speedup}x")
        if agreement < min_agreement:
            reasons.append(f"top-1 agreement {agreement:.4f} < {min_agreement}")
        kept = not reasons
        if kept:
            with atomic_path(out_path, suffix=".onnx") as target_tmp:
                shutil.copyfile(tmp_model, target_tmp)
                _make_readable(target_tmp)
        return {
            "method": metadata["quantization"],
            "calibration_images": len(calibration_images),
            "eval_images": len(eval_images),
            "agreement": agreement,
            "max_abs_diff": float(np.max(np.abs(p_float - p_int8))),
            "float_images_per_s": f_ips,
            "int8_images_per_s": i_ips,
            "speedup": speedup,
            "batch_size": len(bench),
            "quantize_s": quantize_s,
            "min_speedup": min_speedup,
            "min_agreement": min_agreement,
            "kept": kept,
            "reason": "meets both thresholds" if kept else "; ".join(reasons),
        }


# --------------------------------------------------------------------------- #
# Export directory and manifest
# --------------------------------------------------------------------------- #
def _file_entries(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE:
            rel = path.relative_to(root).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def _load_keras_model(path: Path, *, compile: bool = False) -> Any:
    import keras

    import keras_ce_plugin  # noqa: F401  (registers the losses for compile=True)

    if not path.exists():
        raise KerasCEError(f"Keras model file not found: {path}")
    if path.is_dir():
        raise KerasCEError(f"{path} is a directory; expected a .keras file.")
    if path.suffix != ".keras":
        raise KerasCEError(f"Expected a .keras model file. Received: {path}")
    try:
        return keras.saving.load_model(path, compile=compile)
    except Exception as exc:
        raise KerasCEError(
            f"Could not load the Keras model {path} (corrupt, truncated or not a .keras "
            f"file?): {_one_line(exc)}"
        ) from None


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.is_file() or (out.is_symlink() and not out.is_dir()):
        raise KerasCEError(f"`--out` {out} is a file; it must be a directory (or not exist).")
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


def export_model_dir(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    formats: Sequence[str] = FORMATS,
    opset: int | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
    data_dir: str | os.PathLike | None = None,
    log=print,
) -> dict[str, Any]:
    """Writes an export directory for the ``.keras`` file ``model_path``; returns its manifest.

    The whole directory is assembled in a temporary sibling and renamed into place,
    so a previous export at ``out`` stays intact until the new one is complete.
    ``quantize="int8"`` calibrates on CIFAR-10 training images from ``data_dir``
    (default ``$KERAS_CE_CIFAR10_DIR``, see :func:`keras_ce_plugin.data.load_cifar10`).
    """
    model_path, out = Path(model_path), Path(out)
    formats = parse_formats(formats if isinstance(formats, str) else ",".join(formats))
    if quantize not in (None, "int8"):
        raise KerasCEError(f"`quantize` must be None or 'int8'. Received: quantize={quantize!r}")
    if quantize and "onnx" not in formats:
        raise KerasCEError("`--quantize int8` quantizes the ONNX model: add onnx to `--formats`.")
    opset = _check_opset(opset)
    _check_out_dir(out, overwrite)
    model = _load_keras_model(model_path)
    try:
        signature = serving_signature(model)
    except (TypeError, ValueError) as exc:
        raise KerasCEError(f"Cannot export {model_path}: {exc}") from None
    class_names = default_class_names(signature["output"]["shape"][-1] or 0)
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "created_by": f"keras_ce_plugin {__version__}",
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(model_path), "sha256": sha256_file(model_path)},
        "formats": ["keras"],
        "artifacts": {"keras": KERAS_FILE},
        "signature": SIGNATURE_KEY,
        **signature,
        "class_names": list(class_names),
        "preprocessing": PREPROCESSING,
        "onnx": None,
        "quantization": None,
        "versions": _versions(),
    }
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        with atomic_path(tmp / KERAS_FILE, suffix=".keras") as dst:
            shutil.copyfile(model_path, dst)
        if "savedmodel" in formats:
            t0 = time.perf_counter()
            export_savedmodel(model, tmp / SAVEDMODEL_DIR)
            manifest["formats"].append("savedmodel")
            manifest["artifacts"]["savedmodel"] = SAVEDMODEL_DIR
            log(f"  savedmodel  {out / SAVEDMODEL_DIR}  ({time.perf_counter() - t0:.1f} s)")
        if "onnx" in formats:
            import onnx

            t0 = time.perf_counter()
            export_onnx(model, tmp / ONNX_FILE, opset=opset, class_names=class_names)
            proto = onnx.load(str(tmp / ONNX_FILE), load_external_data=False)
            manifest["formats"].append("onnx")
            manifest["artifacts"]["onnx"] = ONNX_FILE
            manifest["onnx"] = {
                "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                "ir_version": proto.ir_version,
            }
            log(f"  onnx        {out / ONNX_FILE}  ({time.perf_counter() - t0:.1f} s)")
        if quantize == "int8":
            from keras_ce_plugin.data import load_cifar10

            (x_train, _), (x_test, _) = load_cifar10(data_dir, limit_train=INT8_CALIBRATION_IMAGES)
            record = quantize_int8(
                tmp / ONNX_FILE, tmp / INT8_FILE, x_train, x_test[:INT8_EVAL_IMAGES]
            )
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
        manifest["files"] = _file_entries(tmp)
        write_json(tmp / MANIFEST_FILE, manifest)
        _make_readable(tmp)
    return manifest


def export_command(args: argparse.Namespace) -> int:
    """``keras-ce export MODEL --out DIR [--formats ...] [--opset N] [--quantize int8]``."""
    out = Path(args.out)
    print(f"Exporting {args.model} to {out}/")
    manifest = export_model_dir(
        args.model,
        out,
        formats=parse_formats(args.formats),
        opset=args.opset,
        quantize=args.quantize,
        overwrite=bool(args.overwrite),
        data_dir=getattr(args, "data_dir", None),
    )
    print(
        f"Wrote {out}/ ({', '.join(manifest['formats'])}; {len(manifest['files'])} files "
        f"hashed in {MANIFEST_FILE}). Check it with: keras-ce verify {out}"
    )
    return 0


# --------------------------------------------------------------------------- #
# Manifest checks
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# verify: one fresh process per artifact
# --------------------------------------------------------------------------- #
# Runs a worker script by path without adding its directory (the package directory,
# which holds an io.py) or the working directory to sys.path.
_RUN_SCRIPT = (
    "import runpy, sys; del sys.path[0]; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
_RUN_KERAS = (
    "import sys; from keras_ce_plugin.export import _keras_worker; "
    "sys.exit(_keras_worker(sys.argv[1:]))"
)
WORKERS = {
    "keras": ("Keras model", "keras + keras_ce_plugin"),
    "savedmodel": ("SavedModel", "TensorFlow without keras/keras_ce_plugin"),
    "onnx": ("ONNX model", "ONNX Runtime without TensorFlow"),
    "onnx_int8": ("int8 ONNX model", "ONNX Runtime without TensorFlow"),
}


def _keras_worker(argv: Sequence[str]) -> int:
    """Worker: predicts IMAGES.npy with the .keras model (loaded with its loss compiled)."""
    import keras

    artifact, images_path, out_path, report_path = argv
    t0 = time.perf_counter()
    model = keras.saving.load_model(artifact)
    load_s = time.perf_counter() - t0
    images = np.load(images_path, allow_pickle=False)
    t0 = time.perf_counter()
    probabilities = model.predict(images, batch_size=256, verbose=0)
    predict_s = time.perf_counter() - t0
    np.save(out_path, np.asarray(probabilities, dtype=np.float32))
    loss = getattr(model, "loss", None)
    with open(report_path, "w") as f:
        json.dump(
            {
                "runtime": f"keras {keras.__version__}",
                "load_s": load_s,
                "predict_s": predict_s,
                "loss": getattr(loss, "name", None) or str(loss),
                "forbidden_modules_present": [],
            },
            f,
        )
    return 0


def _worker_command(fmt: str, artifact: Path, io_paths: Sequence[str]) -> list[str]:
    if fmt == "keras":
        return [sys.executable, "-c", _RUN_KERAS, str(artifact), *io_paths]
    script = _PACKAGE_DIR / ("_serve_savedmodel.py" if fmt == "savedmodel" else "_serve_onnx.py")
    return [sys.executable, "-c", _RUN_SCRIPT, str(script), str(artifact), *io_paths]


def _run_worker(fmt: str, artifact: Path, images_path: Path, work: Path):
    what, runtime = WORKERS[fmt]
    out_path, report_path = work / f"{fmt}.npy", work / f"{fmt}.json"
    env = {**os.environ}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if fmt == "keras":  # importable even when the package is used from a source tree
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_DIR.parent), env.get("PYTHONPATH", "")) if p
        )
    cmd = _worker_command(fmt, artifact, [str(images_path), str(out_path), str(report_path)])
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
    return np.load(out_path, allow_pickle=False), report


def _verification_images(data_dir, limit_test):
    from keras_ce_plugin.data import load_cifar10

    # Only test images are used; limit_train=1 skips converting the training set.
    (_, _), (x_test, y_test) = load_cifar10(data_dir, limit_train=1, limit_test=limit_test)
    return x_test, y_test


def verify_export(
    export_dir: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    atol: float = 1e-5,
) -> dict[str, Any]:
    """Checks the manifest hashes, then predicts ``images`` with every artifact.

    Each artifact is loaded in its own fresh process (see :data:`WORKERS`). A float
    format passes if its largest absolute difference from the Keras model is at
    most ``atol`` and it agrees on the top-1 class of every image; the int8 model,
    lossy by design, passes if it agrees on the top-1 class of at least
    :data:`INT8_MIN_AGREEMENT` of the images (its max |diff| is reported, not judged).

    Returns:
        ``{"ok": bool, "files": n, "images": n, "atol": atol, "rows": [...]}`` with
        one row per format (``format``, ``runtime``, ``max_abs_diff``, ``agreement``,
        ``accuracy``, ``load_s``, ``ok``, ``problem``).
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    n_files = check_files(export_dir, manifest)
    return _verify(export_dir, manifest, n_files, images, labels, atol)


def _verify(export_dir: Path, manifest: dict, n_files: int, images, labels, atol) -> dict:
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise KerasCEError(f"`--atol` must be a number >= 0. Received: atol={atol!r}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    expected = tuple(manifest["input"]["shape"][1:])
    if images.shape[1:] != expected:
        raise KerasCEError(
            f"The export takes images of shape (batch, {', '.join(map(str, expected))}). "
            f"Received: {images.shape}"
        )
    truth = None if labels is None else np.asarray(labels).reshape(len(images), -1).argmax(-1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="keras-ce-verify-") as work:
        work = Path(work)
        images_path = work / "images.npy"
        np.save(images_path, images)
        reference = None
        for fmt in manifest["formats"]:
            artifact = (export_dir / ARTIFACTS[fmt]).resolve()
            probs, report = _run_worker(fmt, artifact, images_path, work)
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
            if fmt == "keras":
                reference = probs
            if probs.shape != reference.shape or not np.all(np.isfinite(probs)):
                row.update(ok=False, problem=f"output shape {probs.shape} or non-finite values")
                rows.append(row)
                continue
            top1 = probs.argmax(-1)
            if truth is not None:
                row["accuracy"] = float(np.mean(top1 == truth))
            if fmt != "keras":
                row["max_abs_diff"] = float(np.max(np.abs(probs - reference)))
                row["agreement"] = float(np.mean(top1 == reference.argmax(-1)))
                if fmt == "onnx_int8":  # lossy by design: judged by top-1 agreement only
                    if row["agreement"] < INT8_MIN_AGREEMENT:
                        row.update(ok=False, problem=f"top-1 agreement < {INT8_MIN_AGREEMENT:.0%}")
                elif row["max_abs_diff"] > atol:
                    row.update(ok=False, problem=f"max |diff| > atol {atol:g}")
                elif row["agreement"] < 1.0:
                    row.update(ok=False, problem="top-1 differs")
            rows.append(row)
    return {
        "ok": all(r["ok"] for r in rows),
        "files": n_files,
        "images": len(images),
        "atol": atol,
        "rows": rows,
    }


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def verify_command(args: argparse.Namespace) -> int:
    """``keras-ce verify DIR [--data-dir D] [--limit-test N] [--atol 1e-5]``."""
    export_dir = Path(args.export_dir)
    manifest = read_manifest(export_dir)
    n_files = check_files(export_dir, manifest)
    print(f"{export_dir}/{MANIFEST_FILE}: {n_files} files, sizes and SHA-256 match")
    images, labels = _verification_images(args.data_dir, args.limit_test)
    result = _verify(export_dir, manifest, n_files, images, labels, args.atol)
    print(
        f"Predictions on {result['images']} CIFAR-10 test images, each artifact in a fresh "
        f"process (atol {result['atol']:g}):"
    )
    header = (
        f"{'format':<11} {'runtime':<20} {'max |Δ| vs Keras':>16} {'top-1 agree':>11} "
        f"{'accuracy':>8} {'load s':>6}  result"
    )
    print(header)
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


# --------------------------------------------------------------------------- #
# predict
# --------------------------------------------------------------------------- #
class _KerasPredictor:
    def __init__(self, path: Path):
        self.model = _load_keras_model(path)
        try:
            signature = serving_signature(self.model)
        except (TypeError, ValueError) as exc:
            raise KerasCEError(f"Cannot serve {path}: {exc}") from None
        self.input_shape = tuple(signature["input"]["shape"])
        self.output_shape = tuple(signature["output"]["shape"])
        self.input_dtype = "float32"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(images, batch_size=256, verbose=0))


def _manifest_class_names(export_dir: Path) -> list[str] | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        names = json.loads((export_dir / MANIFEST_FILE).read_text()).get("class_names")
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return None


def load_predictor(artifact: str | os.PathLike):
    """A NumPy function for a ``.keras`` file, a SavedModel directory or an ``.onnx`` file.

    Returns ``(predictor, kind, class_names_or_None)``; the predictor has
    ``input_shape``/``output_shape`` (batch ``None``) and maps float32 images to
    probabilities.
    """
    path = Path(artifact)
    if not path.exists():
        raise KerasCEError(f"Artifact not found: {path}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            from keras_ce_plugin._serve_savedmodel import SavedModelPredictor

            try:
                predictor = SavedModelPredictor(str(path))
            except Exception as exc:
                raise KerasCEError(
                    f"Could not load the SavedModel {path}: {_one_line(exc)}"
                ) from None
            return predictor, "savedmodel", _manifest_class_names(path.parent)
        if (path / MANIFEST_FILE).is_file():
            raise KerasCEError(
                f"{path} is an export directory; pass one artifact in it: "
                f"{path / ONNX_FILE}, {path / SAVEDMODEL_DIR} or {path / KERAS_FILE}."
            )
        raise KerasCEError(f"{path} is a directory without saved_model.pb: not a SavedModel.")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return _KerasPredictor(path), "keras", _manifest_class_names(path.parent)
    if suffix == ".onnx":
        try:
            from keras_ce_plugin._serve_onnx import OnnxPredictor
        except ImportError as exc:  # pragma: no cover - onnxruntime is an extra
            raise _missing_export_extra(exc) from None
        try:
            predictor = OnnxPredictor(str(path))
        except Exception as exc:
            raise KerasCEError(
                f"Could not load the ONNX model {path} (corrupt or not ONNX?): {_one_line(exc)}"
            ) from None
        names = None
        with contextlib.suppress(ValueError, TypeError):
            names = json.loads(predictor.metadata.get("class_names", "null"))
        return predictor, "onnx", names
    raise KerasCEError(
        f"The artifact must be a .keras file, a SavedModel directory or an .onnx file. "
        f"Received: {path}"
    )


def _check_npy(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != (*IMAGE_SIZE, 3) or len(array) == 0:
        raise KerasCEError(
            f"{path} must hold images of shape (N, 32, 32, 3) or (32, 32, 3). "
            f"Received: shape {array.shape}"
        )
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype not in (np.float16, np.float32, np.float64):
        raise KerasCEError(
            f"{path} must be uint8 pixels (0-255) or float pixels / 255 in [0, 1]. "
            f"Received: dtype {array.dtype}"
        )
    if not np.all(np.isfinite(array)):
        raise KerasCEError(f"{path} contains NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise KerasCEError(
            f"{path} must hold pixels / 255 in [0, 1] (or uint8 pixels). Received: values in "
            f"[{low:g}, {high:g}]"
        )
    return array.astype(np.float32)


def load_images(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, list[str]]:
    """PNG/JPEG files and ``.npy`` batches -> ``(x, labels)``: float32 ``(N, 32, 32, 3)``.

    Images are turned upright (EXIF orientation), converted to RGB, resized to 32x32
    (bilinear, antialiased) and divided by 255. A ``.npy`` file holds one image
    ``(32, 32, 3)`` or a batch ``(N, 32, 32, 3)``: uint8 pixels (divided by 255 here)
    or floats already in ``[0, 1]``; it is read with ``allow_pickle=False``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    batches, labels = [], []
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise KerasCEError(f"Image file not found: {path}")
        if path.is_dir():
            raise KerasCEError(f"{path} is a directory; expected a PNG/JPEG file or a .npy batch.")
        if path.suffix.lower() == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise KerasCEError(
                    f"{path} holds Python objects or is not a valid .npy file: {_one_line(exc)}"
                ) from None
            except (OSError, EOFError) as exc:
                raise KerasCEError(
                    f"{path} is not a readable .npy file: {_one_line(exc)}"
                ) from None
            if not isinstance(array, np.ndarray):
                raise KerasCEError(f"{path} is not a single NumPy array.")
            array = _check_npy(array, path)
            batches.append(array)
            labels.extend(f"{path}[{i}]" for i in range(len(array)))
            continue
        try:
            with Image.open(path) as img:
                if img.format not in ("PNG", "JPEG"):
                    raise KerasCEError(
                        f"{path} is a {img.format} image; only PNG and JPEG files (and .npy "
                        "batches) are supported."
                    )
                rgb = ImageOps.exif_transpose(img).convert("RGB")  # camera orientation
                if rgb.size != IMAGE_SIZE:
                    rgb = rgb.resize(IMAGE_SIZE, Image.Resampling.BILINEAR)
                pixels = np.asarray(rgb, dtype=np.uint8)
        except UnidentifiedImageError:
            raise KerasCEError(
                f"{path} is not an image (expected a PNG or JPEG file, or a .npy batch)."
            ) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise KerasCEError(
                f"{path} could not be read as an image (truncated?): {_one_line(exc)}"
            ) from None
        batches.append(pixels[None].astype(np.float32) / 255.0)
        labels.append(str(path))
    return np.concatenate(batches, axis=0), labels


def _shape_text(shape: Sequence[Any]) -> str:
    return "(" + ", ".join("batch" if d is None else str(d) for d in shape) + ")"


def predict_command(args: argparse.Namespace) -> int:
    """``keras-ce predict ARTIFACT IMAGE... [--top-k 3]``: prints the top classes per image."""
    images, labels = load_images(args.images)
    predictor, kind, class_names = load_predictor(args.artifact)
    expected = (None, *IMAGE_SIZE, 3)
    shape = tuple(predictor.input_shape)
    if len(shape) != 4 or any(d is not None and d != e for d, e in zip(shape[1:], expected[1:])):
        raise KerasCEError(
            f"{args.artifact} takes inputs of shape {_shape_text(shape)}, but "
            f"`keras-ce predict` feeds 32x32 RGB images {_shape_text(expected)}."
        )
    if predictor.input_dtype not in ("float32", "tensor(float)"):
        raise KerasCEError(
            f"{args.artifact} takes {predictor.input_dtype} inputs; expected float32 pixels / 255."
        )
    try:
        probabilities = np.asarray(predictor(images), dtype=np.float64)
    except Exception as exc:
        raise KerasCEError(f"{args.artifact} failed to predict: {_one_line(exc)}") from None
    if probabilities.ndim != 2 or len(probabilities) != len(images):
        raise KerasCEError(
            f"{args.artifact} returned shape {probabilities.shape}; expected (batch, classes)."
        )
    num_classes = probabilities.shape[1]
    if not class_names or len(class_names) != num_classes:
        class_names = default_class_names(num_classes)
    k = min(int(args.top_k), num_classes)
    width = max(len(label) for label in labels)
    for label, row in zip(labels, probabilities):
        top = np.argsort(-row, kind="stable")[:k]
        ranked = ", ".join(f"{class_names[i]} {row[i]:.4f}" for i in top)
        print(f"{label:<{width}}  {ranked}")
    return 0

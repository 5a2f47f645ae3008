"""Predict with any artifact: a ``.keras`` file, a SavedModel directory or an ``.onnx`` file.

The SavedModel and ONNX predictors live in the self-contained worker scripts
(``_serve_savedmodel.py``, ``_serve_onnx.py``) that ``verify`` also runs.

>>> top_classes(np.array([[0.1, 0.7, 0.2]]), ("a", "b", "c"), k=2)
[[('b', 0.7), ('c', 0.2)]]
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.export._common import describe, missing_export_extra
from keras_ce_plugin.export.bundle import (
    KERAS_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    SAVEDMODEL_DIR,
    manifest_class_names,
)
from keras_ce_plugin.export.signature import IMAGE_SIZE, default_class_names, serving_signature


class KerasPredictor:
    """A ``.keras`` model as a NumPy function, loaded with
    :func:`keras_ce_plugin.files.load_keras_model` (``compile=False``)."""

    def __init__(self, path: str | os.PathLike):
        from keras_ce_plugin.files import load_keras_model

        path = Path(path)
        try:
            self.model = load_keras_model(path, compile=False)
        except KerasCEError as exc:
            raise KerasCEError(f"Could not load the Keras model {path}: {exc}") from None
        try:
            signature = serving_signature(self.model)
        except (TypeError, ValueError) as exc:
            raise KerasCEError(f"Cannot serve {path}: {exc}") from None
        self.signature = signature
        self.input_names = [spec["name"] for spec in signature["inputs"]]
        self.output_names = [spec["name"] for spec in signature["outputs"]]
        self.input_shape = tuple(signature["inputs"][0]["shape"])
        self.output_shape = tuple(signature["outputs"][0]["shape"])
        self.input_dtype = signature["inputs"][0]["dtype"]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(images, batch_size=256, verbose=0))


def _load_savedmodel(path: Path):
    from keras_ce_plugin.export._serve_savedmodel import SavedModelPredictor

    try:
        return SavedModelPredictor(str(path))
    except Exception as exc:
        raise KerasCEError(f"Could not load the SavedModel {path}: {describe(exc)}") from None


def _load_onnx(path: Path):
    try:
        from keras_ce_plugin.export._serve_onnx import OnnxPredictor
    except ImportError as exc:  # pragma: no cover - onnxruntime is an extra
        raise missing_export_extra(exc) from None
    try:
        return OnnxPredictor(str(path))
    except Exception as exc:
        raise KerasCEError(
            f"Could not load the ONNX model {path} (corrupt or not ONNX?): {describe(exc)}"
        ) from None


def load_predictor(artifact: str | os.PathLike) -> tuple[Any, str, list[str] | None]:
    """A NumPy function for a ``.keras`` file, a SavedModel directory or an ``.onnx`` file.

    Returns ``(predictor, kind, class_names_or_None)``; the predictor has
    ``input_shape``/``output_shape`` (batch ``None``) and ``input_dtype`` and maps
    float32 images to probabilities. Class names come from the ONNX metadata or
    the ``manifest.json`` of the export directory the artifact is in.
    """
    path = Path(artifact)
    if not path.exists():
        raise KerasCEError(f"Artifact not found: {path}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return _load_savedmodel(path), "savedmodel", manifest_class_names(path.parent)
        if (path / MANIFEST_FILE).is_file():
            raise KerasCEError(
                f"{path} is an export directory; pass one artifact in it: "
                f"{path / ONNX_FILE}, {path / SAVEDMODEL_DIR} or {path / KERAS_FILE}."
            )
        raise KerasCEError(f"{path} is a directory without saved_model.pb: not a SavedModel.")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return KerasPredictor(path), "keras", manifest_class_names(path.parent)
    if suffix == ".onnx":
        predictor = _load_onnx(path)
        names = None
        with contextlib.suppress(ValueError, TypeError):
            names = json.loads(predictor.metadata.get("class_names", "null"))
        return predictor, "onnx", names
    raise KerasCEError(
        f"The artifact must be a .keras file, a SavedModel directory or an .onnx file. "
        f"Received: {path}"
    )


def _shape_text(shape: Sequence[Any]) -> str:
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(["batch", *dims[1:]] if dims else dims) + ")"


def _refuse_non_classifier(artifact: Any, predictor: Any) -> None:
    """Raises KerasCEError unless ``predictor`` is an image classifier (one float
    input ``(batch, H, W, 3)``, one output ``(batch, classes)``)."""
    shape, out = tuple(predictor.input_shape), tuple(predictor.output_shape)
    ins, outs = list(predictor.input_names), list(predictor.output_names)
    if len(ins) == 1 and len(outs) == 1 and len(shape) == 4 and shape[3] == 3 and len(out) == 2:
        if predictor.input_dtype in ("float32", "float16", "bfloat16", "tensor(float)"):
            return
    takes = f"{', '.join(ins)} {_shape_text(shape)}" + (
        f" ({len(ins)} inputs)" if len(ins) > 1 else ""
    )
    raise KerasCEError(
        f"{artifact} is not an image classifier (it takes {takes} {predictor.input_dtype} "
        f"and returns {len(outs)} output(s), the first {_shape_text(out)}); `keras-ce "
        f"predict` classifies {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} RGB images. Serve it with "
        "`keras-ce export MODEL --out DIR` (SavedModel/ONNX with its own signature) or "
        "call `model.predict` in Python."
    )


def predict_images(
    artifact: str | os.PathLike, images: np.ndarray
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Predicts float32 ``images`` ``(N, 32, 32, 3)`` with ``artifact``.

    Returns ``(probabilities, class_names)``: float64 ``(N, classes)`` and one name
    per class (the artifact's, else :func:`default_class_names`). Every problem is a
    KerasCEError naming ``artifact``; a model that is not an image classifier is
    refused in one line naming ``keras-ce export`` and ``model.predict``.
    """
    predictor, _, class_names = load_predictor(artifact)
    _refuse_non_classifier(artifact, predictor)
    expected = (None, *IMAGE_SIZE, 3)
    shape = tuple(predictor.input_shape)
    if len(shape) != 4 or any(d is not None and d != e for d, e in zip(shape[1:], expected[1:])):
        raise KerasCEError(
            f"{artifact} takes inputs of shape {_shape_text(shape)}, but "
            f"`keras-ce predict` feeds {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} RGB images "
            f"{_shape_text(expected)}."
        )
    if predictor.input_dtype not in ("float32", "tensor(float)"):
        raise KerasCEError(
            f"{artifact} takes {predictor.input_dtype} inputs; expected float32 pixels / 255."
        )
    try:
        probabilities = np.asarray(predictor(images), dtype=np.float64)
    except Exception as exc:
        raise KerasCEError(f"{artifact} failed to predict: {describe(exc)}") from None
    if probabilities.ndim != 2 or len(probabilities) != len(images):
        raise KerasCEError(
            f"{artifact} returned shape {probabilities.shape}; expected (batch, classes)."
        )
    num_classes = probabilities.shape[1]
    if not class_names or len(class_names) != num_classes:
        return probabilities, default_class_names(num_classes)
    return probabilities, tuple(class_names)


def top_classes(
    probabilities: np.ndarray, class_names: Sequence[str], k: int
) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable ``(class name, probability)`` of each row, best first."""
    k = min(int(k), probabilities.shape[1])
    ranked = []
    for row in probabilities:
        top = np.argsort(-row, kind="stable")[:k]
        ranked.append([(class_names[i], float(row[i])) for i in top])
    return ranked

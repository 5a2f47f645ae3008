"""Export for serving: a SavedModel and an ONNX model that provably match Keras.

One module per concern, after Keras' own ``keras/src/export/``:

* :mod:`~keras_ce_plugin.export.signature` -- the serving signature both formats
  are traced from: for an image classifier ``images: float32[batch, 32, 32, 3]``
  (RGB pixels / 255, NHWC) -> ``probabilities: float32[batch, classes]``; for any
  other model its own input and output names, shapes and dtypes; the model called
  with ``training=False``.
* :mod:`~keras_ce_plugin.export.savedmodel` -- :func:`export_savedmodel`: a
  SavedModel that loads with ``tf.saved_model.load`` (or TensorFlow Serving)
  where neither Keras nor this package is installed.
* :mod:`~keras_ce_plugin.export.onnx` -- :func:`export_onnx`: ONNX through
  ``tf2onnx.convert.from_function``, with class names and preprocessing in its
  ``metadata_props``.
* :mod:`~keras_ce_plugin.export.quantize` -- :func:`quantize_int8`.
* :mod:`~keras_ce_plugin.export.bundle` -- :func:`export_model_dir` writes an export
  directory (a copy of the ``.keras`` file, the formats, ``manifest.json`` with the
  SHA-256 of every file) and swaps it in atomically; :func:`check_out_dir` (run
  first: the ``--out`` directory can be written), :func:`read_manifest`,
  :func:`check_files`.
* :mod:`~keras_ce_plugin.export.verify` -- :func:`verify_export`: every artifact in
  its own fresh process, compared with the Keras model.
* :mod:`~keras_ce_plugin.export.predict` -- :func:`load_predictor`, :func:`predict_images`.
* :mod:`~keras_ce_plugin.export.images` -- :func:`load_images` (PNG/JPEG/``.npy``).

``.keras`` files are loaded with :func:`keras_ce_plugin.files.load_keras_model`
(``compile=False``). The ``keras-ce export``, ``verify`` and ``predict`` commands
are in :mod:`keras_ce_plugin.cli.export`.

>>> from keras_ce_plugin import export
>>> export.parse_formats("onnx")
('onnx',)
>>> export.ARTIFACTS["onnx"], export.MANIFEST_FILE
('model.onnx', 'manifest.json')
"""

from __future__ import annotations

from keras_ce_plugin.export._common import ArtifactExistsError
from keras_ce_plugin.export.bundle import (
    ARTIFACTS,
    FORMATS,
    KERAS_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    ONNX_FILE,
    SAVEDMODEL_DIR,
    check_files,
    check_out_dir,
    export_model_dir,
    manifest_class_names,
    parse_formats,
    read_manifest,
)
from keras_ce_plugin.export.images import load_images
from keras_ce_plugin.export.onnx import export_onnx
from keras_ce_plugin.export.predict import (
    KerasPredictor,
    load_predictor,
    predict_images,
    top_classes,
)
from keras_ce_plugin.export.quantize import (
    INT8_CALIBRATION_IMAGES,
    INT8_EVAL_IMAGES,
    INT8_FILE,
    INT8_MIN_AGREEMENT,
    INT8_MIN_SPEEDUP,
    quantize_int8,
)
from keras_ce_plugin.export.savedmodel import export_savedmodel
from keras_ce_plugin.export.signature import (
    GENERIC,
    IMAGE_CLASSIFIER,
    IMAGE_SIZE,
    INPUT_NAME,
    OUTPUT_NAME,
    PREPROCESSING,
    SIGNATURE_KEY,
    default_class_names,
    generate_inputs,
    serving_signature,
)
from keras_ce_plugin.export.verify import (
    WORKERS,
    check_export,
    compare_artifacts,
    verification_images,
    verification_inputs,
    verify_export,
)

__all__ = [
    "ARTIFACTS",
    "FORMATS",
    "GENERIC",
    "IMAGE_CLASSIFIER",
    "IMAGE_SIZE",
    "INPUT_NAME",
    "INT8_CALIBRATION_IMAGES",
    "INT8_EVAL_IMAGES",
    "INT8_FILE",
    "INT8_MIN_AGREEMENT",
    "INT8_MIN_SPEEDUP",
    "KERAS_FILE",
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "ONNX_FILE",
    "OUTPUT_NAME",
    "PREPROCESSING",
    "SAVEDMODEL_DIR",
    "SIGNATURE_KEY",
    "WORKERS",
    "ArtifactExistsError",
    "KerasPredictor",
    "check_export",
    "check_files",
    "check_out_dir",
    "compare_artifacts",
    "default_class_names",
    "export_model_dir",
    "export_onnx",
    "export_savedmodel",
    "generate_inputs",
    "load_images",
    "load_predictor",
    "manifest_class_names",
    "parse_formats",
    "predict_images",
    "quantize_int8",
    "read_manifest",
    "serving_signature",
    "top_classes",
    "verification_images",
    "verification_inputs",
    "verify_export",
]

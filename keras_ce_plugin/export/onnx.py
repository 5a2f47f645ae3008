"""Export to ONNX (tf2onnx) with the serving signature and its metadata."""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_ce_plugin._version import __version__
from keras_ce_plugin._versions import versions as _versions
from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.export._common import (
    describe,
    make_readable,
    missing_export_extra,
    refuse_existing,
    require_tensorflow_backend,
)
from keras_ce_plugin.export.signature import (
    INPUT_NAME,
    OUTPUT_NAME,
    PREPROCESSING,
    check_class_names,
    serving_function,
    serving_signature,
)
from keras_ce_plugin.files import atomic_path

#: The lowest opset accepted by ``opset=``.
MIN_OPSET = 10


def check_opset(opset: Any) -> int | None:
    """``opset`` as an int tf2onnx supports (None stays None: tf2onnx's default)."""
    if opset is None:
        return None
    try:
        from tf2onnx import constants
    except ImportError as exc:
        raise missing_export_extra(exc) from None
    high = max(constants.OPSET_TO_IR_VERSION)
    if (
        isinstance(opset, bool)
        or not isinstance(opset, (int, np.integer))
        or not MIN_OPSET <= opset <= high
    ):
        raise KerasCEError(
            f"`opset` must be an integer from {MIN_OPSET} to {high} (what tf2onnx "
            f"{importlib.metadata.version('tf2onnx')} supports). Received: opset={opset!r}"
        )
    return int(opset)


def onnx_metadata(signature: dict, class_names: Sequence[str]) -> dict[str, str]:
    """The ``metadata_props`` of an exported ONNX model."""
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


def set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    """Sets ``metadata`` in ``proto.metadata_props``, keeping the other keys."""
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for prop in keep:
        proto.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)


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
    the SavedModel (``tf2onnx.convert.from_keras`` does not take Keras 3 models):
    input ``images`` (float32, dynamic batch axis ``batch``), output
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
    refuse_existing(path, overwrite)
    opset = check_opset(opset)
    require_tensorflow_backend("ONNX export")
    signature = serving_signature(model)
    names = check_class_names(class_names, signature["output"]["shape"][-1])
    try:
        import onnx
        import tf2onnx
    except ImportError as exc:
        raise missing_export_extra(exc) from None
    compute_dtype = getattr(getattr(model, "dtype_policy", None), "compute_dtype", "float32")
    if compute_dtype != "float32":
        raise ValueError(
            "ONNX export needs a float32 model (convert a mixed-precision model by "
            "rebuilding it under the float32 policy and copying the weights). Received: "
            f"compute dtype {compute_dtype!r}"
        )
    serve, _, spec = serving_function(model, signature)
    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=opset)
    except Exception as exc:
        raise KerasCEError(
            f"tf2onnx could not convert the model to ONNX (opset={opset}): {describe(exc)}"
        ) from exc
    graph = proto.graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:  # pragma: no cover
        raise KerasCEError(f"Unexpected ONNX graph: inputs {inputs}, outputs {outputs}")
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    set_metadata(proto, onnx_metadata(signature, names))
    proto.doc_string = (
        f"Exported by keras_ce_plugin {__version__}: {INPUT_NAME} (pixels / 255, NHWC) -> "
        f"{OUTPUT_NAME}"
    )
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
        make_readable(tmp)
    return path


def opset_of(path: str | os.PathLike) -> dict[str, int]:
    """``{"opset": N, "ir_version": M}`` of the ONNX model at ``path``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": proto.ir_version,
    }

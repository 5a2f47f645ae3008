"""Export to ONNX (tf2onnx) with the serving signature and its metadata."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Iterator, Sequence
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
    IMAGE_CLASSIFIER,
    INPUT_NAME,
    OUTPUT_NAME,
    PREPROCESSING,
    check_class_names,
    describe_signature,
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


def onnx_metadata(signature: dict, class_names: Sequence[str] | None) -> dict[str, str]:
    """The ``metadata_props`` of an exported ONNX model."""
    versions = _versions()
    meta = {"keras_ce_plugin_version": __version__, "kind": signature.get("kind", IMAGE_CLASSIFIER)}
    if "input" in signature:  # an image classifier
        meta.update(
            class_names=json.dumps(list(class_names or ())),
            preprocessing=PREPROCESSING,
            input_name=INPUT_NAME,
            input_shape=json.dumps(signature["input"]["shape"]),
            output_name=OUTPUT_NAME,
            output_shape=json.dumps(signature["output"]["shape"]),
            layout="NHWC",
        )
    else:
        meta.update(
            inputs=json.dumps(signature["inputs"]), outputs=json.dumps(signature["outputs"])
        )
    meta.update(
        keras_version=versions.get("keras", ""),
        tensorflow_version=versions.get("tensorflow", ""),
        tf2onnx_version=versions.get("tf2onnx", ""),
    )
    return meta


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

    Converted with tf2onnx from the same ``tf.function`` as the SavedModel
    (``tf2onnx.convert.from_keras`` does not take Keras 3 models), frozen first so
    that model state (variables and the tensors a layer such as ``Normalization``
    holds) are constants of the graph, never inputs. An image classifier has input
    ``images`` (float32, dynamic batch axis ``batch``) and output ``probabilities``;
    another model keeps its own input and output names (see
    :func:`~keras_ce_plugin.export.signature.serving_signature`). The model passes
    ``onnx.checker.check_model(full_check=True)`` and its ``metadata_props`` record
    ``keras_ce_plugin_version``, the ``kind``, ``class_names`` (JSON) and
    ``preprocessing`` (pixels / 255) of an image classifier, input/output names and
    shapes and the Keras/TensorFlow/tf2onnx versions.

    Args:
        model: A built float32 ``keras.Model``.
        path: The ``.onnx`` file to create.
        opset: ONNX opset (default: tf2onnx's default).
        overwrite: Replace an existing file.
        class_names: An image classifier's name per output (default: CIFAR-10's for
            10 outputs).

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
    names = None
    if signature["kind"] == IMAGE_CLASSIFIER:
        names = check_class_names(class_names, signature["output"]["shape"][-1])
    try:
        import onnx
    except ImportError as exc:
        raise missing_export_extra(exc) from None
    compute_dtype = getattr(getattr(model, "dtype_policy", None), "compute_dtype", "float32")
    if compute_dtype != "float32":
        raise ValueError(
            "ONNX export needs a float32 model (convert a mixed-precision model by "
            "rebuilding it under the float32 policy and copying the weights). Received: "
            f"compute dtype {compute_dtype!r}"
        )
    proto = _convert(model, signature, opset)
    graph = proto.graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    want_in = [spec["name"] for spec in signature["inputs"]]
    want_out = [spec["name"] for spec in signature["outputs"]]
    if inputs != want_in or outputs != want_out:  # never a graph input for model state
        raise KerasCEError(
            f"Unexpected ONNX graph: inputs {inputs}, outputs {outputs}; expected inputs "
            f"{want_in}, outputs {want_out}"
        )
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_param = "batch"
    set_metadata(proto, onnx_metadata(signature, names))
    proto.doc_string = f"Exported by keras_ce_plugin {__version__}: " + (
        f"{INPUT_NAME} (pixels / 255, NHWC) -> {OUTPUT_NAME}"
        if signature.get("kind") == IMAGE_CLASSIFIER
        else describe_signature(signature)
    )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:  # e.g. a TensorFlow op tf2onnx cannot convert
        raise KerasCEError(
            f"ONNX cannot express the model as converted by tf2onnx (opset={opset}): "
            f"{describe(exc, limit=200)}"
        ) from None
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
        make_readable(tmp)
    return path


@contextlib.contextmanager
def _quiet_converter_logs() -> Iterator[None]:
    """Hides the deprecation notes TensorFlow logs while freezing and tf2onnx's own
    log lines (an unsupported op is reported once, in the error)."""
    loggers = [logging.getLogger("tensorflow"), logging.getLogger("tf2onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _convert(model: Any, signature: dict, opset: int | None) -> Any:
    """The ONNX proto of the serving function, its model state frozen into constants.

    ``tf2onnx.convert.from_function`` makes every non-variable tensor the traced
    function captures (e.g. a ``Normalization`` layer's mean and variance) a graph
    *input*; here the concrete function is frozen first (variables and captured
    tensors become constants) and converted with only the signature's inputs.
    """
    try:
        import tensorflow as tf
        import tf2onnx
        from tf2onnx import tf_loader
        from tf2onnx.convert import tensor_names_from_structed
    except ImportError as exc:
        raise missing_export_extra(exc) from None
    _, concrete, specs = serving_function(model, signature)
    n_args = len(tf.nest.flatten(concrete.structured_input_signature))
    input_names = [t.name for t in concrete.inputs[:n_args]]
    output_names = [t.name for t in concrete.outputs]
    rename = tensor_names_from_structed(concrete, input_names, output_names)
    try:
        with _quiet_converter_logs(), tf.device("/cpu:0"):
            graph_def = tf_loader.from_function(concrete, input_names, output_names)
            proto, _ = tf2onnx.convert.from_graph_def(
                graph_def,
                name=model.name,
                input_names=input_names,
                output_names=output_names,
                opset=opset,
                tensors_to_rename=rename,
            )
    except Exception as exc:
        raise KerasCEError(
            f"tf2onnx could not convert the model to ONNX (opset={opset}): {describe(exc)}"
        ) from exc
    return proto


def opset_of(path: str | os.PathLike) -> dict[str, int]:
    """``{"opset": N, "ir_version": M}`` of the ONNX model at ``path``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": proto.ir_version,
    }

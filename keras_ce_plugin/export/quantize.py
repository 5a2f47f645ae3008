"""Static int8 quantization of an exported ONNX model, kept only if it pays off."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from keras_ce_plugin.export._common import make_readable, missing_export_extra, refuse_existing
from keras_ce_plugin.export.onnx import set_metadata
from keras_ce_plugin.export.signature import INPUT_NAME
from keras_ce_plugin.files import atomic_path

INT8_FILE = "model.int8.onnx"
#: The int8 model is kept only if it is at least this much faster than the float
#: ONNX model at batch :data:`INT8_BENCH_BATCH` ...
INT8_MIN_SPEEDUP = 2.0
#: ... and agrees with it on the top-1 class of at least this share of test images.
INT8_MIN_AGREEMENT = 0.99
INT8_CALIBRATION_IMAGES = 256
INT8_EVAL_IMAGES = 1000
INT8_BENCH_BATCH = 256
_CALIBRATION_BATCH = 32


def _throughput(fn, images: np.ndarray, repeats: int = 3) -> float:
    fn(images[:8])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - t0)
    return len(images) / float(np.median(times))


def _quantize(float_path: Path, out: Path, calibration_images: np.ndarray) -> str:
    """Writes the int8 model to ``out``; returns the method recorded in its metadata."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                [
                    {INPUT_NAME: calibration_images[i : i + _CALIBRATION_BATCH]}
                    for i in range(0, len(calibration_images), _CALIBRATION_BATCH)
                ]
            )

        def get_next(self):
            return next(self._batches, None)

    prepared = out.with_name("prepared.onnx")
    # ONNX Runtime's recommended pre-processing: shape inference + graph cleanup.
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(out),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    proto = onnx.load(str(out))
    metadata = {p.key: p.value for p in onnx.load(str(float_path)).metadata_props}
    metadata["quantization"] = (
        f"static int8 (QDQ, per-channel int8 weights, uint8 activations, MinMax "
        f"calibration on {len(calibration_images)} CIFAR-10 training images)"
    )
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return metadata["quantization"]


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
    ``eval_images`` and throughput at batch :data:`INT8_BENCH_BATCH` (median of 3,
    side by side). It is written to ``out_path`` only if it is at least
    ``min_speedup`` times faster and agrees on at least ``min_agreement`` of the images.

    Returns:
        The measurements: ``kept``, ``reason``, ``speedup``, ``agreement``,
        ``float_images_per_s``, ``int8_images_per_s``, ... (stored in the manifest).
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401

        from keras_ce_plugin.export._serve_onnx import OnnxPredictor
    except ImportError as exc:
        raise missing_export_extra(exc) from None

    float_path, out_path = Path(float_path), Path(out_path)
    refuse_existing(out_path, overwrite)
    calibration_images = np.ascontiguousarray(calibration_images, dtype=np.float32)
    eval_images = np.ascontiguousarray(eval_images, dtype=np.float32)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize.") as tmp:
        tmp_model = Path(tmp) / INT8_FILE
        method = _quantize(float_path, tmp_model, calibration_images)
        quantize_s = time.perf_counter() - t0

        float_model = OnnxPredictor(str(float_path))
        int8_model = OnnxPredictor(str(tmp_model))
        p_float = float_model(eval_images)
        p_int8 = int8_model(eval_images)
        agreement = float(np.mean(p_float.argmax(-1) == p_int8.argmax(-1)))
        bench = np.ascontiguousarray(
            np.resize(eval_images, (INT8_BENCH_BATCH, *eval_images.shape[1:]))
        )
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
                make_readable(target_tmp)
        return {
            "method": method,
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

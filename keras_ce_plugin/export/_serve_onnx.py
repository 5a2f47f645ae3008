"""Serve an exported ONNX model with ONNX Runtime alone: no TensorFlow, no Keras.

Self-contained (standard library, NumPy and ONNX Runtime only) so that
:mod:`keras_ce_plugin.export.verify` can run it as a script in a fresh process and check
that TensorFlow, Keras and keras_ce_plugin were never imported there (nothing is
blocked: the check is that nothing asked for them).

Worker usage (what ``keras-ce verify`` runs)::

    python _serve_onnx.py MODEL.onnx INPUTS.npz OUT.npz REPORT.json

>>> opts = session_options(threads=1)
>>> opts.intra_op_num_threads, opts.graph_optimization_level.name
(1, 'ORT_ENABLE_ALL')
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

# Run as a script, this file's directory would come first on sys.path, and it holds
# onnx.py (which would shadow the onnx package): drop it.
if (
    __name__ == "__main__"
    and sys.path
    and os.path.realpath(sys.path[0] or ".") == (os.path.dirname(os.path.realpath(__file__)))
):
    del sys.path[0]

OUTPUT_NAME = "probabilities"
FORBIDDEN = ("tensorflow", "keras", "tf_keras", "keras_ce_plugin")


def forbidden_modules(roots: Sequence[str] = FORBIDDEN) -> list[str]:
    """The modules under ``roots`` present in ``sys.modules`` (should be none)."""
    return sorted(m for m in sys.modules if m.split(".")[0] in roots)


def session_options(threads: int | None = None):
    """ONNX Runtime options used for serving: all graph optimisations (including the
    NCHWc convolution layout on x86), one inter-op thread, ``threads`` intra-op
    threads (default: the CPUs this process may use)."""
    import onnxruntime as ort

    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not on Linux
            threads = os.cpu_count() or 1
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


class OnnxPredictor:
    """An ONNX model as a NumPy function: ``run(feeds)`` for any inputs, and
    ``predictor(x)`` for a model with one input (``images``)."""

    def __init__(self, path: str, *, threads: int | None = None):
        import onnxruntime as ort

        self.path = str(path)
        self.session = ort.InferenceSession(
            self.path, session_options(threads), providers=["CPUExecutionProvider"]
        )
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.input_name = inputs[0].name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
        self.input_dtype = inputs[0].type  # e.g. "tensor(float)"
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        names = self.output_names
        self.output_name = OUTPUT_NAME if OUTPUT_NAME in names else names[0]
        out = outputs[names.index(self.output_name)]
        self.output_shape = tuple(d if isinstance(d, int) else None for d in out.shape)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, feeds, batch_size: int = 256):
        """``{output name: array}`` for ``feeds`` (``{input name: array}``), in batches."""
        import numpy as np

        n = len(next(iter(feeds.values())))
        parts: dict = {name: [] for name in self.output_names}
        for start in range(0, n, batch_size):
            batch = {k: v[start : start + batch_size] for k, v in feeds.items()}
            for name, value in zip(self.output_names, self.session.run(None, batch)):
                parts[name].append(value)
        return {name: np.concatenate(values, axis=0) for name, values in parts.items()}

    def __call__(self, images, batch_size: int = 256):
        if len(self.input_names) != 1:
            raise ValueError(
                f"{self.path} must have exactly one input. Received inputs: {self.input_names}"
            )
        return self.run({self.input_name: images}, batch_size)[self.output_name]


def main(argv: Sequence[str] | None = None) -> int:
    """Worker: predicts ``INPUTS.npz`` (arrays by input name) with the ONNX model; writes
    ``OUT.npz`` (arrays by output name) and a report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    artifact, inputs_path, out_path, report_path = argv
    import numpy as np
    import onnxruntime as ort

    t0 = time.perf_counter()
    predictor = OnnxPredictor(artifact)
    load_s = time.perf_counter() - t0
    with np.load(inputs_path, allow_pickle=False) as data:
        feeds = {name: data[name] for name in predictor.input_names}
    t0 = time.perf_counter()
    outputs = predictor.run(feeds)
    predict_s = time.perf_counter() - t0
    with open(out_path, "wb") as f:
        np.savez(f, **outputs)
    present = forbidden_modules()
    with open(report_path, "w") as f:
        json.dump(
            {
                "runtime": f"onnxruntime {ort.__version__}",
                "load_s": load_s,
                "predict_s": predict_s,
                "input_names": predictor.input_names,
                "forbidden_modules_present": present,
            },
            f,
        )
    if present:
        print(f"modules that must not be imported were: {present}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serve an exported SavedModel with TensorFlow alone: no Keras, no keras_ce_plugin.

This file is deliberately self-contained (standard library, NumPy and TensorFlow
only) so that :mod:`keras_ce_plugin.export.verify` can run it as a script in a fresh
process and prove that an export serves without the package that made it.
``import tensorflow`` itself eagerly imports ``keras.src.optimizers`` whenever
Keras is installed (``tensorflow/__init__.py``), so :func:`block_imports` first
makes ``keras``, ``tf_keras`` and ``keras_ce_plugin`` unimportable -- the process
then behaves like a TensorFlow Serving host without them -- and the worker checks
at the end that none of them is in ``sys.modules``.

Worker usage (what ``keras-ce verify`` runs)::

    python _serve_savedmodel.py SAVED_MODEL_DIR INPUTS.npz OUT.npz REPORT.json

>>> finder = block_imports(("not_a_real_module_xyz",))
>>> try:
...     import not_a_real_module_xyz
... except ImportError as exc:
...     print(exc)
not_a_real_module_xyz is blocked in this process (serving without it)
>>> finder.attempts
['not_a_real_module_xyz']
>>> unblock(finder)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
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

SIGNATURE_KEY = "serving_default"
OUTPUT_NAME = "probabilities"
FORBIDDEN = ("keras", "tf_keras", "keras_ce_plugin")


class _RefusingLoader(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"{spec.name} is blocked in this process (serving without it)")

    def exec_module(self, module):  # pragma: no cover - create_module always raises
        raise ImportError(f"{module.__name__} is blocked")


class _BlockingFinder(importlib.abc.MetaPathFinder):
    """Answers every import of the blocked top-level packages with an ImportError."""

    def __init__(self, roots: Sequence[str]):
        self.roots = tuple(roots)
        self.attempts: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            self.attempts.append(fullname)
            # A spec without origin: importlib.util.find_spec() reports "not found"
            # (TensorFlow probes for Keras that way) and a real import raises.
            return importlib.machinery.ModuleSpec(fullname, _RefusingLoader())
        return None


def block_imports(roots: Sequence[str] = FORBIDDEN) -> _BlockingFinder:
    """Makes the top-level packages ``roots`` unimportable in this process."""
    finder = _BlockingFinder(roots)
    sys.meta_path.insert(0, finder)
    return finder


def unblock(finder: _BlockingFinder) -> None:
    """Undoes :func:`block_imports`."""
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)


def forbidden_modules(roots: Sequence[str] = FORBIDDEN) -> list[str]:
    """The modules under ``roots`` present in ``sys.modules`` (should be none)."""
    return sorted(m for m in sys.modules if m.split(".")[0] in roots)


class SavedModelPredictor:
    """The ``serving_default`` signature of a SavedModel as a NumPy function:
    ``run(feeds)`` for any inputs, ``predictor(x)`` for one input (``images``)."""

    def __init__(self, path: str):
        import tensorflow as tf

        self._tf = tf
        self.path = str(path)
        loaded = tf.saved_model.load(self.path)
        signatures = getattr(loaded, "signatures", {})
        if SIGNATURE_KEY not in signatures:
            raise ValueError(
                f"{self.path} has no {SIGNATURE_KEY!r} signature. Received signatures: "
                f"{sorted(signatures)}"
            )
        self._loaded = loaded  # keeps the variables alive
        self.fn = signatures[SIGNATURE_KEY]
        _, kwargs = self.fn.structured_input_signature
        self.input_names = list(kwargs)
        spec = kwargs[self.input_names[0]]
        self.input_name = self.input_names[0]
        self.input_shape = tuple(spec.shape.as_list())
        self.input_dtype = spec.dtype.name
        outputs = self.fn.structured_outputs
        self.output_names = list(outputs)
        self.output_name = OUTPUT_NAME if OUTPUT_NAME in outputs else self.output_names[0]
        self.output_shape = tuple(outputs[self.output_name].shape.as_list())

    def run(self, feeds, batch_size: int = 256):
        """``{output name: array}`` for ``feeds`` (``{input name: array}``), in batches."""
        import numpy as np

        n = len(next(iter(feeds.values())))
        parts: dict = {name: [] for name in self.output_names}
        for start in range(0, n, batch_size):
            batch = {k: self._tf.constant(v[start : start + batch_size]) for k, v in feeds.items()}
            result = self.fn(**batch)
            for name in self.output_names:
                parts[name].append(result[name].numpy())
        return {name: np.concatenate(values, axis=0) for name, values in parts.items()}

    def __call__(self, images, batch_size: int = 256):
        if len(self.input_names) != 1:
            raise ValueError(
                f"The {SIGNATURE_KEY!r} signature of {self.path} must take one input. "
                f"Received inputs: {self.input_names}"
            )
        return self.run({self.input_name: images}, batch_size)[self.output_name]


def main(argv: Sequence[str] | None = None) -> int:
    """Worker: predicts ``INPUTS.npz`` (arrays by input name) with the SavedModel; writes
    ``OUT.npz`` (arrays by output name) and a report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    artifact, inputs_path, out_path, report_path = argv
    finder = block_imports()
    import numpy as np
    import tensorflow  # noqa: F401  (imported before the clock starts, as in the others)

    t0 = time.perf_counter()
    predictor = SavedModelPredictor(artifact)
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
                "runtime": f"tensorflow {predictor._tf.__version__}",
                "load_s": load_s,
                "predict_s": predict_s,
                "forbidden_modules_present": present,
                "blocked_import_attempts": sorted(set(finder.attempts)),
            },
            f,
        )
    if present:
        print(f"modules that must not be imported were: {present}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

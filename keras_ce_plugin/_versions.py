"""The one report of the software versions behind a run or an export.

Distribution versions come from the installed metadata, so reporting them
imports nothing heavy (TensorFlow is named only where it is installed).

>>> report = versions()
>>> sorted(k for k in ("keras", "keras_ce_plugin", "numpy", "python") if k in report)
['keras', 'keras_ce_plugin', 'numpy', 'python']
"""

from __future__ import annotations

import importlib.metadata
import platform

_DISTRIBUTIONS = (
    "keras",
    "numpy",
    "tensorflow",
    "jax",
    "torch",
    "tf2onnx",
    "onnx",
    "onnxruntime",
)


def versions() -> dict[str, str]:
    """Versions of the plugin, Keras, its backend and the installed optional packages."""
    import keras

    from keras_ce_plugin._version import __version__

    out = {
        "keras_ce_plugin": __version__,
        "keras_backend": keras.backend.backend(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out

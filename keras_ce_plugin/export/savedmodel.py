"""Export to a TensorFlow SavedModel with the serving signature."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from keras_ce_plugin.export._common import (
    make_readable,
    refuse_existing,
    require_tensorflow_backend,
)
from keras_ce_plugin.export.signature import SIGNATURE_KEY, serving_function, serving_signature
from keras_ce_plugin.files import atomic_dir


def export_savedmodel(model: Any, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes ``model`` as a TensorFlow SavedModel for serving.

    The ``serving_default`` signature takes ``images: float32[None, H, W, C]`` and
    returns ``probabilities: float32[None, num_classes]`` (the model called with
    ``training=False``). It loads with ``tf.saved_model.load`` without Keras or this
    package, and serves with TensorFlow Serving's REST API
    (``{"instances": [...]}`` or ``{"inputs": {"images": [...]}}``).

    Only the variables the signature reads are saved, once each.

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
    refuse_existing(out_dir, overwrite)
    require_tensorflow_backend("SavedModel export")
    signature = serving_signature(model)
    serve, concrete, _ = serving_function(model, signature)
    module = tf.Module()
    module.serve = serve
    # Track exactly the variables the signature captures (public ConcreteFunction API).
    module.serving_variables = list(concrete.variables)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE_KEY: concrete})
        make_readable(tmp)
    return out_dir

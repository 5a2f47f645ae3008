"""The feature cache: the frozen base's output for every image, computed once.

The VGG16 base is frozen and there is no augmentation, so its output for an image
never changes; :func:`~keras_ce_plugin.training.train` computes it once with
:func:`extract_features` and fits the head alone on it.
"""

from __future__ import annotations

import sys
import time

import keras
import numpy as np


def extract_features(
    base: keras.Model,
    images: np.ndarray,
    *,
    batch_size: int = 128,
    verbose: bool = True,
    desc: str = "VGG16 features",
    pad_last: bool = True,
) -> np.ndarray:
    """``base`` applied to ``images`` in inference mode, batch by batch.

    ``pad_last`` pads a last, partial batch to ``batch_size`` (one traced shape);
    without it the last batch keeps its size, as in ``fit``'s batches, so that the
    same batch shapes go through the same kernels.

    With ``verbose``, progress goes to stderr: a progress bar on a terminal, one
    line when done otherwise (a log file gets no carriage returns).

    >>> import numpy as np, keras
    >>> base = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten()])
    >>> extract_features(base, np.ones((5, 2, 2, 1), "float32"), batch_size=2, verbose=False).shape
    (5, 4)
    """
    from tqdm.auto import tqdm

    bar_on_terminal = verbose and sys.stderr.isatty()
    start = time.perf_counter()
    out: list[np.ndarray] = []
    with tqdm(
        total=len(images), desc=desc, unit="img", disable=not bar_on_terminal, file=sys.stderr
    ) as bar:
        for first in range(0, len(images), batch_size):
            batch = images[first : first + batch_size]
            n = len(batch)
            if pad_last and n < batch_size and first:  # VGG16 sees each image alone
                pad = np.zeros((batch_size - n, *batch.shape[1:]), dtype=batch.dtype)
                batch = np.concatenate([batch, pad])
            out.append(keras.ops.convert_to_numpy(base.predict_on_batch(batch))[:n])
            bar.update(n)
    if verbose and not bar_on_terminal:
        seconds = time.perf_counter() - start
        print(f"{desc}: {len(images)} images, {seconds:.1f} s", file=sys.stderr, flush=True)
    if not out:
        return np.zeros((0, *base.output.shape[1:]), dtype="float32")
    return np.concatenate(out)

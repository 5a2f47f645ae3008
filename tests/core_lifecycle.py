"""The Keras-only lifecycle of the losses, run as a script in a fresh process.

``tests/test_core_install.py`` runs it with ``KERAS_BACKEND=jax`` and ``import
tensorflow`` made to fail; ``.ci/run`` runs it again in a virtual environment
where ``pip install .[jax]`` installed no TensorFlow at all.

Usage: python core_lifecycle.py WORK_DIR
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

BLOCK_TENSORFLOW = """
import importlib.abc, sys
class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoTensorFlow())
"""

RELOAD = """
import sys
import numpy as np, keras
import keras_ce_plugin  # noqa: F401
data = np.load(sys.argv[1])
model = keras.models.load_model(sys.argv[2])
assert model.loss == "customloss>CategoricalCE", model.loss
loss = model.evaluate(data["x"], data["y"], verbose=0, return_dict=True)["loss"]
model.fit(data["x"], data["y"], epochs=1, verbose=0)
assert "tensorflow" not in sys.modules
print("RELOADED", repr(loss))
"""


def main(work: Path) -> None:
    import keras

    import keras_ce_plugin  # noqa: F401

    assert keras.backend.backend() == "jax", keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = np.eye(4, dtype="float32")[rng.integers(0, 4, size=64)]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="customloss>CategoricalCE", metrics=["accuracy"])
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0).history
    assert history["loss"][-1] < history["loss"][0], history
    loss = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    # The same value from a float64 NumPy reference of -sum(y log p).
    p = np.asarray(model.predict(x, verbose=0), dtype="float64")
    reference = float(np.mean(-np.sum(y * np.log(np.clip(p, 1e-7, 1.0)), axis=-1)))
    assert abs(loss - reference) <= 1e-5 * max(1.0, reference), (loss, reference)
    path = work / "model.keras"
    model.save(path)
    np.savez(work / "data.npz", x=x, y=y)
    prelude = BLOCK_TENSORFLOW if "--block-tensorflow" in sys.argv else ""
    proc = subprocess.run(
        [sys.executable, "-c", prelude + RELOAD, str(work / "data.npz"), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reloaded = float(proc.stdout.split("RELOADED")[-1])
    assert abs(reloaded - loss) <= 1e-6 * max(1.0, loss), (reloaded, loss)
    assert "tensorflow" not in sys.modules
    print(f"OK jax lifecycle: loss {loss:.6f}, reloaded in a fresh process {reloaded:.6f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

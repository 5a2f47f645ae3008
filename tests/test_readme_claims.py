"""Each behaviour the README claims, checked as the README states it.

The README's "Claims and their tests" table points here (or to the test that
proves a claim elsewhere).
"""

from __future__ import annotations

import textwrap

from conftest import REPO, run_python

SAVE_STRING_COMPILED = """
import numpy as np, keras
import keras_ce_plugin  # noqa: F401
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
model.compile(optimizer="adam", loss="customloss>CategoricalCE")
x = np.random.rand(8, 4).astype("float32")
y = np.eye(3, dtype="float32")[np.arange(8) % 3]
model.fit(x, y, epochs=1, verbose=0)
model.save({path!r})
np.savez({data!r}, x=x, y=y)
"""


def test_without_the_plugin_a_string_compiled_model_loads_and_fails_at_first_use(tmp_path):
    """README, Usage: without ``import keras_ce_plugin`` a ``compile=True`` load succeeds,
    and the first ``evaluate``/``fit`` fails with Keras' *Could not interpret loss
    identifier*; ``compile=False`` gives a model for inference."""
    path, data = str(tmp_path / "m.keras"), str(tmp_path / "d.npz")
    run_python(SAVE_STRING_COMPILED.format(path=path, data=data), cwd=REPO)
    code = textwrap.dedent(
        f"""
        import sys, numpy as np, keras
        d = np.load({data!r})
        model = keras.models.load_model({path!r})  # compile=True: loads
        print("LOADED")
        assert "keras_ce_plugin" not in sys.modules
        try:
            model.evaluate(d["x"], d["y"], verbose=0)
        except ValueError as exc:
            print("EVALUATE", " ".join(str(exc).split()))
        inference = keras.models.load_model({path!r}, compile=False)
        print("PREDICT", inference.predict(d["x"], verbose=0).shape)
        """
    )
    out = run_python(code, cwd=str(tmp_path)).stdout
    assert "LOADED" in out, out
    evaluate = next(line for line in out.splitlines() if line.startswith("EVALUATE"))
    assert "Could not interpret loss identifier" in evaluate, evaluate
    assert "customloss>CategoricalCE" in evaluate, evaluate
    assert "PREDICT (8, 3)" in out, out

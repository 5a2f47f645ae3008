"""A ``.keras`` file trained on TensorFlow loads on the JAX and PyTorch backends.

Each backend runs in a fresh process (``KERAS_BACKEND`` is read once, at import):
TensorFlow trains and saves a model compiled with ``"customloss>CategoricalCE"``;
JAX/PyTorch load it under ``safe_mode=True``, evaluate it to the same loss (<= 1e-4),
continue training and save; TensorFlow loads that file back and reproduces the
other backend's predictions. A backend that is not installed is skipped with the
extra to install (``pip install -e ".[jax]"`` / ``".[torch]"``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap

import pytest
from conftest import REPO, run_python

TRAIN_TF = textwrap.dedent(
    """
    import json, sys
    import numpy as np, keras
    import keras_ce_plugin  # noqa: F401
    assert keras.backend.backend() == "tensorflow", keras.backend.backend()
    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, size=96)]
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(12, activation="relu"),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="customloss>CategoricalCE",
                  metrics=["accuracy", "customloss>categorical_ce"])
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    model.save(out + "/tf.keras")
    loss = model.evaluate(x, y, batch_size=96, verbose=0, return_dict=True)["loss"]
    np.savez(out + "/data.npz", x=x, y=y, pred=model.predict(x, verbose=0))
    with open(out + "/tf.json", "w") as f:
        json.dump({"loss": float(loss)}, f)
    """
)

CONTINUE = textwrap.dedent(
    """
    import json, sys
    import numpy as np, keras
    import keras_ce_plugin  # noqa: F401
    backend, out = sys.argv[1], sys.argv[2]
    assert keras.backend.backend() == backend, keras.backend.backend()
    data = np.load(out + "/data.npz")
    x, y = data["x"], data["y"]
    model = keras.models.load_model(out + "/tf.keras")  # safe_mode=True by default
    assert model.loss == "customloss>CategoricalCE", model.loss  # the string name survives
    res = model.evaluate(x, y, batch_size=96, verbose=0, return_dict=True)
    pred = model.predict(x, verbose=0)
    keras.utils.set_random_seed(1)
    hist = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    result = {"loss": float(res["loss"]), "metric": float(next(v for k, v in res.items() if "categorical_ce" in k)),
              "pred_err": float(np.max(np.abs(pred - data["pred"]))), "hist": hist,
              "save_error": None}
    try:
        model.save(out + f"/{backend}.keras")
        np.save(out + f"/{backend}_pred_after.npy", model.predict(x, verbose=0))
    except Exception as exc:  # reported by the re-save test, not here
        result["save_error"] = f"{type(exc).__name__}: {exc}"
    with open(out + f"/{backend}.json", "w") as f:
        json.dump(result, f)
    """
)

RELOAD_TF = textwrap.dedent(
    """
    import sys
    import numpy as np, keras
    import keras_ce_plugin  # noqa: F401
    backend, out = sys.argv[1], sys.argv[2]
    assert keras.backend.backend() == "tensorflow"
    model = keras.models.load_model(out + f"/{backend}.keras")
    x = np.load(out + "/data.npz")["x"]
    err = np.max(np.abs(model.predict(x, verbose=0) - np.load(out + f"/{backend}_pred_after.npy")))
    print("RESULT", float(err))
    """
)


def _python_with_args(text: str, *args: str) -> str:
    return f"import sys; sys.argv = ['x', *{list(args)!r}]\n" + text


@pytest.fixture(scope="module")
def tf_trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("backends")
    code = _python_with_args(TRAIN_TF, str(out))
    run_python(code, cwd=REPO, env={"KERAS_BACKEND": "tensorflow"}, timeout=300)
    return out


BACKENDS = [pytest.param("jax", id="jax"), pytest.param("torch", id="torch")]


@pytest.fixture(scope="module")
def continued(tf_trained):
    """Runs the load/evaluate/train/save script once per backend; returns its results."""
    cache: dict[str, dict] = {}

    def run(backend: str) -> dict:
        if importlib.util.find_spec(backend) is None:
            # .ci/run installs both backends: in CI a missing one is a failure.
            (pytest.fail if os.environ.get("CI") else pytest.skip)(
                f"{backend} is not installed, so the {backend} backend cannot be tested here; "
                f'install it with pip install -e ".[{backend}]"'
            )
        if backend not in cache:
            run_python(
                _python_with_args(CONTINUE, backend, str(tf_trained)),
                cwd=REPO,
                env={"KERAS_BACKEND": backend},
                timeout=300,
            )
            cache[backend] = json.loads((tf_trained / f"{backend}.json").read_text())
        return cache[backend]

    return run


@pytest.mark.parametrize("backend", BACKENDS)
def test_tf_trained_file_loads_evaluates_and_trains_on(backend, continued, tf_trained):
    got = continued(backend)
    ref = json.loads((tf_trained / "tf.json").read_text())
    assert abs(got["loss"] - ref["loss"]) <= 1e-4, (got["loss"], ref["loss"])
    assert abs(got["metric"] - ref["loss"]) <= 1e-4, (got["metric"], ref["loss"])
    assert got["pred_err"] <= 1e-5, got["pred_err"]
    hist = got["hist"]
    assert all(h == h and abs(h) < 1e6 for h in hist), hist  # finite
    assert hist[-1] < ref["loss"], (hist, ref["loss"])  # it kept learning from where TF stopped


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_saved_on_other_backend_loads_on_tensorflow(backend, continued, tf_trained):
    got = continued(backend)
    assert got["save_error"] is None, got["save_error"]
    proc = run_python(
        _python_with_args(RELOAD_TF, backend, str(tf_trained)),
        cwd=REPO,
        env={"KERAS_BACKEND": "tensorflow"},
        timeout=300,
    )
    err = float(proc.stdout.split("RESULT")[-1])
    assert err <= 1e-5, err

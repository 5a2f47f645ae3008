"""String-name resolution over the Keras versions we support (``keras>=3.3``).

``keras_ce_plugin.naming`` is the one module that relies on Keras internals, so it is
exercised on the oldest supported Keras, a middle one and the installed one: each in a
fresh process, compile by string name -> fit -> save -> load -> evaluate. The older
versions are installed (no dependencies, they share this environment's) by ``.ci/run``
into ``$KERAS_CE_KERAS_VERSIONS_DIR/VERSION``; outside CI the test installs them into
a cache folder itself. In CI a missing version fails the test (never a skip), so the
oldest supported Keras is tested on every CI run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, run_python

VERSIONS = ["3.3.3", "3.8.0", None]  # None: the installed Keras.

SCRIPT = """
import json, sys, tempfile, numpy as np, keras
import keras_ce_plugin
from keras_ce_plugin import naming
keras.utils.set_random_seed(0)
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
m.compile(optimizer="adam", loss="customloss>CategoricalCE",
          metrics=["accuracy", "customloss>categorical_ce"])
x = np.random.rand(64, 4).astype("float32")
y = keras.utils.to_categorical(np.random.randint(0, 3, 64), 3)
m.fit(x, y, epochs=1, verbose=0)
path = tempfile.mkdtemp() + "/m.keras"
m.save(path)
r = keras.models.load_model(path, safe_mode=True)
a, b = m.evaluate(x, y, verbose=0)[0], r.evaluate(x, y, verbose=0)[0]
assert abs(a - b) < 1e-6, (a, b)
try:
    keras.losses.get("customloss>Nope")
except ValueError as e:
    assert "customloss>CategoricalCE" in str(e)
else:
    raise AssertionError("unknown name accepted")
assert keras.losses.get("categorical_crossentropy") is not None
print(json.dumps({"keras": keras.__version__, "loss": float(b)}))
"""


def _keras_dir(version: str) -> Path:
    prepared = os.environ.get("KERAS_CE_KERAS_VERSIONS_DIR")
    if prepared:
        target = Path(prepared) / version
        assert (target / "keras").is_dir(), f"{target}: .ci/run did not install keras=={version}"
        return target
    cache = (
        Path(os.environ.get("KERAS_CE_TEST_CACHE", tempfile.gettempdir())) / "keras-ce-test-keras"
    )
    target = cache / version
    if not (target / "keras").is_dir():
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(target),
                f"keras=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            message = f"keras=={version} not installable here: {proc.stderr[-300:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return target


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v or "installed")
def test_string_names_work_across_keras_versions(version):
    path = [str(REPO)]
    if version is not None:
        path.insert(0, str(_keras_dir(version)))
    proc = run_python(SCRIPT, env={"PYTHONPATH": os.pathsep.join(path)}, cwd=REPO)
    if version is not None:
        assert f'"keras": "{version}"' in proc.stdout, proc.stdout

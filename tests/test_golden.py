"""Files from earlier versions: golden ``.keras`` files still load and give the same numbers.

``tests/fixtures/golden/v<plugin>-keras<keras>/`` holds tiny models written by
``tests/fixtures/make_golden.py`` with a released plugin version (and the oldest
Keras 3 we support), compiled with each loss by string name and with a non-default
loss instance, plus their inputs, predictions and evaluated losses. Each folder is
loaded in a fresh process (under whatever ``KERAS_BACKEND`` the suite runs with) and
must reproduce the stored predictions and losses. The saved-name format has changed
under users before (keras-team/keras#20806); this is what catches it.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_python

import keras_ce_plugin
from keras_ce_plugin.files import sha256_file

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
FOLDERS = sorted(p.parent for p in GOLDEN.glob("*/golden.json"))
CASES = [
    (folder.name, case)
    for folder in FOLDERS
    for case in json.loads((folder / "golden.json").read_text())["cases"]
]

LOAD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, keras
    import keras_ce_plugin  # noqa: F401
    folder = Path(sys.argv[1])
    meta = json.loads((folder / "golden.json").read_text())
    data = np.load(folder / "golden.npz")
    x = data["x"]
    out = {"keras": keras.__version__, "backend": keras.backend.backend(), "cases": {}}
    tmp = Path(sys.argv[2])
    for name in meta["cases"]:
        model = keras.models.load_model(folder / f"{name}.keras")  # safe_mode=True
        loss = model.loss
        config = None if isinstance(loss, str) or isinstance(loss, type) else loss.get_config()
        y = data[f"y_{name}"]
        pred = model.predict(x, batch_size=len(x), verbose=0)
        res = out["cases"][name] = {
            "pred": pred.tolist(),
            "metrics": model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True),
            "loss_string": loss if isinstance(loss, str) else None,
            "loss_class": type(keras_ce_plugin.get(loss)).__name__
            if isinstance(loss, str)
            else getattr(loss, "__name__", type(loss).__name__),
            "loss_config": config,
            "resave_error": None,
        }
        try:  # an old file, loaded by this version, saved again and reloaded
            model.save(tmp / f"{name}.keras")
            again = keras.models.load_model(tmp / f"{name}.keras")
            res["resave_pred_err"] = float(np.max(np.abs(again.predict(x, verbose=0) - pred)))
            res["resave_loss"] = again.evaluate(x, y, batch_size=len(x), verbose=0)
            if isinstance(res["resave_loss"], list):
                res["resave_loss"] = res["resave_loss"][0]
        except Exception as exc:
            res["resave_error"] = f"{type(exc).__name__}: {exc}"
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    """Loads every golden folder once, each in its own fresh process."""
    cache: dict[str, dict] = {}

    def get(folder_name: str) -> dict:
        if folder_name not in cache:
            tmp = tmp_path_factory.mktemp("resave")
            args = [str(GOLDEN / folder_name), str(tmp)]
            code = f"import sys; sys.argv = ['x', *{args!r}]\n" + LOAD
            proc = run_python(code, cwd=REPO, timeout=300)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            cache[folder_name] = json.loads(line[len("RESULT ") :])
        return cache[folder_name]

    return get


def test_golden_files_exist_for_this_version():
    versions = {json.loads((f / "golden.json").read_text())["plugin_version"] for f in FOLDERS}
    assert keras_ce_plugin.__version__ in versions, (
        f"no golden files for keras_ce_plugin {keras_ce_plugin.__version__}: run "
        "`python tests/fixtures/make_golden.py` and commit tests/fixtures/golden/"
    )
    assert len(CASES) >= 4


@pytest.mark.parametrize("folder", [f.name for f in FOLDERS])
def test_golden_files_are_unchanged(folder):
    meta = json.loads((GOLDEN / folder / "golden.json").read_text())
    assert folder == f"v{meta['plugin_version']}-keras{meta['keras_version']}"
    for name, digest in meta["sha256"].items():
        assert sha256_file(GOLDEN / folder / name) == digest, f"{folder}/{name} was modified"


@pytest.mark.parametrize("folder, case", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_golden_file_reproduces_predictions_and_loss(loaded, folder, case):
    meta = json.loads((GOLDEN / folder / "golden.json").read_text())["cases"][case]
    stored = np.load(GOLDEN / folder / "golden.npz")[f"pred_{case}"]
    got = loaded(folder)["cases"][case]
    np.testing.assert_allclose(np.array(got["pred"]), stored, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["metrics"]["loss"], meta["metrics"]["loss"], rtol=1e-5)
    for key, value in meta["metrics"].items():  # metric names may differ across Keras versions
        if key in got["metrics"]:
            np.testing.assert_allclose(got["metrics"][key], value, rtol=1e-5, err_msg=key)
    if meta["compiled_loss"] is not None:  # the string name resolves to the same loss class
        assert got["loss_class"] == meta["compiled_loss"].split(">")[1]
        assert got["loss_string"] in (None, meta["compiled_loss"])
    else:  # the non-default loss instance comes back with every argument
        assert got["loss_config"] == meta["loss_config"]


@pytest.mark.parametrize("folder, case", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_golden_file_loads_and_saves_again(loaded, folder, case):
    """An old file, loaded by this version, saves again and reloads to the same numbers."""
    meta = json.loads((GOLDEN / folder / "golden.json").read_text())["cases"][case]
    got = loaded(folder)["cases"][case]
    assert got["resave_error"] is None, got["resave_error"]
    assert got["resave_pred_err"] <= 1e-6
    np.testing.assert_allclose(got["resave_loss"], meta["metrics"]["loss"], rtol=1e-5)

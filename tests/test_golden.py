"""Files from earlier versions: golden ``.keras`` files still load and give the same numbers.

``tests/fixtures/golden/v<plugin>-keras<keras>/`` holds tiny models written by
``tests/fixtures/make_golden.py`` with a released plugin version (and the oldest
Keras 3 we support), compiled with each loss by string name and with a non-default
loss instance, plus their inputs, predictions and evaluated losses. Each folder is
loaded in a fresh process (under whatever ``KERAS_BACKEND`` the suite runs with). The
saved-name format has changed under users before (keras-team/keras#20806); this is
what catches it.

The stored numbers were produced by the code under test, so they are a record, not
an oracle: every numeric expectation here comes from a float64 NumPy reference
computed from the stored inputs and the weights inside each ``.keras`` file (read
with h5py, not Keras), and the stored record is itself checked against it. Where
Keras publishes numbers for the same losses (its docstring examples), the plugin
must match those too.
"""

from __future__ import annotations

import io
import json
import textwrap
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, run_python

import keras_ce_plugin
from keras_ce_plugin import (
    BinaryCE,
    CategoricalCE,
    SparseCategoricalCE,
    binary_ce,
    categorical_ce,
    sparse_categorical_ce,
)
from keras_ce_plugin.files import sha256_file

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
FOLDERS = sorted(p.parent for p in GOLDEN.glob("*/golden.json"))
CASES = [
    (folder.name, case)
    for folder in FOLDERS
    for case in json.loads((folder / "golden.json").read_text())["cases"]
]
CASE_IDS = [f"{f}-{c}" for f, c in CASES]
EPS = 1e-7  # keras.config.epsilon()

# Tolerances, float32 results against the float64 reference:
# predictions: a float32 forward pass through a 4-5-3 MLP (a few ulp of values ~1).
PRED_RTOL, PRED_ATOL = 1e-5, 1e-6
# losses: float32 log/softmax and a sum over 12 samples (~1e-7 relative each).
LOSS_RTOL = 1e-5


# --------------------------------------------------------------------------- #
# float64 NumPy reference
# --------------------------------------------------------------------------- #
def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def ref_cce(y, out, *, from_logits=False, label_smoothing=0.0, class_weights=None):
    """Per sample: -sum_c w_c y_c log q_c, q = softmax(out) or clip(out / sum(out))."""
    y, out = np.asarray(y, np.float64), np.asarray(out, np.float64)
    if label_smoothing:
        y = y * (1.0 - label_smoothing) + label_smoothing / y.shape[-1]
    if class_weights is not None:
        y = y * np.asarray(class_weights, np.float64)
    if from_logits:
        log_q = _log_softmax(out)
    else:
        q = out / np.maximum(out.sum(-1, keepdims=True), EPS)
        log_q = np.log(np.clip(q, EPS, 1.0 - EPS))
    return -(y * log_q).sum(-1)


def ref_scce(labels, out, *, from_logits=False):
    labels = np.asarray(labels).astype(int)
    return ref_cce(np.eye(np.shape(out)[-1])[labels], out, from_logits=from_logits)


def ref_bce(y, out, *, from_logits=False):
    """Per sample: mean over the last axis of -(y log p + (1 - y) log(1 - p))."""
    y, out = np.asarray(y, np.float64), np.asarray(out, np.float64)
    if from_logits:
        per = np.logaddexp(0.0, out) - out * y  # softplus(x) - x y
    else:
        p = np.clip(out, EPS, 1.0 - EPS)
        per = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    return per.mean(-1)


def ref_reduce(per_sample, reduction="sum_over_batch_size", sample_weight=None):
    values = np.asarray(per_sample, np.float64)
    if sample_weight is not None:
        values = values * np.asarray(sample_weight, np.float64)
    if reduction is None:
        return values
    return values.sum() if reduction == "sum" else values.sum() / values.size


def ref_forward(path: Path, x: np.ndarray) -> np.ndarray:
    """The model's output in float64, from the weights stored in the .keras file."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        weights = archive.read("model.weights.h5")
    layers = [layer for layer in config["config"]["layers"] if layer["class_name"] != "InputLayer"]
    assert [layer["class_name"] for layer in layers] == ["Dense", "Dense"], path
    with h5py.File(io.BytesIO(weights), "r") as h5:
        names = sorted(h5["layers"], key=lambda n: int(n.rsplit("_", 1)[1]) if "_" in n else 0)
        params = [
            [np.asarray(h5["layers"][n]["vars"][str(i)], np.float64) for i in range(2)]
            for n in names
        ]
    assert len(params) == len(layers), path
    h = np.asarray(x, np.float64)
    for layer, (kernel, bias) in zip(layers, params):
        h = h @ kernel + bias
        activation = layer["config"]["activation"]
        if activation == "relu":
            h = np.maximum(h, 0.0)
        elif activation == "softmax":
            h = np.exp(_log_softmax(h))
        elif activation == "sigmoid":
            h = 1.0 / (1.0 + np.exp(-h))
        else:
            assert activation == "linear", (path, activation)
    return h


# Per-sample reference of each registered name, with its default arguments.
REF_FUNCTIONS = {
    "CategoricalCE": ref_cce,
    "categorical_ce": ref_cce,
    "SparseCategoricalCE": ref_scce,
    "sparse_categorical_ce": ref_scce,
    "BinaryCE": ref_bce,
}


def reference(folder: str, case: str) -> tuple[np.ndarray, dict[str, float]]:
    """(predictions, {metric name: value}) of a golden case, in float64."""
    meta = json.loads((GOLDEN / folder / "golden.json").read_text())["cases"][case]
    data = np.load(GOLDEN / folder / "golden.npz")
    x, y = data["x"], data[f"y_{case}"]
    pred = ref_forward(GOLDEN / folder / f"{case}.keras", x)
    metrics: dict[str, float] = {}
    if meta["compiled_loss"] is not None:
        loss_fn = REF_FUNCTIONS[meta["compiled_loss"].split(">")[1]]
        metrics["loss"] = float(ref_reduce(loss_fn(y, pred)))
    else:  # only CategoricalCE instances are stored; their config gives the arguments
        config = meta["loss_config"]
        assert config["axis"] == -1 and config["dtype"] is None, config
        per = ref_cce(
            y,
            pred,
            from_logits=config["from_logits"],
            label_smoothing=config["label_smoothing"],
            class_weights=config["class_weights"],
        )
        metrics["loss"] = float(ref_reduce(per, config["reduction"]))
    for name in meta["metrics"]:  # metrics by registered name: the mean over the samples
        if name != "loss":
            metrics[name] = float(ref_reduce(REF_FUNCTIONS[name.split(">")[1]](y, pred)))
    assert set(metrics) == set(meta["metrics"]), (metrics, meta["metrics"])
    return pred, metrics


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


@pytest.mark.parametrize("folder, case", CASES, ids=CASE_IDS)
def test_golden_record_agrees_with_reference(folder, case):
    """The stored numbers (written by the plugin then) are right, not just stable."""
    meta = json.loads((GOLDEN / folder / "golden.json").read_text())["cases"][case]
    stored = np.load(GOLDEN / folder / "golden.npz")[f"pred_{case}"]
    pred, metrics = reference(folder, case)
    np.testing.assert_allclose(stored, pred, rtol=PRED_RTOL, atol=PRED_ATOL)
    for key, value in metrics.items():
        np.testing.assert_allclose(meta["metrics"][key], value, rtol=LOSS_RTOL, err_msg=key)


@pytest.mark.parametrize("folder, case", CASES, ids=CASE_IDS)
def test_golden_file_reproduces_predictions_and_loss(loaded, folder, case):
    meta = json.loads((GOLDEN / folder / "golden.json").read_text())["cases"][case]
    pred, metrics = reference(folder, case)
    got = loaded(folder)["cases"][case]
    np.testing.assert_allclose(np.array(got["pred"]), pred, rtol=PRED_RTOL, atol=PRED_ATOL)
    np.testing.assert_allclose(got["metrics"]["loss"], metrics["loss"], rtol=LOSS_RTOL)
    for key, value in metrics.items():  # metric names may differ across Keras versions
        if key in got["metrics"]:
            np.testing.assert_allclose(got["metrics"][key], value, rtol=LOSS_RTOL, err_msg=key)
    if meta["compiled_loss"] is not None:  # the string name resolves to the same loss class
        assert got["loss_class"] == meta["compiled_loss"].split(">")[1]
        assert got["loss_string"] in (None, meta["compiled_loss"])
    else:  # the non-default loss instance comes back with every argument
        assert got["loss_config"] == meta["loss_config"]


@pytest.mark.parametrize("folder, case", CASES, ids=CASE_IDS)
def test_golden_file_loads_and_saves_again(loaded, folder, case):
    """An old file, loaded by this version, saves again and reloads to the same numbers."""
    _, metrics = reference(folder, case)
    got = loaded(folder)["cases"][case]
    assert got["resave_error"] is None, got["resave_error"]
    assert got["resave_pred_err"] <= 1e-6  # the same weights: equal up to float32 rounding
    np.testing.assert_allclose(got["resave_loss"], metrics["loss"], rtol=LOSS_RTOL)


# --------------------------------------------------------------------------- #
# The numbers Keras publishes in the docstrings of its built-in losses (Keras 3.15:
# keras/src/losses/losses.py), for the plugin's equivalents. Keras prints them to 3-4
# significant digits, sometimes truncated (0.24364 is printed 0.243): the tolerance is
# one unit of the last printed digit. The float64 reference is checked to 1e-6
# (float32 arithmetic on values ~1).
# --------------------------------------------------------------------------- #
CCE_Y = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
CCE_P = [[0.05, 0.95, 0.0], [0.1, 0.8, 0.1]]
SCCE_Y = [1, 2]
BCE_Y = [[0.0, 1.0], [0.0, 0.0]]
BCE_X = [[-18.6, 0.51], [2.94, -12.8]]
SW = [0.3, 0.7]

# (id, plugin loss, y_true, y_pred, sample_weight, published, reference per sample, reduction)
PUBLISHED = [
    ("cce", CategoricalCE(), CCE_Y, CCE_P, None, "1.177", ref_cce, "sum_over_batch_size"),
    ("cce-sw", CategoricalCE(), CCE_Y, CCE_P, SW, "0.814", ref_cce, "sum_over_batch_size"),
    ("cce-sum", CategoricalCE(reduction="sum"), CCE_Y, CCE_P, None, "2.354", ref_cce, "sum"),
    (
        "cce-none",
        CategoricalCE(reduction=None),
        CCE_Y,
        CCE_P,
        None,
        ["0.0513", "2.303"],
        ref_cce,
        None,
    ),
    ("cce-fn", categorical_ce, CCE_Y, CCE_P, None, ["0.0513", "2.303"], ref_cce, None),
    ("scce", SparseCategoricalCE(), SCCE_Y, CCE_P, None, "1.177", ref_scce, "sum_over_batch_size"),
    ("scce-sw", SparseCategoricalCE(), SCCE_Y, CCE_P, SW, "0.814", ref_scce, "sum_over_batch_size"),
    (
        "scce-sum",
        SparseCategoricalCE(reduction="sum"),
        SCCE_Y,
        CCE_P,
        None,
        "2.354",
        ref_scce,
        "sum",
    ),
    (
        "scce-none",
        SparseCategoricalCE(reduction=None),
        SCCE_Y,
        CCE_P,
        None,
        ["0.0513", "2.303"],
        ref_scce,
        None,
    ),
    ("scce-fn", sparse_categorical_ce, SCCE_Y, CCE_P, None, ["0.0513", "2.303"], ref_scce, None),
    (
        "bce-logits-1d",
        BinaryCE(from_logits=True),
        [0.0, 1.0, 0.0, 0.0],
        [-18.6, 0.51, 2.94, -12.8],
        None,
        "0.8654",
        ref_bce,
        "sum_over_batch_size",
    ),
    (
        "bce-logits",
        BinaryCE(from_logits=True),
        BCE_Y,
        BCE_X,
        None,
        "0.8654",
        ref_bce,
        "sum_over_batch_size",
    ),
    (
        "bce-logits-sw",
        BinaryCE(from_logits=True),
        BCE_Y,
        BCE_X,
        [0.8, 0.2],
        "0.243",
        ref_bce,
        "sum_over_batch_size",
    ),
    (
        "bce-logits-sum",
        BinaryCE(from_logits=True, reduction="sum"),
        BCE_Y,
        BCE_X,
        None,
        "1.730",
        ref_bce,
        "sum",
    ),
    (
        "bce-logits-none",
        BinaryCE(from_logits=True, reduction=None),
        BCE_Y,
        BCE_X,
        None,
        ["0.235", "1.496"],
        ref_bce,
        None,
    ),
    ("bce-fn", binary_ce, BCE_Y, [[0.6, 0.4], [0.4, 0.6]], None, ["0.916", "0.714"], ref_bce, None),
]


def _published(value: str | list[str]) -> tuple[np.ndarray, float]:
    """The published number(s) and one unit of the last printed digit."""
    values = [value] if isinstance(value, str) else value
    ulp = max(10.0 ** -len(v.split(".")[1]) for v in values)
    return np.array([float(v) for v in values]).reshape(np.shape(value)), ulp


@pytest.mark.parametrize(
    "loss, y_true, y_pred, sample_weight, published, ref, reduction",
    [case[1:] for case in PUBLISHED],
    ids=[case[0] for case in PUBLISHED],
)
def test_matches_numbers_published_by_keras(
    loss, y_true, y_pred, sample_weight, published, ref, reduction
):
    y_true, y_pred = np.array(y_true), np.array(y_pred, "float32")
    if isinstance(loss, (CategoricalCE, SparseCategoricalCE, BinaryCE)):
        got = np.asarray(loss(y_true, y_pred, sample_weight=sample_weight), np.float64)
        from_logits = loss.from_logits
    else:  # the function: per-sample values
        got = np.asarray(loss(y_true, y_pred), np.float64)
        from_logits = False
    expected, ulp = _published(published)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ulp)
    if y_pred.ndim == 1:  # one sample: its labels along the only axis
        y_true, y_pred = y_true[None], y_pred[None]
    per_sample = ref(y_true, y_pred.astype(np.float64), from_logits=from_logits)
    np.testing.assert_allclose(got, ref_reduce(per_sample, reduction, sample_weight), rtol=1e-6)

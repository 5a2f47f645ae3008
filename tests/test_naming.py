"""String names in compile: ``compile(loss="customloss>CategoricalCE")`` and friends.

Keras resolves string identifiers lazily (at the first fit/evaluate), so every test
runs the model, and compares what Keras computed with the plugin's own functions.
Changes to Keras' internals are simulated in fresh processes.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import REPO, run_python

import keras_ce_plugin as kcp
from keras_ce_plugin import naming

FUNCTIONS = {
    "CategoricalCE": kcp.categorical_ce,
    "SparseCategoricalCE": kcp.sparse_categorical_ce,
    "BinaryCE": kcp.binary_ce,
    "categorical_ce": kcp.categorical_ce,
    "sparse_categorical_ce": kcp.sparse_categorical_ce,
    "binary_ce": kcp.binary_ce,
}
NAMES = sorted("customloss>" + name for name in FUNCTIONS)  # the loss module's six


def _data(name: str, n: int = 32, classes: int = 3, seed: int = 0):
    """(x, y, output activation) suited to the loss `name`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    labels = rng.integers(0, classes, size=n)
    key = name.split(">")[-1].lower()
    if "sparse" in key:
        return x, labels, "softmax"
    if "binary" in key:
        return x, (rng.uniform(size=(n, classes)) < 0.5).astype("float32"), "sigmoid"
    return x, np.eye(classes, dtype="float32")[labels], "softmax"


def _expected(name: str, y, y_pred) -> float:
    fn = FUNCTIONS[name.split(">")[-1]]
    return float(np.mean(np.asarray(fn(y, y_pred))))


def test_loss_names_is_keras_registry():
    """``LOSS_NAMES`` is every ``customloss>`` name in Keras' registry, nothing kept
    by hand: the six losses and the three large_vocab classes."""
    expected = {
        "customloss>BinaryCE": kcp.BinaryCE,
        "customloss>CategoricalCE": kcp.CategoricalCE,
        "customloss>LinearCE": kcp.LinearCE,
        "customloss>LinearCEModel": kcp.LinearCEModel,
        "customloss>SparseCategoricalCE": kcp.SparseCategoricalCE,
        "customloss>TokenAccuracy": kcp.TokenAccuracy,
        "customloss>binary_ce": kcp.binary_ce,
        "customloss>categorical_ce": kcp.categorical_ce,
        "customloss>sparse_categorical_ce": kcp.sparse_categorical_ce,
    }
    assert dict(kcp.LOSS_NAMES) == expected
    assert list(kcp.LOSS_NAMES) == sorted(expected)
    for name, obj in expected.items():
        assert keras.saving.get_registered_object(name) is obj
        assert keras.saving.get_registered_name(obj) == name
    assert naming.registered_names("customloss") == dict(kcp.LOSS_NAMES)


def test_loss_names_follows_new_registrations():
    """A name registered after import shows at once (a view, not a copy)."""
    name = "customloss>ZzLateForTest"
    assert name not in kcp.LOSS_NAMES

    @keras.saving.register_keras_serializable(package="customloss", name="ZzLateForTest")
    def late(y_true, y_pred):
        return y_pred

    try:
        assert kcp.LOSS_NAMES[name] is late
        assert name in naming.registered_losses("customloss")
    finally:
        del keras.saving.get_custom_objects()[name]
    assert name not in kcp.LOSS_NAMES


@pytest.mark.parametrize("name", NAMES)
def test_name_in_compile_loss_and_metrics(name):
    x, y, activation = _data(name)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation=activation)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=name, metrics=[name])
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][1] < history.history["loss"][0]
    logs = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    assert set(logs) == {"loss", name}  # the metric is logged under the string given
    expected = _expected(name, y, model.predict(x, verbose=0))
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
    assert logs[name] == pytest.approx(expected, rel=1e-5)
    assert model.loss == name


@pytest.mark.parametrize("form", ["list", "dict"])
def test_list_and_dict_forms_for_two_outputs(form):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4)).astype("float32")
    y_a = np.eye(3, dtype="float32")[rng.integers(0, 3, 40)]
    y_b = rng.integers(0, 4, 40)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    out_a = keras.layers.Dense(3, activation="softmax", name="a")(hidden)
    out_b = keras.layers.Dense(4, activation="softmax", name="b")(hidden)
    model = keras.Model(inputs, {"a": out_a, "b": out_b} if form == "dict" else [out_a, out_b])
    losses = ["customloss>CategoricalCE", "customloss>sparse_categorical_ce"]
    metrics = [["customloss>categorical_ce"], ["customloss>SparseCategoricalCE", "accuracy"]]
    if form == "dict":
        losses, metrics = dict(zip("ab", losses)), dict(zip("ab", metrics))
        ys = {"a": y_a, "b": y_b}
    else:
        ys = [y_a, y_b]
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=losses, metrics=metrics)
    history = model.fit(x, ys, batch_size=20, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    logs = model.evaluate(x, ys, batch_size=len(x), verbose=0, return_dict=True)
    pred = model.predict(x, verbose=0)
    p_a, p_b = (pred["a"], pred["b"]) if form == "dict" else pred
    loss_a = _expected("categorical_ce", y_a, p_a)
    loss_b = _expected("sparse_categorical_ce", y_b, p_b)
    assert logs["loss"] == pytest.approx(loss_a + loss_b, rel=1e-5)
    assert logs["a_customloss>categorical_ce"] == pytest.approx(loss_a, rel=1e-5)
    assert logs["b_customloss>SparseCategoricalCE"] == pytest.approx(loss_b, rel=1e-5)


def test_builtin_names_still_work():
    x, y, _ = _data("CategoricalCE")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=["accuracy", "mse"])
    model.fit(x, y, epochs=1, verbose=0)
    logs = model.evaluate(x, y, batch_size=len(x), verbose=0, return_dict=True)
    expected = keras.losses.CategoricalCrossentropy()(y, model.predict(x, verbose=0))
    assert logs["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert set(logs) == {"loss", "accuracy", "mse"}
    assert keras.losses.get("mse") is keras.losses.mean_squared_error
    assert isinstance(keras.losses.get("CategoricalCrossentropy"), keras.losses.Loss)
    assert isinstance(keras.metrics.get("mse"), keras.metrics.MeanSquaredError)
    assert kcp.get("binary_crossentropy") is keras.losses.binary_crossentropy


@pytest.mark.parametrize(
    "resolve",
    [kcp.get, keras.losses.get, keras.metrics.get],
    ids=["keras_ce_plugin.get", "keras.losses.get", "keras.metrics.get"],
)
def test_unknown_name_is_named_and_valid_names_listed(resolve):
    with pytest.raises(ValueError) as err:
        resolve("customloss>Nope")
    message = str(err.value)
    assert "customloss>Nope" in message
    assert all(name in message for name in NAMES)


def test_unknown_name_in_compile_fails_at_fit():
    x, y, _ = _data("CategoricalCE")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(loss="customloss>Nope")
    with pytest.raises(ValueError, match="customloss>Nope") as err:
        model.fit(x, y, epochs=1, verbose=0)
    assert "customloss>CategoricalCE" in str(err.value)


def test_get_returns_fresh_instances_functions_and_passes_through():
    a, b = kcp.get("customloss>CategoricalCE"), kcp.get("customloss>CategoricalCE")
    assert isinstance(a, kcp.CategoricalCE) and a is not b
    assert kcp.get("customloss>binary_ce") is kcp.binary_ce
    loss = kcp.SparseCategoricalCE(ignore_class=0)
    assert kcp.get(loss) is loss


def test_metric_from_name_is_mean_of_per_sample_losses():
    metric = keras.metrics.get("customloss>SparseCategoricalCE")
    assert isinstance(metric, keras.metrics.Metric)
    p = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], "float32")
    metric.update_state(np.array([1, 0]), p[:2])
    metric.update_state(np.array([1]), p[2:])
    assert float(metric.result()) == pytest.approx(
        -(np.log(0.8) + np.log(0.6) + np.log(0.5)) / 3, rel=1e-6
    )


def test_install_is_idempotent_in_process():
    import keras.src.losses as src_losses

    assert naming.install() == []  # already installed on import
    wrapped = src_losses.get
    assert hasattr(wrapped, naming._MARK)
    assert not hasattr(getattr(wrapped, naming._MARK), naming._MARK)  # one level only


_RELOAD_AND_BREAK = """
import importlib, sys
import keras
import keras.src.losses as L, keras.src.metrics as M
import keras.src.trainers.compile_utils as cu
import keras_ce_plugin
from keras_ce_plugin import naming

MARK = naming._MARK
def depth(f):
    n = 0
    while hasattr(f, MARK):
        f, n = getattr(f, MARK), n + 1
    return n

# Idempotent: reloading the package and the module, and installing again.
importlib.reload(keras_ce_plugin)
importlib.reload(naming)
assert naming.install() == [], naming.install()
for f in (L.get, M.get, keras.losses.get, keras.metrics.get):
    assert depth(f) == 1, (f, depth(f))
from keras.src.trainers.trainer import Trainer
assert depth(Trainer.compile_from_config) == 1
assert isinstance(keras.losses.get("customloss>CategoricalCE"), keras_ce_plugin.CategoricalCE)
assert keras.losses.get("mse") is keras.losses.mean_squared_error
print("IDEMPOTENT OK")

# Keras internals move: a fresh import of the plugin must fail loudly.
naming.uninstall()
assert depth(L.get) == 0 and depth(Trainer.compile_from_config) == 0
for name in [m for m in sys.modules if m.startswith("keras_ce_plugin")]:
    del sys.modules[name]
del cu.losses_module
try:
    import keras_ce_plugin
except ImportError as err:
    print("ERROR", type(err).__name__, str(err))
else:
    raise SystemExit("no error")
assert depth(L.get) == 0, "patched although the internals are missing"
"""


def test_reload_idempotent_and_compatibility_error_in_subprocess():
    out = run_python(_RELOAD_AND_BREAK, cwd=REPO).stdout
    assert "IDEMPOTENT OK" in out
    error = out.split("ERROR ", 1)[1]
    assert error.startswith("KerasCompatibilityError")
    assert "compile_utils.losses_module" in error
    assert f"Keras {keras.__version__}" in error
    assert "KERAS_CE_NO_PATCH=1" in error and "keras_ce_plugin.get" in error


_NO_PATCH = """
import numpy as np, keras
import keras.src.losses as L
import keras_ce_plugin as kcp
from keras_ce_plugin import naming
assert not hasattr(L.get, naming._MARK) and not hasattr(keras.losses.get, naming._MARK)
assert naming.install() == []
loss = kcp.get("customloss>CategoricalCE")
assert isinstance(loss, kcp.CategoricalCE)
x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
y = np.eye(3, dtype="float32")[np.arange(16) % 3]
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
m.compile(optimizer="sgd", loss=loss, metrics=[kcp.get("customloss>categorical_ce")])
m.fit(x, y, epochs=1, verbose=0)
print("GET OK", m.evaluate(x, y, verbose=0))
m.compile(optimizer="sgd", loss="customloss>CategoricalCE")
try:
    m.fit(x, y, epochs=1, verbose=0)
except ValueError as err:
    print("KERAS ERROR", err)
"""


def test_get_works_without_patching():
    out = run_python(_NO_PATCH, cwd=REPO, env={"KERAS_CE_NO_PATCH": "1"}).stdout
    assert "GET OK" in out
    assert "KERAS ERROR Could not interpret loss identifier: customloss>CategoricalCE" in out


_PREWRAPPED = """
import inspect, numpy as np, keras
import keras.src.losses as L
original = L.get

def resolving_get(identifier):  # a future Keras that consults the registry itself
    if isinstance(identifier, str) and ">" in identifier:
        obj = keras.saving.get_registered_object(identifier)
        if obj is not None:
            return obj() if inspect.isclass(obj) else obj
    return original(identifier)

L.get = keras.losses.get = resolving_get
from keras.src.trainers.trainer import Trainer
cfc = Trainer.compile_from_config
import keras_ce_plugin
from keras_ce_plugin import naming
assert L.get is resolving_get and keras.losses.get is resolving_get
assert Trainer.compile_from_config is cfc
print("PATCHED", naming.install())
x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
y = np.eye(3, dtype="float32")[np.arange(16) % 3]
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
m.compile(optimizer="sgd", loss="customloss>CategoricalCE")
m.fit(x, y, epochs=1, verbose=0)
print("LEFT ALONE OK")
"""


def test_keras_that_already_resolves_names_is_left_alone():
    out = run_python(_PREWRAPPED, cwd=REPO).stdout
    assert "LEFT ALONE OK" in out
    assert "PATCHED []" in out

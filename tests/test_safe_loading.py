"""Files from elsewhere: hostile or damaged ``.keras`` files fail clearly and run no code.

A fresh process crafts the files (a ``Lambda`` layer and a lambda loss that write a
marker file when executed, config gadgets that name arbitrary modules, unknown
``customloss>`` names, and truncated/corrupted archives). Other fresh processes
load them. A control test per hostile file shows that its code really runs once
safe mode is off (or, for the config gadgets Keras refuses even then, once what
they name is resolved), so each "marker not written" check can fail.

Two layers are tested: Keras' own ``load_model`` (it must refuse or raise, never run
code) and the plugin's ``keras_ce_plugin.files.load_keras_model`` helper, which turns
every failure into a :class:`KerasCEError` naming the file.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import keras
import pytest
from conftest import REPO, run_python

import keras_ce_plugin
import keras_ce_plugin.files
from keras_ce_plugin import KerasCEError

CRAFT = textwrap.dedent(
    """
    import copy, json, os, sys, zipfile
    import numpy as np, keras
    import keras_ce_plugin  # noqa: F401

    out = sys.argv[1]
    def p(name):
        return os.path.join(out, name)

    def marker(name):
        return p("MARKER-" + name)

    def members(path):
        with zipfile.ZipFile(path) as z:
            return {n: z.read(n) for n in z.namelist()}

    def write(name, items):
        with zipfile.ZipFile(p(name), "w") as z:
            for n, b in items.items():
                z.writestr(n, b)

    keras.utils.set_random_seed(0)
    good = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    good.compile(optimizer="adam", loss="customloss>CategoricalCE")
    good.save(p("good.keras"))
    items = members(p("good.keras"))
    cfg = json.loads(items["config.json"])

    # Hostile: a Lambda layer whose function appends to a marker file when it runs
    # (the path travels in the closure, which Keras stores with the bytecode).
    def writes_marker(m):
        return lambda *a: (open(m, "a").write("ran"), a[-1] * 1.0)[1]

    hostile = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Lambda(writes_marker(marker("lambda_layer"))),
        keras.layers.Dense(3, activation="softmax"),
    ])
    hostile.save(p("lambda_layer.keras"))
    # Hostile: the same trick as the loss function in compile_config.
    hostile2 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    hostile2.compile(optimizer="adam", loss=writes_marker(marker("lambda_loss")))
    hostile2.save(p("lambda_loss.keras"))
    for name in ("lambda_layer", "lambda_loss"):  # building the Lambda ran it once here
        if os.path.exists(marker(name)):
            os.remove(marker(name))

    def gadget(name, layer):
        g = copy.deepcopy(cfg)
        g["config"]["layers"].insert(1, layer)
        write(name + ".keras", dict(items, **{"config.json": json.dumps(g).encode()}))

    code = f"open({marker('module_exec')!r}, 'a').write('ran')"
    gadget("module_exec", {"module": "builtins", "class_name": "exec", "config": code,
                           "registered_name": None})
    gadget("module_os_system", {"module": "os", "class_name": "system",
                                "config": "touch " + marker("module_os_system"),
                                "registered_name": None})
    # A config that tries to switch safe mode off before its Lambda (cf. CVE-2025-9906).
    lam_items = members(p("lambda_layer.keras"))
    lam = json.loads(lam_items["config.json"])
    lam_fn = lam["config"]["layers"][1]["config"]["function"]
    lam["config"]["layers"].insert(1, {"module": "keras.config", "class_name": "function",
                                       "config": "enable_unsafe_deserialization",
                                       "registered_name": "function"})
    write("unsafe_toggle.keras", dict(lam_items, **{"config.json": json.dumps(lam).encode()}))

    # Unknown plugin names (a newer plugin, or an edited file).
    for name, key, value in [
        ("unknown_loss", "loss", "customloss>NoSuchLoss"),
        ("unknown_metric", "metrics", ["accuracy", "customloss>no_such_metric"]),
    ]:
        g = copy.deepcopy(cfg)
        g["compile_config"][key] = value
        write(name + ".keras", dict(items, **{"config.json": json.dumps(g).encode()}))
    g = copy.deepcopy(cfg)
    g["config"]["layers"][1]["registered_name"] = "customloss>NoSuchLayer"
    g["config"]["layers"][1]["class_name"] = "NoSuchLayer"
    g["config"]["layers"][1]["module"] = None
    write("unknown_layer.keras", dict(items, **{"config.json": json.dumps(g).encode()}))

    # Damaged archives.
    data = open(p("good.keras"), "rb").read()
    open(p("truncated.keras"), "wb").write(data[: len(data) // 2])
    open(p("truncated_tail.keras"), "wb").write(data[:-40])
    open(p("empty.keras"), "wb").write(b"")
    open(p("garbage.keras"), "wb").write(np.random.default_rng(0).bytes(4096))
    flipped = bytearray(data)
    flipped[data.find(b"\\x89HDF") + 2000] ^= 0xFF  # inside the stored weights member
    open(p("bad_crc.keras"), "wb").write(bytes(flipped))
    write("no_weights.keras", {k: v for k, v in items.items() if k != "model.weights.h5"})
    write("no_config.keras", {k: v for k, v in items.items() if k != "config.json"})
    write("bad_json.keras", dict(items, **{"config.json": b"{not json"}))
    write("not_a_model.keras", {"readme.txt": b"hello"})
    os.mkdir(p("directory.keras"))
    open(p("model.txt"), "wb").write(data)
    print("RESULT", json.dumps({"lambda_fn": lam_fn["class_name"]}))
    """
)

#: File -> the marker it would write if its code ran.
HOSTILE = ["lambda_layer", "lambda_loss", "module_exec", "module_os_system", "unsafe_toggle"]
UNKNOWN = {
    "unknown_loss": "customloss>NoSuchLoss",
    "unknown_metric": "customloss>no_such_metric",
    "unknown_layer": "customloss>NoSuchLayer",
}
DAMAGED = [
    "truncated.keras",
    "truncated_tail.keras",
    "empty.keras",
    "garbage.keras",
    "bad_crc.keras",
    "no_weights.keras",
    "no_config.keras",
    "bad_json.keras",
    "not_a_model.keras",
    "directory.keras",
    "missing.keras",
    "model.txt",
]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crafted")
    script = tmp_path_factory.mktemp("craft") / "craft.py"  # a file: Keras reads lambdas' source
    script.write_text(CRAFT)
    run_python(
        f"import runpy, sys; sys.argv = ['craft.py', {str(out)!r}]; runpy.run_path({str(script)!r})",
        cwd=REPO,
        timeout=300,
    )
    for name in HOSTILE:
        assert not (out / f"MARKER-{name}").exists()
    return out


def _helper():
    """The plugin's loader; a missing one is a failure (never a skip)."""
    helper = getattr(keras_ce_plugin.files, "load_keras_model", None)
    assert callable(helper), "keras_ce_plugin.files.load_keras_model is missing"
    return helper


LOAD_ALL = textwrap.dedent(
    """
    import json, sys, os
    import numpy as np, keras
    import keras_ce_plugin, keras_ce_plugin.files  # noqa: F401
    out, names, use_helper = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "1"
    load = keras_ce_plugin.files.load_keras_model if use_helper else keras.models.load_model
    results = {}
    for name in names:
        try:
            model = load(os.path.join(out, name + ".keras"))  # safe_mode=True by default
            # If it loaded, use it the way a user would: any stored code would run now.
            model.predict(np.zeros((2, 4), "float32"), verbose=0)
            model.evaluate(np.zeros((2, 4), "float32"), np.eye(3)[:2], verbose=0)
            results[name] = "loaded"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    print("RESULT", json.dumps(results))
    """
)


def _load_all(crafted: Path, names: list[str], use_helper: bool) -> dict:
    code = f"import sys; sys.argv = ['x', {str(crafted)!r}, {','.join(names)!r}, {'1' if use_helper else '0'!r}]\n"
    proc = run_python(code + LOAD_ALL, cwd=REPO, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def keras_results(crafted) -> dict:
    """Keras' own load_model (safe_mode=True) on every hostile file, in a fresh process."""
    return _load_all(crafted, HOSTILE, use_helper=False)


def test_lambda_layer_refused_under_safe_mode_with_clear_message(keras_results, crafted):
    msg = keras_results["lambda_layer"]
    assert msg.startswith("ValueError"), msg
    assert "`Lambda` layer" in msg and "safe_mode=False" in msg, msg
    assert not (crafted / "MARKER-lambda_layer").exists()


@pytest.mark.parametrize("name", HOSTILE)
def test_no_code_from_file_runs_under_safe_mode(keras_results, crafted, name):
    assert keras_results[name] != "loaded", f"{name} loaded under safe_mode=True"
    assert not (crafted / f"MARKER-{name}").exists(), f"code from {name}.keras ran"


@pytest.mark.parametrize(
    "name, use",
    [
        ("lambda_layer", "model.predict(x, verbose=0)"),
        ("lambda_loss", "model.evaluate(x, y, verbose=0)"),
    ],
)
def test_control_hostile_file_runs_code_once_user_opts_out(crafted, tmp_path, name, use):
    """Proves the crafted files are really hostile: the marker checks above can fail."""
    copy = tmp_path / f"{name}.keras"
    copy.write_bytes((crafted / f"{name}.keras").read_bytes())
    marker = crafted / f"MARKER-{name}"
    code = textwrap.dedent(
        f"""
        import numpy as np, keras
        x, y = np.zeros((2, 4), "float32"), np.eye(3)[:2]
        model = keras.models.load_model({str(copy)!r}, safe_mode=False)
        {use}
        """
    )
    try:
        run_python(code, cwd=REPO, timeout=300)
        assert marker.exists(), "the hostile file did not run its code even with safe_mode=False"
    finally:
        marker.unlink(missing_ok=True)


# Keras (3.15, and 3.8) refuses the three config gadgets even with safe_mode=False:
# they name modules outside Keras. Their controls therefore run what each gadget's
# entry names, as a loader that resolved it would (import `module`, call `class_name`
# with `config`; for the toggle: switch safe mode off, then load the rest of the file),
# proving the payloads are live: the "marker not written" checks above can fail.
@pytest.mark.parametrize("name", ["module_exec", "module_os_system"])
def test_control_config_gadget_runs_code_once_resolved(crafted, tmp_path, name):
    copy = tmp_path / f"{name}.keras"
    copy.write_bytes((crafted / f"{name}.keras").read_bytes())
    marker = crafted / f"MARKER-{name}"
    code = textwrap.dedent(
        f"""
        import importlib, json, zipfile
        with zipfile.ZipFile({str(copy)!r}) as z:
            entry = json.loads(z.read("config.json"))["config"]["layers"][1]
        getattr(importlib.import_module(entry["module"]), entry["class_name"])(entry["config"])
        """
    )
    try:
        run_python(code, cwd=REPO, timeout=300)
        assert marker.exists(), f"the {name} gadget's payload did not run when resolved"
    finally:
        marker.unlink(missing_ok=True)


def test_control_unsafe_toggle_runs_code_once_safe_mode_is_off(crafted, tmp_path):
    """Had the toggle entry run (safe mode off), the file's Lambda would run at predict."""
    copy = tmp_path / "unsafe_toggle.keras"
    copy.write_bytes((crafted / "unsafe_toggle.keras").read_bytes())
    marker = crafted / "MARKER-lambda_layer"  # the Lambda inside writes this marker
    code = textwrap.dedent(
        f"""
        import json, zipfile
        import numpy as np, keras
        path = {str(copy)!r}
        with zipfile.ZipFile(path) as z:
            items = {{n: z.read(n) for n in z.namelist()}}
        config = json.loads(items["config.json"])
        entry = config["config"]["layers"].pop(1)  # what the toggle names, called:
        getattr(keras.config, entry["config"])()
        items["config.json"] = json.dumps(config).encode()
        with zipfile.ZipFile(path, "w") as z:
            for n, b in items.items():
                z.writestr(n, b)
        keras.models.load_model(path).predict(np.zeros((2, 4), "float32"), verbose=0)
        """
    )
    try:
        run_python(code, cwd=REPO, timeout=300)
        assert marker.exists(), "the toggle's Lambda did not run with safe mode off"
    finally:
        marker.unlink(missing_ok=True)


def test_unknown_plugin_name_in_file_is_refused_at_load(crafted):
    """After ``import keras_ce_plugin``, Keras' own loader refuses such a file at load
    (not at the first fit/evaluate) with the identifier, the valid names and the hints."""
    code = textwrap.dedent(
        f"""
        import keras
        import keras_ce_plugin  # noqa: F401
        try:
            keras.models.load_model({str(crafted / "unknown_loss.keras")!r})
        except ValueError as exc:
            print("RESULT", exc)
        else:
            raise SystemExit("loaded a model compiled with an unknown loss")
        model = keras.models.load_model({str(crafted / "unknown_loss.keras")!r}, compile=False)
        print("INFERENCE", model.count_params() > 0)
        """
    )
    out = run_python(code, cwd=REPO, timeout=300).stdout
    result = next(line for line in out.splitlines() if line.startswith("RESULT"))
    assert "customloss>NoSuchLoss" in result and "customloss>CategoricalCE" in result, out
    assert "upgrade keras_ce_plugin" in result and "compile=False" in result, out
    assert "INFERENCE True" in out, out


@pytest.mark.parametrize("name", DAMAGED)
def test_keras_never_returns_a_model_from_a_damaged_file(crafted, name):
    with pytest.raises(Exception):  # noqa: B017 - any error; the helper makes them clear
        keras.models.load_model(crafted / name)


# --------------------------------------------------------------------------- #
# The plugin's helper: one KerasCEError that names the file
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", DAMAGED)
def test_helper_damaged_file_error_names_the_file(crafted, name):
    load = _helper()
    path = crafted / name
    with pytest.raises(KerasCEError) as info:
        load(path)
    assert str(path) in str(info.value), info.value


@pytest.mark.parametrize("name, identifier", sorted(UNKNOWN.items()))
def test_helper_refuses_unknown_plugin_names_naming_them(crafted, name, identifier):
    load = _helper()
    path = crafted / f"{name}.keras"
    with pytest.raises(KerasCEError) as info:
        load(path)
    msg = str(info.value)
    assert identifier in msg and str(path) in msg and "customloss>CategoricalCE" in msg, msg


def test_helper_runs_no_code_from_hostile_files(crafted):
    _helper()
    results = _load_all(crafted, HOSTILE, use_helper=True)
    for name in HOSTILE:
        assert results[name].startswith("KerasCEError"), (name, results[name])
        assert str(crafted / f"{name}.keras") in results[name], results[name]
        assert not (crafted / f"MARKER-{name}").exists(), f"code from {name}.keras ran"
    assert "safe_mode=False" in results["lambda_layer"]


def test_helper_loads_a_good_file(crafted):
    load = _helper()
    model = load(crafted / "good.keras")
    assert model.count_params() == 15
    assert model.loss == "customloss>CategoricalCE"

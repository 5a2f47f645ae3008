"""Export round trips with real runtimes in fresh processes (no mocks).

A small Conv/Dropout/Dense model is compiled by string with
``customloss>CategoricalCE``, trained on real CIFAR-10 images, saved, and exported
once through the ``keras-ce export`` CLI (shared by this module and
``test_predict.py``). Every format is then reloaded in a fresh process and compared
with the original model's predictions; damaged exports must be rejected by
``verify``; a SIGKILLed export must leave the previous export intact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_python

from keras_ce_plugin import KerasCEError, __version__
from keras_ce_plugin import export as ex
from keras_ce_plugin.cli.export import verify_command
from keras_ce_plugin.data import CIFAR10_CLASSES
from keras_ce_plugin.files import sha256_file

N_TRAIN = 1024
N_TEST = 200
ATOL = 1e-5
SERVE_SAVEDMODEL = REPO / "keras_ce_plugin" / "export" / "_serve_savedmodel.py"


def cli(*args, expect: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``keras-ce ARGS...`` in a fresh process; asserts its exit status."""
    proc = subprocess.run(
        [sys.executable, "-m", "keras_ce_plugin.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=timeout,
    )
    assert proc.returncode == expect, (
        f"keras-ce {args} exited {proc.returncode}, expected {expect}\n"
        f"STDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    )
    return proc


def build_small_model(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Dropout(0.25),  # parity fails if an export ran it in training mode
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="customloss>CategoricalCE", metrics=["accuracy"])
    return model


def make_shared_export(base: Path, cifar_dir: Path) -> dict[str, Path]:
    """Compile by string -> train -> save -> ``keras-ce export``; cached under ``base``.

    Returns the paths: ``model`` (.keras), ``export`` (directory), ``x_test``,
    ``y_test``, ``x_train``, ``y_train``, ``reference`` (.npy: the original model's
    predictions on ``x_test``).
    """
    paths = {
        "model": base / "model.keras",
        "export": base / "export",
        "x_test": base / "x_test.npy",
        "y_test": base / "y_test.npy",
        "x_train": base / "x_train.npy",
        "y_train": base / "y_train.npy",
        "reference": base / "reference.npy",
    }
    if (base / "ready").is_file():
        return paths
    from keras_ce_plugin.data import load_cifar10

    base.mkdir(parents=True, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = load_cifar10(
        cifar_dir, limit_train=N_TRAIN, limit_test=N_TEST
    )
    model = build_small_model(seed=0)
    history = model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    model.save(paths["model"])
    for name, array in [
        ("x_test", x_test),
        ("y_test", y_test),
        ("x_train", x_train),
        ("y_train", y_train),
        ("reference", model.predict(x_test, verbose=0)),
    ]:
        np.save(paths[name], array)
    cli("export", paths["model"], "--out", paths["export"])
    (base / "ready").write_text("ok")
    return paths


@pytest.fixture(scope="module")
def shared(tmp_path_factory, cifar_dir) -> dict[str, Path]:
    return make_shared_export(tmp_path_factory.getbasetemp() / "shared_export", cifar_dir)


def verify_args(export_dir, cifar_dir, limit_test=N_TEST) -> argparse.Namespace:
    return argparse.Namespace(
        export_dir=str(export_dir),
        data_dir=str(cifar_dir),
        limit_train=None,
        limit_test=limit_test,
        atol=ATOL,
    )


# --------------------------------------------------------------------------- #
# The export directory
# --------------------------------------------------------------------------- #
def test_export_directory_and_manifest(shared):
    export = shared["export"]
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["formats"] == ["keras", "savedmodel", "onnx"]
    assert manifest["input"] == {"name": "images", "shape": [None, 32, 32, 3], "dtype": "float32"}
    assert manifest["output"] == {"name": "probabilities", "shape": [None, 10], "dtype": "float32"}
    assert manifest["signature"] == "serving_default"
    assert manifest["class_names"] == list(CIFAR10_CLASSES)
    assert "/ 255" in manifest["preprocessing"]
    assert manifest["versions"]["keras_ce_plugin"] == __version__
    assert {"keras", "tensorflow", "tf2onnx", "onnxruntime"} <= set(manifest["versions"])
    assert manifest["source"]["sha256"] == sha256_file(shared["model"])
    # Every file on disk is listed with its real hash and size, and nothing else.
    on_disk = sorted(
        p.relative_to(export).as_posix()
        for p in export.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert sorted(manifest["files"]) == on_disk
    assert "saved_model/saved_model.pb" in on_disk and "model.onnx" in on_disk
    for rel, info in manifest["files"].items():
        assert info == {"sha256": sha256_file(export / rel), "bytes": (export / rel).stat().st_size}
    # The copy is byte-identical, and artifacts are readable by a serving user.
    assert sha256_file(export / "model.keras") == sha256_file(shared["model"])
    for path in [export, *export.rglob("*")]:
        assert path.stat().st_mode & 0o044 == 0o044, path
    # No temporary sibling is left behind.
    assert not [p for p in export.parent.iterdir() if p.name.startswith(".export.")]


def test_saved_model_cli_shows_the_serving_signature(shared):
    exe = Path(sys.executable).with_name("saved_model_cli")
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    )
    proc = subprocess.run(
        [
            *cmd,
            "show",
            "--dir",
            str(shared["export"] / "saved_model"),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "inputs['images'] tensor_info: dtype: DT_FLOAT shape: (-1, 32, 32, 3)" in text, text
    assert "outputs['probabilities'] tensor_info: dtype: DT_FLOAT shape: (-1, 10)" in text, text
    assert "Method name is: tensorflow/serving/predict" in text


# --------------------------------------------------------------------------- #
# Each format in a fresh process
# --------------------------------------------------------------------------- #
def test_savedmodel_serves_in_a_process_without_keras(shared):
    code = f"""
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("serve_sm", {str(SERVE_SAVEDMODEL)!r})
serve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve)
serve.block_imports(("keras", "tf_keras", "keras_ce_plugin"))
import tensorflow as tf
loaded = tf.saved_model.load({str(shared["export"] / "saved_model")!r})
fn = loaded.signatures["serving_default"]
x = np.load({str(shared["x_test"])!r})
ref = np.load({str(shared["reference"])!r})
full = fn(images=tf.constant(x))["probabilities"].numpy()
one = fn(images=tf.constant(x[:1]))["probabilities"].numpy()
seven = fn(images=tf.constant(x[3:10]))["probabilities"].numpy()
assert full.shape == ref.shape and full.dtype == np.float32, (full.shape, full.dtype)
err = float(np.max(np.abs(full - ref)))
assert err <= {ATOL}, err
assert np.max(np.abs(one - ref[:1])) <= {ATOL} and np.max(np.abs(seven - ref[3:10])) <= {ATOL}
assert (full.argmax(1) == ref.argmax(1)).all()
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tf_keras", "keras_ce_plugin"))
assert not bad, bad
print("max_abs_diff", err)
"""
    proc = run_python(code)
    assert "max_abs_diff" in proc.stdout


def test_onnx_serves_in_a_process_without_tensorflow(shared):
    code = f"""
import json, sys
import numpy as np
import onnx
import onnxruntime as ort
path = {str(shared["export"] / "model.onnx")!r}
model = onnx.load(path)
onnx.checker.check_model(model, full_check=True)
meta = {{p.key: p.value for p in model.metadata_props}}
assert meta["keras_ce_plugin_version"] == {__version__!r}, meta
assert json.loads(meta["class_names"]) == {list(CIFAR10_CLASSES)!r}, meta
assert "/ 255" in meta["preprocessing"], meta
sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
(inp,), (out,) = sess.get_inputs(), sess.get_outputs()
assert (inp.name, inp.type, inp.shape) == ("images", "tensor(float)", ["batch", 32, 32, 3]), inp
assert (out.name, out.shape) == ("probabilities", ["batch", 10]), out
x = np.load({str(shared["x_test"])!r})
ref = np.load({str(shared["reference"])!r})
full = sess.run(["probabilities"], {{"images": x}})[0]
one = sess.run(["probabilities"], {{"images": x[:1]}})[0]
seven = sess.run(["probabilities"], {{"images": x[3:10]}})[0]
err = float(np.max(np.abs(full - ref)))
assert err <= {ATOL}, err
assert np.max(np.abs(one - ref[:1])) <= {ATOL} and np.max(np.abs(seven - ref[3:10])) <= {ATOL}
assert (full.argmax(1) == ref.argmax(1)).all()
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "keras_ce_plugin"))
assert not bad, bad
print("max_abs_diff", err)
"""
    proc = run_python(code)
    assert "max_abs_diff" in proc.stdout


def test_reloaded_keras_copy_predicts_the_same_and_continues_training(shared, tmp_path):
    code = f"""
import numpy as np
import keras
import keras_ce_plugin
model = keras.saving.load_model({str(shared["export"] / "model.keras")!r})
x, y = np.load({str(shared["x_train"])!r}), np.load({str(shared["y_train"])!r})
x_test, ref = np.load({str(shared["x_test"])!r}), np.load({str(shared["reference"])!r})
err = float(np.max(np.abs(model.predict(x_test, verbose=0) - ref)))
assert err <= {ATOL}, err
# The compiled loss is the plugin's cross-entropy: -mean(sum(y * log p)).
p = np.clip(model.predict(x, verbose=0).astype("float64"), 1e-7, 1.0)
manual = float(np.mean(-np.sum(y * np.log(p), axis=1)))
assert abs(model.evaluate(x, y, verbose=0)[0] - manual) < 1e-4, manual
steps = int(model.optimizer.iterations.numpy())
assert steps == 3 * {N_TRAIN // 64}, steps
before = [w.copy() for w in model.get_weights()]
first = model.evaluate(x, y, verbose=0)[0]
keras.utils.set_random_seed(1)
hist = model.fit(x, y, epochs=2, batch_size=64, verbose=0)
assert int(model.optimizer.iterations.numpy()) == steps + 2 * {N_TRAIN // 64}
assert np.all(np.isfinite(hist.history["loss"]))
assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
assert model.evaluate(x, y, verbose=0)[0] < first, "training did not continue to lower the loss"
# ... and the continued model saves and reloads again.
model.save({str(tmp_path / "again.keras")!r})
again = keras.saving.load_model({str(tmp_path / "again.keras")!r})
np.testing.assert_allclose(again.predict(x_test, verbose=0), model.predict(x_test, verbose=0), atol=1e-6)
"""
    run_python(code)


# --------------------------------------------------------------------------- #
# verify
# --------------------------------------------------------------------------- #
def test_verify_cli_passes_on_the_export(shared, cifar_dir):
    proc = cli("verify", shared["export"], "--data-dir", cifar_dir, "--limit-test", N_TEST)
    assert "sizes and SHA-256 match" in proc.stdout
    assert "OK: every artifact matches the Keras model" in proc.stdout
    rows = {
        line.split()[0]: line.split()
        for line in proc.stdout.splitlines()
        if line.split() and line.split()[0] in ("keras", "savedmodel", "onnx")
    }
    assert set(rows) == {"keras", "savedmodel", "onnx"}, proc.stdout
    assert rows["keras"][-1] == "reference"
    truth = np.load(shared["y_test"]).argmax(1)
    accuracy = float(np.mean(np.load(shared["reference"]).argmax(1) == truth))
    for fmt in ("savedmodel", "onnx"):
        row = rows[fmt]
        assert row[-1] == "ok", proc.stdout
        assert float(row[3]) <= ATOL and row[4] == "100.00%", row
        assert float(row[5]) == pytest.approx(accuracy, abs=1e-4), row


def _damage(kind: str, export: Path) -> str:
    """Damages a copy of an export; returns what the error message must name."""
    manifest_path = export / "manifest.json"
    if kind == "missing-onnx":
        (export / "model.onnx").unlink()
        return "model.onnx is missing"
    if kind == "truncated-variables":
        (path,) = (export / "saved_model" / "variables").glob("variables.data-*")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return f"{path.name} is {len(data) // 2} bytes"
    if kind in ("tampered-keras", "tampered-onnx", "tampered-saved-model-pb"):
        rel = {
            "tampered-keras": "model.keras",
            "tampered-onnx": "model.onnx",
            "tampered-saved-model-pb": "saved_model/saved_model.pb",
        }[kind]
        data = bytearray((export / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
        (export / rel).write_bytes(bytes(data))
        return f"{Path(rel).name} does not match its SHA-256"
    if kind == "missing-manifest":
        manifest_path.unlink()
        return "manifest.json is missing"
    if kind == "truncated-manifest":
        text = manifest_path.read_text()
        manifest_path.write_text(text[: len(text) // 2])
        return "manifest.json is not valid JSON"
    if kind == "unexpected-file":
        (export / "saved_model" / "assets" / "extra.txt").write_text("x")
        return "extra.txt is not in the manifest"
    if kind == "path-outside-export":
        manifest = json.loads(manifest_path.read_text())
        manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "bytes": 1}
        manifest_path.write_text(json.dumps(manifest))
        return "outside the export"
    raise AssertionError(kind)


DAMAGE = [
    "missing-onnx",
    "truncated-variables",
    "tampered-keras",
    "tampered-onnx",
    "tampered-saved-model-pb",
    "missing-manifest",
    "truncated-manifest",
    "unexpected-file",
    "path-outside-export",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_verify_rejects_a_damaged_export(shared, cifar_dir, tmp_path, kind):
    export = tmp_path / "export"
    shutil.copytree(shared["export"], export)
    expected = _damage(kind, export)
    with pytest.raises(KerasCEError) as info:
        verify_command(verify_args(export, cifar_dir))
    message = " ".join(str(info.value).split())
    assert expected in message, message


def test_verify_cli_reports_damage_without_traceback(shared, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(shared["export"], export)
    expected = _damage("truncated-variables", export)
    proc = cli("verify", export, expect=2)
    assert "Traceback" not in proc.stderr
    assert "keras-ce: error:" in proc.stderr
    assert expected in " ".join(proc.stderr.split())


def _resign(export: Path, rel: str, formats: list[str]) -> None:
    """Updates the manifest so the hash check passes (a consistent but wrong export)."""
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["formats"] = formats
    manifest["artifacts"] = {f: ex.ARTIFACTS[f] for f in formats}
    keep = [r for r in manifest["files"] if not r.startswith("saved_model/")]
    manifest["files"] = {
        r: {"sha256": sha256_file(export / r), "bytes": (export / r).stat().st_size} for r in keep
    }
    shutil.rmtree(export / "saved_model")
    (export / "manifest.json").write_text(json.dumps(manifest))
    assert rel in manifest["files"]


def test_verify_fails_when_an_artifact_predicts_differently(shared, cifar_dir, tmp_path, capsys):
    import keras

    export = tmp_path / "export"
    shutil.copytree(shared["export"], export)
    model = keras.saving.load_model(shared["model"])
    kernel = model.layers[-1].kernel
    kernel.assign(kernel.numpy() * 1.01)  # a slightly different model
    ex.export_onnx(model, export / "model.onnx", overwrite=True)
    _resign(export, "model.onnx", ["keras", "onnx"])
    assert verify_command(verify_args(export, cifar_dir, limit_test=50)) == 1
    out = capsys.readouterr()
    onnx_row = next(line for line in out.out.splitlines() if line.startswith("onnx"))
    assert "FAIL" in onnx_row and "max |diff| > atol" in onnx_row, out.out
    assert "FAILED: onnx" in out.err


def test_verify_rejects_a_corrupt_artifact_even_with_a_matching_manifest(
    shared, cifar_dir, tmp_path
):
    export = tmp_path / "export"
    shutil.copytree(shared["export"], export)
    (export / "model.onnx").write_bytes(b"\x08\x07" + os.urandom(200))  # not a valid model
    _resign(export, "model.onnx", ["keras", "onnx"])
    with pytest.raises(KerasCEError, match="model.onnx failed to load or predict in a fresh"):
        verify_command(verify_args(export, cifar_dir, limit_test=20))


# --------------------------------------------------------------------------- #
# One .keras loader: keras_ce_plugin.files.load_keras_model's rules apply
# --------------------------------------------------------------------------- #
def write_unknown_loss_model(src: Path, dst: Path) -> Path:
    """A copy of the real model ``src`` whose compile config names ``customloss>NoSuchLoss``."""
    import zipfile

    with zipfile.ZipFile(src) as z:
        members = {info.filename: z.read(info.filename) for info in z.infolist()}
    config = json.loads(members["config.json"])
    config["compile_config"]["loss"] = "customloss>NoSuchLoss"
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def _assert_unknown_loss_error(proc: subprocess.CompletedProcess, path: Path) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if "keras-ce: error:" in line]
    assert "customloss>NoSuchLoss" in line and "customloss>CategoricalCE" in line, line
    assert "does not register (it registers:" in line and str(path) in line, line


@pytest.mark.parametrize("command", ["export", "predict", "verify"])
def test_cli_refuses_a_model_with_an_unknown_loss(shared, cifar_dir, tmp_path, command):
    bad = write_unknown_loss_model(shared["model"], tmp_path / "model.keras")
    if command == "export":
        proc = cli("export", bad, "--out", tmp_path / "out", expect=2)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    elif command == "predict":
        # --import of a module that registers its own losses changes nothing here.
        np.save(tmp_path / "one.npy", np.load(shared["x_test"])[:1])
        (tmp_path / "other_losses.py").write_text(
            "import keras\n\n\n@keras.saving.register_keras_serializable(package='other')\n"
            "def focal(y_true, y_pred):\n    return keras.ops.mean(y_pred)\n"
        )
        imports = ["--import", tmp_path / "other_losses.py"]
        proc = cli("predict", bad, tmp_path / "one.npy", *imports, expect=2)
    else:
        # An export whose model.keras is the edited file, with a manifest to match.
        export = tmp_path / "export"
        shutil.copytree(shared["export"], export)
        shutil.copyfile(bad, export / "model.keras")
        manifest = json.loads((export / "manifest.json").read_text())
        manifest["files"]["model.keras"] = {
            "sha256": sha256_file(bad),
            "bytes": bad.stat().st_size,
        }
        (export / "manifest.json").write_text(json.dumps(manifest))
        proc = cli("verify", export, "--data-dir", cifar_dir, "--limit-test", 20, expect=2)
        bad = (export / "model.keras").resolve()
    _assert_unknown_loss_error(proc, bad)


# --------------------------------------------------------------------------- #
# Overwriting and interruption
# --------------------------------------------------------------------------- #
def test_exports_refuse_to_overwrite_without_overwrite(shared, tmp_path):
    import keras

    model = keras.saving.load_model(shared["model"])
    sm_dir = tmp_path / "sm"
    sm_dir.mkdir()
    (sm_dir / "keep.txt").write_text("previous")
    with pytest.raises(ex.ArtifactExistsError, match="already exists"):
        ex.export_savedmodel(model, sm_dir)
    assert [p.name for p in sm_dir.iterdir()] == ["keep.txt"]
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"previous")
    with pytest.raises(ex.ArtifactExistsError, match="already exists"):
        ex.export_onnx(model, onnx_path)
    assert onnx_path.read_bytes() == b"previous"
    # With overwrite=True both are replaced by working artifacts.
    ex.export_savedmodel(model, sm_dir, overwrite=True)
    assert (sm_dir / "saved_model.pb").is_file() and not (sm_dir / "keep.txt").exists()
    ex.export_onnx(model, onnx_path, overwrite=True, opset=13)
    import onnx

    assert onnx.load(str(onnx_path)).opset_import[0].version == 13
    # The export command refuses an existing directory, and with --overwrite still
    # refuses one that is not an export (it would delete the user's files).
    with pytest.raises(KerasCEError, match="already exists"):
        ex.export_model_dir(shared["model"], shared["export"], log=lambda *_: None)
    with pytest.raises(KerasCEError, match="does not look like a `keras-ce export`"):
        ex.export_model_dir(shared["model"], sm_dir, overwrite=True, log=lambda *_: None)
    with pytest.raises(KerasCEError, match="opset"):
        ex.export_model_dir(shared["model"], tmp_path / "new", opset=99)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow  # a fresh-process kill, as the slow tier's others
def test_sigkill_during_export_leaves_the_previous_export_intact(shared, cifar_dir, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(shared["export"], export)
    before = (export / "manifest.json").read_bytes()
    # A different model to export over the previous one.
    model = build_small_model(seed=1)
    model.fit(np.load(shared["x_train"]), np.load(shared["y_train"]), epochs=1, verbose=0)
    model.save(tmp_path / "model2.keras")

    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_ce_plugin.cli", "export", str(tmp_path / "model2.keras")]
        + ["--out", str(export), "--overwrite"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    deadline = time.monotonic() + 300
    partial = []
    try:
        # Kill it mid-way: its temporary directory already holds the new SavedModel,
        # the ONNX conversion is running, the manifest is not written yet.
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list(tmp_path.glob(".export.*.tmp/saved_model/saved_model.pb"))
            if partial:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and not partial:
            proc.kill()
        proc.wait(timeout=60)
    assert partial, f"the export finished (exit {proc.returncode}) before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    # The previous export is untouched, passes its hash check and verifies.
    assert (export / "manifest.json").read_bytes() == before
    assert verify_command(verify_args(export, cifar_dir, limit_test=50)) == 0
    # A new export over the previous one still works.
    manifest = ex.export_model_dir(
        tmp_path / "model2.keras", export, overwrite=True, log=lambda *_: None
    )
    assert manifest["source"]["sha256"] == sha256_file(tmp_path / "model2.keras")
    assert sha256_file(export / "model.keras") == sha256_file(tmp_path / "model2.keras")
    assert not list(tmp_path.glob(".export.*.old"))


# --------------------------------------------------------------------------- #
# int8
# --------------------------------------------------------------------------- #
def _top1_agreement(float_onnx: Path, int8_onnx: Path, images: np.ndarray) -> float:
    """Top-1 agreement of two ONNX models, measured here with ONNX Runtime directly."""
    import onnxruntime as ort

    runs = []
    for path in (float_onnx, int8_onnx):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runs.append(sess.run(["probabilities"], {"images": images})[0].argmax(-1))
    return float(np.mean(runs[0] == runs[1]))


def test_quantize_int8_is_kept_only_when_it_pays_off(shared, cifar_dir, tmp_path):
    """The recorded agreement is the real one, and kept == both thresholds met.

    The speed-up depends on the machine, so either decision may happen; what is
    checked is that the figures recorded are the measured ones, the thresholds
    recorded are the library's, and the decision and its reason follow from them.
    """
    from keras_ce_plugin.data import load_cifar10

    out = tmp_path / "q"
    manifest = ex.export_model_dir(
        shared["model"],
        out,
        formats=("onnx",),
        quantize="int8",
        data_dir=cifar_dir,
        log=lambda *_: None,
    )
    record = manifest["quantization"]
    assert record["calibration_images"] == ex.INT8_CALIBRATION_IMAGES
    assert (record["min_speedup"], record["min_agreement"]) == (
        ex.INT8_MIN_SPEEDUP,
        ex.INT8_MIN_AGREEMENT,
    )
    assert record["speedup"] == pytest.approx(
        record["int8_images_per_s"] / record["float_images_per_s"]
    )
    # The agreement figure, measured again outside quantize_int8 on the same images
    # with the same int8 model (the kept file, else a forced re-quantization with the
    # same calibration images: MinMax calibration is deterministic).
    (x_train, _), (x_test, _) = load_cifar10(cifar_dir, limit_train=ex.INT8_CALIBRATION_IMAGES)
    eval_images = np.ascontiguousarray(x_test[: ex.INT8_EVAL_IMAGES], dtype=np.float32)
    assert record["eval_images"] == len(eval_images)
    int8 = out / "model.int8.onnx"
    if not record["kept"]:
        int8 = tmp_path / "forced.int8.onnx"
        forced = ex.quantize_int8(
            out / "model.onnx", int8, x_train, eval_images, min_speedup=0, min_agreement=0
        )
        assert forced["kept"] and forced["agreement"] == record["agreement"], forced
    measured = _top1_agreement(out / "model.onnx", int8, eval_images)
    assert record["agreement"] == pytest.approx(measured, abs=1e-12), (record, measured)
    # A working quantization of this model agrees on most images (about 96% here,
    # under the 99% threshold); a broken one agrees on about 10% (chance).
    assert record["agreement"] >= 0.8, record
    fast = record["speedup"] >= record["min_speedup"]
    agrees = record["agreement"] >= record["min_agreement"]
    assert record["kept"] is (fast and agrees), record
    reasons = []
    if not fast:
        reasons.append(f"speedup {record['speedup']:.2f}x < {record['min_speedup']}x")
    if not agrees:
        reasons.append(f"top-1 agreement {record['agreement']:.4f} < {record['min_agreement']}")
    assert record["reason"] == ("; ".join(reasons) or "meets both thresholds"), record
    should_keep = record["kept"]
    assert (out / "model.int8.onnx").is_file() is should_keep
    assert ("onnx_int8" in manifest["formats"]) is should_keep
    assert ("model.int8.onnx" in manifest["files"]) is should_keep
    assert manifest["formats"][:2] == ["keras", "onnx"] and not (out / "saved_model").exists()
    with pytest.raises(KerasCEError, match="add onnx to `--formats`"):
        ex.export_model_dir(
            shared["model"], tmp_path / "x", formats=("savedmodel",), quantize="int8"
        )


def test_verify_judges_an_int8_model_by_top1_agreement(shared, cifar_dir, tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(shared["export"], export)
    # Force-keep an int8 model whatever it measures, then list it in the manifest.
    record = ex.quantize_int8(
        export / "model.onnx",
        export / "model.int8.onnx",
        np.load(shared["x_train"])[:128],
        np.load(shared["x_test"]),
        min_speedup=0.0,
        min_agreement=0.0,
    )
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["formats"].append("onnx_int8")
    manifest["artifacts"]["onnx_int8"] = "model.int8.onnx"
    manifest["quantization"] = record
    manifest["files"]["model.int8.onnx"] = {
        "sha256": sha256_file(export / "model.int8.onnx"),
        "bytes": (export / "model.int8.onnx").stat().st_size,
    }
    (export / "manifest.json").write_text(json.dumps(manifest))
    rc = verify_command(verify_args(export, cifar_dir))
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("onnx_int8"))
    agreement = float(row[4].rstrip("%")) / 100
    # verify uses the same images as quantize_int8 measured on: the same agreement.
    assert agreement == pytest.approx(record["agreement"], abs=1e-9), (row, record)
    assert float(row[3]) > ATOL  # lossy, reported but not judged by atol
    assert (rc == 0) is (agreement >= ex.INT8_MIN_AGREEMENT), out
    assert (row[-1] == "ok") is (agreement >= ex.INT8_MIN_AGREEMENT), out

"""``keras-ce export``/``verify``/``predict`` flags through the command, in fresh processes.

One tiny model, compiled by string with ``"my_losses>Focal"`` (a loss registered
by a small module written to a temporary folder, not by this plugin), is exported
once with ``--import my_losses.py --formats onnx --opset 13`` and shared by the
module: ``--import`` (issue 13), ``--opset``, ``--top-k``, tiny images, and an
``--out`` that cannot be written (issue 14).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export import cli

from keras_ce_plugin.cli import main

OPSET = 13
LOSS = "my_losses>Focal"
MY_LOSSES = """\
import keras


@keras.saving.register_keras_serializable(package="my_losses")
class Focal(keras.losses.Loss):
    def __init__(self, gamma=2.0, name="focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.gamma = gamma

    def call(self, y_true, y_pred):
        p = keras.ops.clip(y_pred, 1e-7, 1.0)
        return keras.ops.sum(-y_true * (1.0 - p) ** self.gamma * keras.ops.log(p), axis=-1)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}
"""


def _save_model_compiled_with_my_loss(path: Path) -> None:
    """A tiny model compiled by string with ``my_losses>Focal``, saved to ``path``.

    The name is registered only while compiling and saving, so this process (and
    the tests after it) never sees ``my_losses`` registered.
    """
    import keras

    @keras.saving.register_keras_serializable(package="my_losses", name="Focal")
    class _Focal(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return keras.losses.categorical_crossentropy(y_true, y_pred)

    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(4, 3, activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile(optimizer="adam", loss=LOSS)
        model.save(path)
    finally:
        keras.saving.get_custom_objects().pop(LOSS, None)


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("keras-ce: warning:")]


def loss_warnings(stderr: str) -> list[str]:
    return [line for line in warning_lines(stderr) if LOSS in line]


@pytest.fixture(scope="module")
def my_export(tmp_path_factory) -> dict:
    """``my_losses.py``, ``model.keras`` (compiled with its loss), a 32x32 and a 1x1
    PNG, and the export written by ``keras-ce export --import my_losses.py``."""
    d = tmp_path_factory.mktemp("my_losses")
    (d / "my_losses.py").write_text(MY_LOSSES)
    _save_model_compiled_with_my_loss(d / "model.keras")
    config = json.loads(zipfile.ZipFile(d / "model.keras").read("config.json"))
    assert config["compile_config"]["loss"] == LOSS
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / "img.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(d / "tiny.png")
    proc = cli(
        "export",
        d / "model.keras",
        "--out",
        d / "export",
        "--formats",
        "onnx",
        "--opset",
        OPSET,
        "--import",
        d / "my_losses.py",
    )
    return {"dir": d, "export": d / "export", "proc": proc}


# --------------------------------------------------------------------------- #
# --import (issue 13)
# --------------------------------------------------------------------------- #
def test_export_with_import_loads_the_loss_without_a_warning(my_export):
    proc = my_export["proc"]
    assert warning_lines(proc.stderr) == [], proc.stderr
    assert "Traceback" not in proc.stderr
    manifest = json.loads((my_export["export"] / "manifest.json").read_text())
    assert manifest["formats"] == ["keras", "onnx"]


def test_opset_flag_sets_the_opset_of_the_written_onnx(my_export):
    import onnx

    proto = onnx.load(str(my_export["export"] / "model.onnx"))
    default_domain = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert default_domain == [OPSET]
    manifest = json.loads((my_export["export"] / "manifest.json").read_text())
    assert manifest["onnx"]["opset"] == OPSET


@pytest.mark.parametrize("with_import", [True, False], ids=["import", "no-import"])
def test_verify_passes_imports_to_its_keras_process(my_export, cifar_dir, with_import):
    imports = ["--import", my_export["dir"] / "my_losses.py"] if with_import else []
    proc = cli("verify", my_export["export"], "--data-dir", cifar_dir, "--limit-test", 20, *imports)
    assert "OK: every artifact matches the Keras model" in proc.stdout
    assert "Traceback" not in proc.stderr
    if with_import:
        assert warning_lines(proc.stderr) == [], proc.stderr
    else:  # the fresh Keras process loads it for inference; its warning is relayed once
        (line,) = warning_lines(proc.stderr)
        assert LOSS in line and "--import MODULE" in line, line
        assert str((my_export["export"] / "model.keras").resolve()) in line, line


def test_predict_without_import_warns_once_upscales_tiny_images_and_prints_top_k(my_export):
    """One subprocess for three things: the loss warning, the 1x1 PNG, ``--top-k``."""
    d = my_export["dir"]
    tiny, img = d / "tiny.png", d / "img.png"
    proc = cli("predict", d / "model.keras", tiny, img, "--top-k", 4)
    assert "Traceback" not in proc.stderr
    (loss_line,) = loss_warnings(proc.stderr)
    assert "loaded for inference without its loss" in loss_line, loss_line
    assert "--import MODULE" in loss_line and str(d / "model.keras") in loss_line, loss_line
    tiny_lines = [line for line in warning_lines(proc.stderr) if "pixels" in line]
    assert tiny_lines == [f"keras-ce: warning: {tiny} is 1x1 pixels; upscaled to 32x32."]
    rows = proc.stdout.strip().splitlines()
    assert [row.split()[0] for row in rows] == [str(tiny), str(img)]
    for row in rows:
        ranked = row.split("  ", 1)[1].split(", ")
        assert len(ranked) == 4, row


def test_a_bad_import_is_one_line_error(my_export, capsys):
    d = my_export["dir"]
    argv = ["predict", str(d / "model.keras"), str(d / "img.png")]
    assert main([*argv, "--import", "no_such_module_xyz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keras-ce: error: --import no_such_module_xyz: cannot import"), err
    assert "\n" not in err
    assert main([*argv, "--import", str(d / "nope.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"keras-ce: error: --import {d / 'nope.py'}: {d / 'nope.py'} is not a file."


# --------------------------------------------------------------------------- #
# --out that cannot be written (issue 14)
# --------------------------------------------------------------------------- #
def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create a directory in."""
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    # Root ignores permission bits: a pseudo file system refuses new directories.
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            os.rmdir(tempfile.mkdtemp(dir=candidate))
        except OSError:
            return candidate
    pytest.skip("no directory here refuses root a new directory")


@pytest.mark.parametrize("case", ["existing-file", "under-a-file", "no-permission"])
def test_export_refuses_an_out_it_cannot_write_up_front(my_export, tmp_path, case):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    if case == "existing-file":
        out, cause = afile, f"`--out` {afile} is an existing file"
    elif case == "under-a-file":
        out, cause = afile / "sub" / "out", f"{afile} is a file, so no directory can be created"
    else:
        parent = _unwritable_dir(tmp_path)
        out, cause = parent / "new" / "out", f"cannot create a directory in {parent} ("
    before = sorted(tmp_path.rglob("*"))
    # The model would warn if loaded (no --import): no warning proves nothing was loaded.
    proc = cli("export", my_export["dir"] / "model.keras", "--out", out, expect=2)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("keras-ce:")]
    assert len(lines) == 1 and lines[0].startswith("keras-ce: error: "), proc.stderr
    assert cause in lines[0] and str(out) in lines[0], lines[0]
    assert "Exporting" not in proc.stdout
    assert sorted(tmp_path.rglob("*")) == before
    assert afile.read_text() == "keep me"
    assert out == afile or not out.exists()


def test_out_check_is_in_the_library():
    from keras_ce_plugin import KerasCEError
    from keras_ce_plugin._writable import check_writable_dir

    with pytest.raises(KerasCEError, match=r"^`--model-dir` /dev/null is an existing file"):
        check_writable_dir(Path("/dev/null"), flag="--model-dir")

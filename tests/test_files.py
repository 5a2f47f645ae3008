"""Atomic writes: complete artifacts at every instant, no stale temporaries, sane modes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from keras_ce_plugin import files as kio


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_path_replaces_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "a.bin"
    kio.write_bytes(target, b"old")
    kio.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_path_failure_keeps_previous(tmp_path):
    target = tmp_path / "a.json"
    kio.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), kio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("use_exchange", [True, False])
def test_atomic_dir_swaps_directories(tmp_path, monkeypatch, use_exchange):
    if not use_exchange:
        monkeypatch.setattr(kio, "_exchange", lambda a, b: False)
    target = tmp_path / "export"
    with kio.atomic_dir(target) as d:
        (d / "v").write_text("1")
    with pytest.raises(FileExistsError):
        with kio.atomic_dir(target):
            pass
    with kio.atomic_dir(target, overwrite=True) as d:
        (d / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_exchange_is_available_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux-only")
    assert kio._exchange(a, b)
    assert (a.read_text(), b.read_text()) == ("b", "a")


def test_modes_follow_umask(tmp_path):
    mask = os.umask(0o022)
    try:
        kio.write_bytes(tmp_path / "f", b"x")
        with kio.atomic_dir(tmp_path / "d") as d:
            (d / "g").write_text("y")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "export"
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".export.{dead}.abc123.tmp").mkdir()
    (tmp_path / f".model.keras.{dead}.x1.tmp.keras").write_text("half")
    (tmp_path / f".export.{alive}.def456.tmp").mkdir()
    (tmp_path / "unrelated").write_text("keep")
    with kio.atomic_dir(target) as d:
        (d / "v").write_text("1")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert f".export.{dead}.abc123.tmp" not in names
    assert f".export.{alive}.def456.tmp" in names  # a live writer's work is untouched
    assert "unrelated" in names and "export" in names
    kio.write_bytes(tmp_path / "model.keras", b"k")
    assert not (tmp_path / f".model.keras.{dead}.x1.tmp.keras").exists()


def test_interrupted_swap_is_restored(tmp_path):
    target = tmp_path / "export"
    old = tmp_path / f".export.{_dead_pid()}.zz9.old"
    old.mkdir()
    (old / "v").write_text("previous")
    kio.clean_stale(target)
    assert (target / "v").read_text() == "previous"
    assert not old.exists()


def _tiny_lm_file(tmp_path, loss):
    """A saved ``LinearCEModel`` (tied head) compiled with ``loss``: its config names
    ``customloss>LinearCEModel`` and, through ``loss``, ``customloss>LinearCE``."""
    import keras

    from keras_ce_plugin import LinearCEModel

    keras.utils.set_random_seed(0)
    tokens = keras.Input((4,), dtype="int32")
    emb = keras.layers.ReversibleEmbedding(11, 3, name="token_embedding")
    backbone = keras.Model(tokens, emb(tokens))
    model = LinearCEModel(backbone, head=emb)
    model.compile("adam", loss=loss)
    model.build((None, 4))
    path = tmp_path / "lm.keras"
    model.save(path)
    return path


def test_loader_takes_every_class_the_plugin_registers(tmp_path):
    """The loader asks Keras' registry: LinearCE, LinearCEModel (and TokenAccuracy,
    which the model tracks) load like the losses do."""
    import json
    import zipfile

    from keras_ce_plugin import LinearCE, LinearCEModel

    path = _tiny_lm_file(tmp_path, LinearCE())
    with zipfile.ZipFile(path) as z:
        text = z.read("config.json").decode()
    assert '"customloss>LinearCEModel"' in text and '"customloss>LinearCE"' in text
    model = kio.load_keras_model(path)
    assert isinstance(model, LinearCEModel) and isinstance(model.loss, LinearCE)
    assert json.loads(text)["registered_name"] == "customloss>LinearCEModel"


@pytest.mark.parametrize("where", ["loss", "class"])
def test_loader_refuses_an_unknown_plugin_name_in_one_line(tmp_path, where):
    import json
    import zipfile

    from keras_ce_plugin import LinearCE
    from keras_ce_plugin.errors import KerasCEError

    path = _tiny_lm_file(tmp_path, LinearCE())
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    config = json.loads(members["config.json"])
    if where == "loss":
        config["compile_config"]["loss"]["registered_name"] = "customloss>LinearCEv2"
    else:
        config["registered_name"] = "customloss>LinearCEv2"
    members["config.json"] = json.dumps(config).encode()
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(KerasCEError) as err:
        kio.load_keras_model(bad)
    message = str(err.value)
    assert "\n" not in message
    assert "uses 'customloss>LinearCEv2', which keras_ce_plugin" in message
    assert "customloss>LinearCEModel" in message  # the registered names it lists

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

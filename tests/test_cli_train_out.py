"""``keras-ce train`` / ``compare`` refuse an ``--out`` they cannot write: up front, in
one line naming the path and the cause, leaving nothing behind (the ``keras-ce``
command in a subprocess)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_cli_train import cli

# Under /proc nobody (root included) can create a directory.
UNWRITABLE = Path("/proc/keras-ce-test-out")


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize(
    "case,cause",
    [
        ("existing-file", "is an existing file"),
        ("under-a-file", "is a file, so no directory can be created under it"),
        ("unwritable-dir", "cannot create a directory in /proc"),
    ],
)
def test_out_that_cannot_be_written(cifar_dir, tmp_path, command, case, cause):
    if case == "unwritable-dir" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    out = {
        "existing-file": blocker,
        "under-a-file": blocker / "run",
        "unwritable-dir": UNWRITABLE / "run",
    }[case]
    # A missing --data-dir too: --out is checked before any data is looked at.
    proc = cli(command, "--data-dir", str(tmp_path / "no-data"), "--weights", "none",
               "--out", str(out))  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("keras-ce: error:")]
    assert len(errors) == 1, proc.stderr
    assert f"`--out` {out}" in errors[0] and cause in errors[0]
    # Nothing half-written.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert blocker.read_text() == "keep me"
    assert not os.path.lexists(UNWRITABLE)

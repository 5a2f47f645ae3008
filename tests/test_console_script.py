"""The installed ``keras-ce`` console script (``keras_ce_cli.py``): a command's
standard error holds its own lines only, none of TensorFlow's start-up notices.

The script is the one README command 1 installs (CI runs that command), so a missing
script fails here rather than skipping. The control is ``python -m
keras_ce_plugin.cli``, the same commands without the entry point: whatever it writes
to standard error beyond TensorFlow's notices, the script writes too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from keras_ce_cli import tensorflow_notices_dropped

SCRIPT = Path(sys.executable).with_name("keras-ce")


def _run(argv: list[str], cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(env_vars)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_an_error_is_the_only_line_on_stderr(tmp_path):
    args = ["predict", "model.keras", "missing.png"]
    assert SCRIPT.exists(), f"{SCRIPT} is missing: install with README command 1"
    proc = _run([str(SCRIPT), *args], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-ce: error: "), proc.stderr
    assert proc.stdout == ""
    # The control, without the entry point but with the log level it sets: the same
    # error line, beside whatever TensorFlow printed on loading (notices only: nothing
    # else is dropped).
    control = _run(
        [sys.executable, "-m", "keras_ce_plugin.cli", *args], tmp_path, TF_CPP_MIN_LOG_LEVEL="3"
    )
    assert control.returncode == 2
    assert tensorflow_notices_dropped(control.stderr) == proc.stderr


def test_a_successful_command_writes_nothing_to_stderr(tmp_path):
    proc = _run(
        [str(SCRIPT), "check-loss", "customloss>CategoricalCE", "--checks", "config_roundtrip"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout and proc.stderr == "", proc.stderr

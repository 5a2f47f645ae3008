"""``keras-ce check-loss`` through the real command, in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

TUTORIAL = str(REPO / "examples" / "your_own_loss" / "tutorial_loss.py")
FIXED = str(REPO / "examples" / "your_own_loss" / "fixed_loss.py")


def _keras_ce(*argv: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "keras_ce_plugin.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_check_loss_reports_each_target_and_fails_on_a_broken_one():
    """The plugin's own loss passes, the tutorial's fails: exit 1, both reports in JSON."""
    proc = _keras_ce(
        "check-loss", "customloss>CategoricalCE", f"{TUTORIAL}:Custom_CE_Loss", "--json"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    reports = json.loads(proc.stdout)
    assert [r["ok"] for r in reports] == [True, False], proc.stdout
    plugin, tutorial = ({c["check"]: c["result"] for c in r["checks"]} for r in reports)
    assert set(plugin.values()) <= {"passed", "skipped"}, plugin
    for check in ("registered", "config_roundtrip", "sample_weight", "finite", "backends"):
        assert tutorial[check] == "failed", (check, tutorial)


def test_check_loss_table_and_exit_0_when_every_check_passes():
    """A user's registered loss, by its P>N name after --import of its file."""
    proc = _keras_ce("check-loss", "my_losses>CategoricalCrossEntropy", "--import", FIXED)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("check_loss(CategoricalCrossEntropy"), lines[:2]
    assert lines[1].split() == ["check", "result", "reason"], lines[:2]
    assert lines[-1].startswith("OK: "), lines[-1]


def test_check_loss_unknown_target_is_one_line_exit_2(tmp_path):
    for target in ("no_such_pkg>Nope", "no_such_module_xyz:Loss", f"{tmp_path}/missing.py:Loss"):
        proc = _keras_ce("check-loss", target, cwd=tmp_path)
        assert proc.returncode == 2, (target, proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("keras-ce: error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert target.split(":")[0].split(">")[0] in errors[0], errors[0]


USER_SPARSE = """
import keras
from keras import ops


class UserSparse(keras.losses.Loss):
    def call(self, y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        picked = ops.take_along_axis(y_pred, labels[:, None], axis=-1)[:, 0]
        return -ops.log(ops.clip(picked, 1e-7, 1.0))
"""


def test_without_targets_known_losses_get_their_labels_and_others_a_hint(tmp_path):
    """No --targets: LinearCE (sparse, as the model table's check-loss cell runs it) passes;
    an unknown loss that raises on one-hot labels fails with a one-line hint naming the
    flag."""
    user = tmp_path / "user_sparse.py"
    user.write_text(USER_SPARSE)
    checks = "output_shape,shapes,reduction"
    proc = _keras_ce(
        "check-loss", "customloss>LinearCE", f"{user}:UserSparse", "--checks", checks, "--json"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    linear, mine = json.loads(proc.stdout)
    assert linear["ok"] and linear["hint"] == "", linear
    assert not mine["ok"] and "--targets sparse" in mine["hint"], mine
    text = _keras_ce("check-loss", f"{user}:UserSparse", "--checks", checks)
    hints = [line for line in text.stdout.splitlines() if line.startswith("hint: ")]
    assert text.returncode == 1 and len(hints) == 1 and "--targets sparse" in hints[0], text.stdout


def test_targets_flag_through_the_command():
    """--targets sparse: integer labels, which the sparse loss takes and the one-hot
    loss does not (so the flag reached the checks)."""
    checks = "output_shape,shapes,reduction"
    proc = _keras_ce(
        "check-loss",
        "customloss>SparseCategoricalCE",
        "customloss>CategoricalCE",
        "--targets",
        "sparse",
        "--checks",
        checks,
        "--json",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    sparse, onehot = (
        {c["check"]: c["result"] for c in r["checks"]} for r in json.loads(proc.stdout)
    )
    assert sparse == dict.fromkeys(checks.split(","), "passed"), sparse
    assert "failed" in onehot.values(), onehot


def test_expected_failed_flag_through_the_command():
    """xfailed where the check fails; xpassed (exit 1) where it passes."""
    proc = _keras_ce(
        "check-loss",
        f"{TUTORIAL}:Custom_CE_Loss",
        f"{FIXED}:CategoricalCrossEntropy",
        "--checks",
        "finite",
        "--expected-failed",
        "finite=log(0) at probability 0",
        "--json",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    tutorial, fixed = (r["checks"][0] for r in json.loads(proc.stdout))
    assert tutorial["result"] == "xfailed", tutorial
    assert tutorial["reason"].startswith("expected to fail: log(0) at probability 0 ("), tutorial
    assert fixed["result"] == "xpassed", fixed
    assert fixed["fix"] == "remove it from expected_failed_checks", fixed


def test_check_loss_unknown_check_is_one_line_exit_2():
    proc = _keras_ce("check-loss", "customloss>CategoricalCE", "--checks", "nope")
    assert proc.returncode == 2 and "Unknown loss check 'nope'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_loss_on_a_keras_identifier_is_one_line_exit_2():
    """`--loss` takes Keras identifiers; check-loss says what it takes instead of a traceback."""
    proc = _keras_ce("check-loss", "categorical_crossentropy")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("keras-ce: error:")]
    assert len(lines) == 1 and "categorical_crossentropy" in lines[0], proc.stderr
    assert "keras.losses:CategoricalCrossentropy" in lines[0]
    assert "Traceback" not in proc.stderr

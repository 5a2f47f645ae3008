"""``keras-ce train`` / ``compare`` with ``--loss TARGET`` and ``--import MODULE``, an
interrupted run's resume hint, through the ``keras-ce`` command (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import run_python
from test_cli_train import PNG_MAGIC, cli, keras_ce

from keras_ce_plugin.training import CHECKPOINT_FILE, RUN_FILES

MY_LOSSES = textwrap.dedent(
    """
    import keras
    from keras import ops


    @keras.saving.register_keras_serializable(package="my_losses")
    class Focal(keras.losses.Loss):
        def __init__(self, gamma=2.0, name="focal", **kwargs):
            super().__init__(name=name, **kwargs)
            self.gamma = gamma

        def call(self, y_true, y_pred):
            p = ops.clip(y_pred, 1e-7, 1.0 - 1e-7)
            return -ops.sum(y_true * (1.0 - p) ** self.gamma * ops.log(p), axis=-1)

        def get_config(self):
            return {**super().get_config(), "gamma": self.gamma}
    """
)


def tiny(cifar_dir: Path, epochs: int = 1) -> list[str]:
    return [
        "--data-dir", str(cifar_dir), "--weights", "none", "--limit-train", "64",
        "--limit-test", "32", "--epochs", str(epochs),
    ]  # fmt: skip


def cli_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [*keras_ce(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``keras-ce: error:`` line of a refused command (and no traceback)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("keras-ce: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working directory with ``tmp/my_losses.py`` (registers ``my_losses>Focal``)."""
    root = tmp_path_factory.mktemp("user-loss")
    (root / "tmp").mkdir()
    (root / "tmp" / "my_losses.py").write_text(MY_LOSSES)
    return root


def reload_loss(model_path: Path, module_file: Path) -> str:
    """``model.loss`` of the saved model, loaded in a fresh process after importing the
    module that registers the loss."""
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        import keras
        import keras_ce_plugin  # noqa: F401
        spec = importlib.util.spec_from_file_location("my_losses", {str(module_file)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["my_losses"] = module
        spec.loader.exec_module(module)
        model = keras.models.load_model({str(model_path)!r})
        print("LOSS", model.get_compile_config()["loss"],
              type(keras.losses.get(model.loss)).__name__)
        """
    )
    return run_python(code).stdout.split("LOSS ")[-1].strip()


@pytest.mark.parametrize(
    "flags",
    [
        ["--loss", "my_losses>Focal", "--import", "tmp/my_losses.py"],
        ["--loss", "tmp/my_losses.py:Focal"],
    ],
    ids=["registered-name", "file-attr"],
)
def test_train_with_a_user_loss(cifar_dir, work, flags):
    out = work / ("run-" + flags[1].replace("/", "_").replace(">", "_"))
    proc = cli_in(work, "train", *tiny(cifar_dir), *flags, "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    arguments = metrics["arguments"]
    module_file = work / "tmp" / "my_losses.py"
    assert metrics["loss"] == arguments["loss_identifier"] == "my_losses>Focal"
    assert arguments["loss_module"] == "my_losses"
    if "--import" in flags:  # recorded with absolute paths: --resume works from anywhere
        assert arguments["imports"] == [str(module_file)]
        assert arguments["loss"] == "my_losses>Focal"
    else:
        assert arguments["imports"] == []
        assert arguments["loss"] == f"{module_file}:Focal"
    # Compiled with the registered name: the saved model finds the loss by it.
    assert reload_loss(out / "model.keras", module_file) == "my_losses>Focal Focal"


def test_compare_with_a_user_loss_reports_both_without_a_verdict(cifar_dir, work):
    out = work / "cmp"
    proc = cli_in(
        work, "compare", *tiny(cifar_dir), "--loss", "my_losses>Focal",
        "--import", "tmp/my_losses.py", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no verdict" in proc.stdout and "AGREE" not in proc.stdout
    summary = json.loads((out / "compare.json").read_text())
    assert summary["losses"]["custom"] == "my_losses>Focal"
    assert summary["tolerance"] is None and summary["agree"] is None
    assert summary["arguments"]["loss_identifier"] == "my_losses>Focal"
    report = (out / "report.md").read_text()
    assert "# my_losses>Focal vs keras.losses.CategoricalCrossentropy()" in report
    accuracy = summary["test_accuracy"]
    row = [line for line in report.splitlines() if line.startswith("| test accuracy |")]
    assert row == [
        f"| test accuracy | {accuracy['custom']:.4f} | {accuracy['builtin']:.4f} | "
        f"{abs(accuracy['custom'] - accuracy['builtin']):.2e} |"
    ]
    assert "## Differences" in report and "No verdict" in report
    assert "**AGREE**" not in report and "**DIFFER**" not in report
    assert "## Verdict" not in report
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "command,flags,message",
    [
        ("train", ["--loss", "tmp/nope.py:Focal"], "nope.py is not a file"),
        ("train", ["--loss", "my_losses>Nope"], "--loss my_losses>Nope"),
        ("train", ["--loss", "tmp/my_losses.py:Nope"], "has no attribute 'Nope'"),
        ("compare", ["--import", "no_such_module_xyz"], "--import no_such_module_xyz"),
    ],
)
def test_a_bad_target_exits_2_with_one_line(cifar_dir, work, command, flags, message):
    out = work / f"bad-{command}"
    line = one_error_line(cli_in(work, command, *tiny(cifar_dir), *flags, "--out", str(out)))
    assert message in line
    assert not out.exists()


def start_killable(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [*keras_ce(), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_at(proc: subprocess.Popen, marker: str) -> str:
    """Reads ``proc``'s output line by line until ``marker`` appears, then SIGKILLs it."""
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
        else:
            raise AssertionError(f"never saw {marker!r}:\n{''.join(lines)[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
    return "".join(lines)


@pytest.mark.slow
def test_killed_run_offers_resume_and_resume_reimports_the_loss(cifar_dir, work, tmp_path):
    out = tmp_path / "killed"
    proc = start_killable(
        work, "train", *tiny(cifar_dir, epochs=3), "--loss", "tmp/my_losses.py:Focal",
        "--checkpoint-every", "1", "--out", str(out),
    )  # fmt: skip
    # Observable state: the epoch-1 checkpoint is written (the line follows the write).
    output = kill_at(proc, "checkpoint: epoch 1 ->")
    assert proc.returncode == -signal.SIGKILL, output
    assert (out / CHECKPOINT_FILE).is_file()

    again = cli("train", *tiny(cifar_dir, epochs=3), "--out", str(out))
    line = one_error_line(again)
    assert "after epoch 1 of 3 of an interrupted run (written 20" in line
    assert f"keras-ce train --resume {out}" in line and "--overwrite" in line
    assert line.index("--resume") < line.index("--overwrite")  # resume is offered first
    assert (out / CHECKPOINT_FILE).is_file()  # nothing touched

    # From another directory: the run's recorded (absolute) loss file is imported again.
    resumed = cli_in(tmp_path, "train", "--resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert {p.name for p in out.iterdir()} == set(RUN_FILES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_after_epoch"] == 1 and metrics["epochs"] == 3
    assert metrics["arguments"]["loss_identifier"] == "my_losses>Focal"
    assert reload_loss(out / "model.keras", work / "tmp" / "my_losses.py") == (
        "my_losses>Focal Focal"
    )

"""``keras-ce train`` / ``keras-ce compare`` end to end, in real subprocesses."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, run_python

from keras_ce_plugin.cli import main
from keras_ce_plugin.files import LOCK_FILE, run_lock
from keras_ce_plugin.training import CHECKPOINT_FILE, RUN_FILES, load_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TRAIN, N_TEST, EPOCHS = 128, 64, 2


def keras_ce() -> list[str]:
    """The installed console script, else the module."""
    script = Path(sys.executable).with_name("keras-ce")
    return [str(script)] if script.exists() else [sys.executable, "-m", "keras_ce_plugin.cli"]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [*keras_ce(), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def small_flags(cifar_dir: Path) -> list[str]:
    return [
        "--data-dir",
        str(cifar_dir),
        "--weights",
        "none",
        "--limit-train",
        str(N_TRAIN),
        "--limit-test",
        str(N_TEST),
        "--epochs",
        str(EPOCHS),
        "--seed",
        "5",
    ]


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory):
    """A non-empty --out is refused; with --overwrite the run writes its artifacts there."""
    out = tmp_path_factory.mktemp("cli") / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused = cli("train", *small_flags(cifar_dir), "--out", str(out))
    done = cli("train", *small_flags(cifar_dir), "--out", str(out), "--overwrite")
    assert done.returncode == 0, done.stdout + done.stderr
    return out, refused, done


def test_non_empty_out_dir_is_refused(run):
    out, refused, _ = run
    assert refused.returncode == 2
    err = " ".join(refused.stderr.split())
    assert "is not empty (notes.txt)" in err and "--overwrite" in err
    assert "Traceback" not in refused.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_run_writes_its_artifacts(run):
    out, _, done = run
    names = {p.name for p in out.iterdir()}
    assert {"model.keras", "history.json", "metrics.json", "curves.png"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary file left behind
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    history = json.loads((out / "history.json").read_text())
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == EPOCHS for v in history.values())
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "test_loss",
        "test_accuracy",
        "wall_time_s",
        "images_per_s",
        "versions",
        "arguments",
        "validation",
        "timings_s",
    ):
        assert key in metrics, key
    assert metrics["test_loss"] == history["val_loss"][-1]
    assert metrics["test_accuracy"] == history["val_accuracy"][-1]
    assert metrics["num_train"] == N_TRAIN and metrics["num_test"] == N_TEST
    assert metrics["feature_cache"] is True
    assert metrics["arguments"]["limit_train"] == N_TRAIN
    assert metrics["arguments"]["loss"] == "customloss>CategoricalCE"
    assert {"keras", "tensorflow", "keras_ce_plugin"} <= set(metrics["versions"])
    assert 0 < metrics["wall_time_s"] and metrics["images_per_s"] > 0
    assert "test split" in metrics["validation"]
    # The base, said plainly: a random He-initialised base, standardised, at lr 1e-4.
    assert metrics["base"] == {
        "weights": "random (He-initialised)",
        "trainable": False,
        "feature_standardization": True,
        "learning_rate": 1e-4,
    }
    assert "random, frozen VGG16 base" in metrics["expectation"]
    assert metrics["arguments"]["learning_rate"] is None  # the default, resolved above
    assert "base: random (He-initialised), frozen; features standardised" in done.stderr
    # Progress: tqdm for the features, Keras' bar for the epochs, a summary line.
    assert "VGG16 features" in done.stderr
    assert f"Epoch {EPOCHS}/{EPOCHS}" in done.stdout
    assert "test accuracy" in done.stdout


def test_log_output_has_one_line_per_epoch(run):
    """Not a terminal (a pipe): no carriage returns or terminal codes, one line an epoch."""
    _, _, done = run
    for text in (done.stdout, done.stderr):
        assert "\r" not in text and "\x1b[" not in text
    epochs = [line for line in done.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" - ")[0] for line in epochs] == [
        f"Epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)
    ]
    assert all(" - val_accuracy: " in line and line.endswith(" s") for line in epochs)


def test_model_reloads_in_a_fresh_process(run, cifar_dir):
    out, _, _ = run
    metrics = json.loads((out / "metrics.json").read_text())
    code = textwrap.dedent(
        f"""
        import json
        import keras
        import keras_ce_plugin
        from keras_ce_plugin.data import load_cifar10

        model = keras.models.load_model({str(out / "model.keras")!r}, safe_mode=True)
        assert model.loss == "customloss>CategoricalCE", model.loss
        norm = model.get_layer("feature_standardization")
        assert isinstance(norm, keras.layers.Normalization) and not norm.trainable
        assert len(norm.get_config()["mean"]) == 512 and not norm.weights
        assert isinstance(keras.losses.get(model.loss), keras_ce_plugin.CategoricalCE)
        assert type(model.optimizer) is keras.optimizers.Adam, model.optimizer
        _, (x, y) = load_cifar10({str(cifar_dir)!r}, limit_test={N_TEST})
        loss, acc = model.evaluate(x, y, batch_size=32, verbose=0)
        print(json.dumps({{"loss": loss, "accuracy": acc,
                          "iterations": int(model.optimizer.iterations),
                          "layers": [l.name for l in model.layers]}}))
        """
    )
    got = json.loads(run_python(code).stdout.strip().splitlines()[-1])
    assert abs(got["loss"] - metrics["test_loss"]) <= 1e-5
    assert abs(got["accuracy"] - metrics["test_accuracy"]) <= 1e-6
    assert got["iterations"] == EPOCHS * -(-N_TRAIN // 32)
    assert got["layers"] == [
        "vgg16",
        "feature_standardization",
        "flatten",
        "fc1",
        "dropout1",
        "fc2",
        "dropout2",
        "predictions",
    ]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--data-dir", "{tmp}/nowhere"], "does not exist"),
        (["--loss", "customloss>Nope"], "Unknown loss"),
        (["--weights", "{tmp}/vgg16.weights.h5"], "does not exist"),
        (["--limit-train", "999999"], "asks for more images"),
        (["--learning-rate", "-1"], "learning_rate"),
        (["--devices", "2"], "needs --strategy mirrored"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph(cifar_dir, tmp_path, capsys, flags, message):
    args = ["train", *small_flags(cifar_dir)]
    flags = [f.format(tmp=tmp_path) for f in flags]
    for i in range(0, len(flags), 2):  # replace a flag given by small_flags, or add it
        if flags[i] in args:
            args[args.index(flags[i]) + 1] = flags[i + 1]
        else:
            args += flags[i : i + 2]
    out = tmp_path / "run"
    assert main([*args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-ce: error: ") and message in " ".join(err.split())
    assert "\n\n" not in err.strip() and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_compare_on_a_tiny_run(cifar_dir, tmp_path):
    out = tmp_path / "cmp"
    flags = small_flags(cifar_dir)
    flags[flags.index("--limit-train") + 1] = "64"
    flags[flags.index("--limit-test") + 1] = "32"
    proc = cli("compare", *flags, "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "AGREE" in proc.stdout and "Epoch" not in proc.stdout  # --quiet: no bars
    summary = json.loads((out / "compare.json").read_text())
    custom, builtin = summary["history"]["custom"], summary["history"]["builtin"]
    assert summary["losses"] == {
        "custom": "customloss>CategoricalCE",
        "builtin": "keras.losses.CategoricalCrossentropy()",
    }
    assert custom["loss"][0] != custom["loss"][-1]
    worst = 0.0
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        diffs = [abs(a - b) for a, b in zip(custom[key], builtin[key])]
        assert summary["abs_diff"][key] == pytest.approx(diffs, abs=0)
        worst = max(worst, *diffs)
    assert summary["max_abs_diff_overall"] == worst <= summary["tolerance"] == 1e-5
    assert summary["agree"] is True
    # The base is named; the first epoch's difference stands beside the largest.
    assert summary["base"]["weights"] == "random (He-initialised)"
    assert summary["base"]["feature_standardization"] is True
    assert summary["learning_rate"] == summary["base"]["learning_rate"] == 1e-4
    first = max(v[0] for v in summary["abs_diff"].values())
    assert summary["first_epoch_max_abs_diff"] == first
    assert "first epoch" in proc.stdout
    sha = summary["initial_weights_sha256"]
    assert sha["custom"] == sha["builtin"]
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "## What was measured" in report and "**AGREE**" in report
    assert "base: random (He-initialised), frozen" in report
    assert f"First epoch: {first:.3e}." in report
    assert summary["drift_note"] in report and "like-for-like" in summary["drift_note"]
    rows = [line for line in report.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1 and "| 2 |" in report and "| 3 |" not in report
    assert f"{summary['test_accuracy']['custom']:.4f}" in report


def test_compare_verdict_follows_the_tolerance(cifar_dir, tmp_path, capsys):
    """A tolerance of 0 demands bitwise-equal curves; the verdict and exit status say so."""
    flags = small_flags(cifar_dir)
    flags[flags.index("--limit-train") + 1] = "32"
    flags[flags.index("--limit-test") + 1] = "16"
    flags[flags.index("--epochs") + 1] = "1"
    out = tmp_path / "cmp"
    status = main(["compare", *flags, "--out", str(out), "--quiet", "--tolerance", "0"])
    summary = json.loads((out / "compare.json").read_text())
    exact = summary["max_abs_diff_overall"] == 0.0
    assert summary["agree"] is exact and status == (0 if exact else 1)
    assert ("AGREE" if exact else "DIFFER") in capsys.readouterr().out
    shutil.rmtree(out)


# --------------------------------------------------------------------------- #
# Interrupted and concurrent runs
# --------------------------------------------------------------------------- #
RESUME_TRAIN, RESUME_TEST, RESUME_EPOCHS = 128, 32, 3


def resume_flags(cifar_dir: Path) -> list[str]:
    flags = small_flags(cifar_dir)
    for flag, value in (
        ("--limit-train", RESUME_TRAIN),
        ("--limit-test", RESUME_TEST),
        ("--epochs", RESUME_EPOCHS),
    ):
        flags[flags.index(flag) + 1] = str(value)
    return [*flags, "--checkpoint-every", "1"]


def kill_during_epoch(proc: subprocess.Popen, epoch: int, timeout: float = 300) -> str:
    """Reads ``proc``'s output until epoch ``epoch`` has begun (its ``Epoch N/M`` line,
    written when the epoch starts and after the previous epoch's checkpoint), then
    SIGKILLs it."""
    marker = f"Epoch {epoch}/{RESUME_EPOCHS}"
    text = ""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break  # the process ended before the epoch we wanted
                text += chunk.decode(errors="replace")
            if marker in text:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return text
        raise AssertionError(f"never saw {marker!r} in time:\n{text[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_in_epoch_2_then_resume_gives_the_uninterrupted_run(cifar_dir, tmp_path, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = cli("train", *resume_flags(cifar_dir), "--out", str(whole), "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (whole / CHECKPOINT_FILE).exists()  # a finished run removes its checkpoint

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*keras_ce(), "train", *resume_flags(cifar_dir), "--out", str(cut)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output = kill_during_epoch(proc, epoch=2)
    assert proc.returncode == -signal.SIGKILL
    assert "checkpoint: epoch 1" in output and "checkpoint: epoch 2" not in output
    # What the killed run left: its epoch-1 checkpoint (complete) and the lock file it
    # no longer holds; no half-written artifact.
    assert {p.name for p in cut.iterdir()} <= {CHECKPOINT_FILE, LOCK_FILE}
    checkpoint = load_checkpoint(cut / CHECKPOINT_FILE)
    assert checkpoint.epoch == 1 and len(checkpoint.history["loss"]) == 1

    # A temporary as a writer killed in the middle of model.save would leave it.
    stale = cut / f".model.keras.{proc.pid}.x1y2z3.tmp.keras"
    stale.write_bytes(b"PK\x03\x04 half a zip")

    # Resuming takes the run's own arguments; a conflicting one is refused.
    assert main(["train", "--resume", "--out", str(cut), "--epochs", "5"]) == 2
    assert "differs from the run being resumed" in " ".join(capsys.readouterr().err.split())
    resumed = cli("train", "--resume", str(cut), "--quiet")  # = --resume --out RUN_DIR
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert {p.name for p in cut.iterdir()} == set(RUN_FILES)

    assert json.loads((cut / "history.json").read_text()) == json.loads(
        (whole / "history.json").read_text()
    )
    assert json.loads((cut / "metrics.json").read_text())["resumed_after_epoch"] == 1
    code = textwrap.dedent(
        f"""
        import keras, numpy as np
        import keras_ce_plugin
        a = keras.models.load_model({str(whole / "model.keras")!r})
        b = keras.models.load_model({str(cut / "model.keras")!r})
        pairs = list(zip(a.weights, b.weights)) + list(
            zip(a.optimizer.variables, b.optimizer.variables))
        assert len(pairs) > 30
        worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)
        print("MAXDIFF", worst)
        """
    )
    worst = float(run_python(code).stdout.split("MAXDIFF")[-1])
    assert worst <= 1e-6


@pytest.mark.parametrize("form", ["--resume --out", "--resume RUN_DIR"])
def test_resume_needs_a_checkpoint(tmp_path, capsys, form):
    argv = ["--resume", "--out", str(tmp_path)] if "--out" in form else ["--resume", str(tmp_path)]
    assert main(["train", *argv]) == 2
    assert "no checkpoint to resume from" in " ".join(capsys.readouterr().err.split())
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", "--resume", "--out", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is damaged" in err and CHECKPOINT_FILE in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train"], "required: --out (or --resume RUN_DIR)"),
        (["train", "--resume", "a", "--out", "b"], "name different runs"),
    ],
)
def test_train_needs_one_run_dir(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,lr",
    [
        (["--weights", "none"], 1e-4),
        (["--weights", "imagenet"], 1e-3),
        (["--weights", "vgg16.weights.h5"], 1e-3),
        (["--weights", "none", "--learning-rate", "0.001"], 1e-3),  # given: always used
        (["--weights", "imagenet", "--learning-rate", "0.01"], 1e-2),
    ],
)
def test_learning_rate_default_follows_the_base(flags, lr):
    from keras_ce_plugin.cli import build_parser
    from keras_ce_plugin.cli.train import _config_from_args

    for command in ("train", "compare"):
        args = build_parser().parse_args([command, "--out", "x", *flags])
        assert _config_from_args(args, loss=args.loss).lr == lr


@pytest.mark.parametrize(
    "flag,xla_optimizer,xla_step",
    [([], True, False), (["--xla", "none"], False, False), (["--xla", "step"], False, True)],
)
def test_xla_flag_sets_the_config(flag, xla_optimizer, xla_step):
    from keras_ce_plugin.cli import build_parser
    from keras_ce_plugin.cli.train import _config_from_args

    args = build_parser().parse_args(["train", "--out", "x", *flag])
    config = _config_from_args(args, loss=args.loss)
    assert (config.xla_optimizer, config.xla_step) == (xla_optimizer, xla_step)


def test_a_second_run_on_the_same_dir_is_refused(cifar_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from keras_ce_plugin.files import run_lock\n"
            "with run_lock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(300)\n",
            str(run_dir),
        ],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--overwrite"]):
            status = main(["train", *small_flags(cifar_dir), "--out", str(run_dir), *extra])
            err = " ".join(capsys.readouterr().err.split())
            assert status == 2 and f"Another keras-ce run (pid {holder.pid}" in err
        assert [p.name for p in run_dir.iterdir()] == [LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # Its process is gone: the lock file is still there but no longer held.
    assert (run_dir / LOCK_FILE).exists()
    with run_lock(run_dir):
        pass
    assert not any(run_dir.iterdir())


def test_example_runs_as_is(cifar_dir, tmp_path):
    saved = tmp_path / "model.keras"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "cifar10_vgg16.py"),
            "--data-dir",
            str(cifar_dir),
            "--weights",
            "none",
            "--epochs",
            "1",
            "--limit-train",
            "64",
            "--limit-test",
            "16",
            "--save",
            str(saved),
        ],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "64 training and 16 test images" in proc.stdout
    assert "epoch 1: loss" in proc.stdout and "test accuracy" in proc.stdout
    assert len(re.findall(r"true +\w+ +predicted +\w+", proc.stdout)) == 5
    assert saved.is_file()


@pytest.mark.slow  # a two-replica run, as the slow tier's multi-device runs
def test_strategy_devices_mixed_precision_checkpoint_and_limit_flags(cifar_dir, tmp_path):
    """--strategy/--devices/--mixed-precision reach the model and metrics.json;
    --checkpoint-every writes a checkpoint each epoch (and removes it at the end);
    --limit-test sets the test split; without --quiet the epochs are reported."""
    flags = small_flags(cifar_dir)
    flags[flags.index("--limit-train") + 1] = "64"
    flags[flags.index("--limit-test") + 1] = "32"
    out = tmp_path / "run"
    proc = cli(
        "train", *flags, "--strategy", "mirrored", "--devices", "2",
        "--mixed-precision", "bfloat16", "--checkpoint-every", "1", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arguments"]["strategy"] == "mirrored" and metrics["arguments"]["devices"] == 2
    assert metrics["distribution"] == {
        "strategy": "MirroredStrategy",
        "replicas": 2,
        "dtype_policy": "mixed_bfloat16",
    }
    assert metrics["num_test"] == 32 and metrics["num_train"] == 64
    assert metrics["arguments"]["checkpoint_every"] == 1
    for e in range(1, EPOCHS + 1):
        assert f"checkpoint: epoch {e} -> {out / CHECKPOINT_FILE}" in proc.stderr
        assert f"Epoch {e}/{EPOCHS}" in proc.stdout
    assert {p.name for p in out.iterdir()} == set(RUN_FILES)  # the checkpoint is gone
    code = textwrap.dedent(
        f"""
        import keras
        import keras_ce_plugin
        model = keras.models.load_model({str(out / "model.keras")!r})
        print([model.layers[1].dtype_policy.name, model.layers[-1].dtype_policy.name])
        """
    )
    assert run_python(code).stdout.strip().splitlines()[-1] == "['mixed_bfloat16', 'float32']"


def test_quiet_prints_only_the_summary(cifar_dir, tmp_path):
    """--quiet: no progress (no epoch lines, no feature bar, no checkpoint lines) on
    either stream; the one summary line on stdout."""
    flags = small_flags(cifar_dir)
    flags[flags.index("--limit-train") + 1] = "32"
    flags[flags.index("--limit-test") + 1] = "16"
    flags[flags.index("--epochs") + 1] = "1"
    out = tmp_path / "run"
    proc = cli("train", *flags, "--checkpoint-every", "1", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        line for line in proc.stdout.splitlines() if line.startswith("test accuracy ")
    ]
    assert len(proc.stdout.splitlines()) == 1
    for text in (proc.stdout, proc.stderr):
        for noise in ("Epoch ", "VGG16 features", "checkpoint:"):
            assert noise not in text, (noise, text)
    assert json.loads((out / "metrics.json").read_text())["arguments"]["quiet"] is True

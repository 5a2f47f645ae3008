"""The README's documented flow, read from README.md and run command by command.

The main job (the ``keras-ce train`` of the README's first code block), then the
``export``, ``verify`` and ``predict`` commands of its "Export and serving"
section, each in a fresh ``keras-ce`` process, in a temporary directory holding
the files the commands name (``cat.png``, ``ship.jpg``, ``batch.npy``: real
CIFAR-10 test images). Only what keeps the run small and offline changes: the
sample's path for ``--data-dir``, ``--limit-train``/``--limit-test``/``--epochs``
appended (argparse keeps the last value). If a README command breaks, or the
README stops showing one of them, this test fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import REPO

SMALL = {"train": ["--limit-train", "64", "--limit-test", "32", "--epochs", "1"]}
SMALL["verify"] = ["--limit-test", "32"]
SAMPLE = "../shared/data/cifar10-sample/cifar-10-batches-py"


def _blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def readme_commands() -> dict[str, list[str]]:
    """``{"train": args, "export": args, ...}``: each command's arguments after
    ``keras-ce COMMAND``."""
    text = (REPO / "README.md").read_text()
    found: dict[str, list[str]] = {}
    main_job = _blocks(text)[0]
    section = text.split("\n## Export and serving\n", 1)
    assert len(section) == 2, "README.md has no '## Export and serving' section"
    export_block = _blocks(section[1].split("\n## ", 1)[0])[0]
    for block in (main_job, export_block):
        for line in block.splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv and Path(argv[0]).name == "keras-ce" and len(argv) > 1:
                    found.setdefault(argv[1], argv[2:])
    missing = {"train", "export", "verify", "predict"} - set(found)
    assert not missing, f"README.md no longer shows keras-ce {sorted(missing)}"
    return found


def _local(argv: list[str], cifar_dir: Path) -> list[str]:
    return [str(cifar_dir) if a == SAMPLE else a for a in argv]


def keras_ce(argv: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "keras_ce_plugin.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)},
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"README command `keras-ce {shlex.join(argv)}` exited {proc.returncode}\n"
        f"STDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    )
    return proc


def write_readme_images(cwd: Path, cifar_dir: Path) -> dict[str, int]:
    """``cat.png``, ``ship.jpg`` and ``batch.npy`` from the sample's test images;
    returns the true class of each file the README's predict command names."""
    from PIL import Image

    from keras_ce_plugin.data import CIFAR10_CLASSES, load_cifar10

    (_, _), (x, y) = load_cifar10(cifar_dir, limit_train=1, limit_test=100)
    pixels = np.rint(x * 255).astype(np.uint8)
    labels = y.argmax(-1)
    cat = int(np.flatnonzero(labels == CIFAR10_CLASSES.index("cat"))[0])
    ship = int(np.flatnonzero(labels == CIFAR10_CLASSES.index("ship"))[0])
    Image.fromarray(pixels[cat]).save(cwd / "cat.png")
    Image.fromarray(pixels[ship]).save(cwd / "ship.jpg", quality=95)
    np.save(cwd / "batch.npy", pixels[:2])
    return {"cat.png": cat, "ship.jpg": ship}


def test_readme_main_job_export_verify_predict_in_sequence(tmp_path, cifar_dir):
    import onnx

    commands = readme_commands()
    train = _local(commands["train"], cifar_dir) + SMALL["train"]
    assert "--out" in train and "--weights" in train, train
    keras_ce(["train", *train], tmp_path)
    model = tmp_path / commands["export"][0]
    assert model.is_file(), f"the README exports {model}, which the main job did not write"

    out = keras_ce(["export", *_local(commands["export"], cifar_dir)], tmp_path).stdout
    export_dir = tmp_path / commands["export"][commands["export"].index("--out") + 1]
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["formats"][:3] == ["keras", "savedmodel", "onnx"], out
    assert not manifest["skipped"], manifest["skipped"]
    # The offline model's feature standardisation is a constant of the ONNX graph.
    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["probabilities"]

    verify = _local(commands["verify"], cifar_dir) + SMALL["verify"]
    text = keras_ce(["verify", *verify], tmp_path).stdout
    assert "OK: every artifact matches the Keras model" in text, text
    assert re.search(r"^onnx\s.*\sok$", text, re.M) and re.search(
        r"^savedmodel\s.*\sok$", text, re.M
    )

    write_readme_images(tmp_path, cifar_dir)
    predict = commands["predict"]
    files = [a for a in predict if a.endswith((".png", ".jpg", ".npy"))]
    assert files == ["cat.png", "ship.jpg", "batch.npy"], predict
    lines = keras_ce(["predict", *predict], tmp_path).stdout.splitlines()
    assert [line.split()[0] for line in lines] == [
        "cat.png",
        "ship.jpg",
        "batch.npy[0]",
        "batch.npy[1]",
    ], lines
    from keras_ce_plugin.data import CIFAR10_CLASSES

    for line in lines:  # --top-k 3: three known class names with probabilities
        ranked = re.findall(r"(\w+) (\d\.\d{4})", line.split(None, 1)[1])
        assert len(ranked) == 3 and all(name in CIFAR10_CLASSES for name, _ in ranked), line


def test_readme_flow_is_one_chain_from_the_main_jobs_model():
    """export takes the main job's model; verify and predict take that export."""
    commands = readme_commands()
    run_dir = commands["train"][commands["train"].index("--out") + 1]
    assert commands["export"][0] == f"{run_dir}/model.keras", commands["export"]
    export_dir = commands["export"][commands["export"].index("--out") + 1]
    assert commands["verify"][0] == export_dir, commands["verify"]
    assert commands["predict"][0].startswith(export_dir + "/"), commands["predict"]

"""A Keras-only core: no TensorFlow needed for the losses and their lifecycle.

JAX and PyTorch users install ``keras-ce-plugin`` (core: ``keras`` and ``numpy``)
and get the losses, ``compile(loss="customloss>...")``, ``fit``, ``.keras`` save
and load. Here TensorFlow is installed, so a fresh process makes ``import
tensorflow`` fail; ``.ci/run`` also runs the lifecycle in an environment where
``pip install .[jax]`` put no TensorFlow at all.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tests"))
from core_lifecycle import BLOCK_TENSORFLOW  # noqa: E402


def _core_requirements() -> set[str]:
    requires = importlib.metadata.requires("keras-ce-plugin") or []
    core = [r for r in requires if "extra ==" not in r]
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in core}


def test_core_dependencies_are_keras_and_numpy_only():
    assert _core_requirements() == {"keras", "numpy"}


@pytest.mark.parametrize("extra", ["experiment", "export", "all", "dev"])
def test_extras_that_need_tensorflow_bring_it(extra):
    requires = importlib.metadata.requires("keras-ce-plugin") or []
    mine = [r for r in requires if f'extra == "{extra}"' in r]
    assert mine, f"no [{extra}] extra"
    text = " ".join(mine)
    assert "keras-ce-plugin[" in text or "tensorflow" in text, mine


def _run(code: str, tmp_path, *, backend: str = "jax") -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_jax_lifecycle_without_tensorflow(tmp_path):
    """Losses, compile by name, fit, .keras save, load and fit in a fresh process."""
    code = (
        BLOCK_TENSORFLOW
        + f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); "
        + "sys.argv.append('--block-tensorflow')\n"
        + "import core_lifecycle, pathlib\n"
        + f"core_lifecycle.main(pathlib.Path({str(tmp_path)!r}))\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK jax lifecycle" in proc.stdout, proc.stdout


def test_import_without_tensorflow_imports_no_tensorflow(tmp_path):
    code = BLOCK_TENSORFLOW + (
        "import sys, keras_ce_plugin, keras_ce_plugin.testing, keras_ce_plugin.targets\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('OK', sorted(keras_ce_plugin.__all__)[:3])\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["train", "--weights", "none", "--out", "run"], "experiment"),
        (["compare", "--weights", "none", "--out", "cmp"], "experiment"),
        (["export", "model.keras", "--out", "exp"], "export"),
    ],
)
def test_cli_without_its_extra_names_the_extra_in_one_line(tmp_path, argv, extra):
    code = BLOCK_TENSORFLOW + (
        f"import sys\nfrom keras_ce_plugin.cli import main\nsys.exit(main({argv!r}))\n"
    )
    (tmp_path / "model.keras").write_bytes(b"")
    proc = _run(code, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"pip install 'keras-ce-plugin[{extra}]'" in lines[0], lines[0]
    assert "tensorflow" in lines[0], lines[0]

"""The README's two commands are what CI runs, and they name things that exist."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import REPO, claims_table_tests


def _first_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```[a-z]*\n(.*?)```", text, re.S)
    assert block, "README has no code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_exactly_two_commands():
    lines = _first_block()
    assert len(lines) == 2, lines
    setup, test = lines
    assert setup.startswith('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"')
    assert " && .venv/bin/keras-ce train " in setup
    assert "../shared/data/cifar10-sample/cifar-10-batches-py" in setup
    assert test.startswith(".venv/bin/python -m pytest")
    assert test.endswith(' -m "not slow"'), test  # .ci/run runs the slow tier after it


def test_ci_reads_its_commands_from_the_readme():
    script = (REPO / ".ci" / "run").read_text()
    assert (
        "README.md" in script and 'eval "$install_cmd"' in script and 'eval "$test_cmd"' in script
    )
    assert 'eval "$slow_cmd"' in script  # the tier that README command 2 leaves out
    assert "ruff check" in script and "ruff format --check" in script
    out = subprocess.run(
        ["bash", "-c", "source <(sed -n '/^readme_cmd()/,/^}/p' .ci/run); readme_cmd 2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == _first_block()[1]
    line = next(ln for ln in script.splitlines() if ln.startswith("slow_cmd="))
    slow = subprocess.run(
        ["bash", "-c", f'test_cmd={shlex.quote(out)}; {line}; echo "$slow_cmd"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert slow == out.replace('-m "not slow"', "-m slow") and slow != out, slow


def test_console_script_and_extras_declared():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'keras-ce = "keras_ce_cli:main"' in pyproject
    assert 'py-modules = ["keras_ce_cli"]' in pyproject  # the entry point is installed
    for extra in ("export", "dev", "jax", "torch"):
        assert re.search(rf"^{extra} = ", pyproject, re.M), extra


def test_every_test_named_in_the_claims_table_exists():
    """README's "Claims and their tests": each named test is defined in its file."""
    refs = claims_table_tests()
    assert len({row for row, _, _ in refs}) >= 40, len(refs)
    for row, file, name in refs:
        path = REPO / file
        assert file and path.is_file(), (row, file)
        assert re.search(rf"^def {re.escape(name)}\(", path.read_text(), re.M), (row, name)


CLAIMED = """
import pytest


def test_claimed():
    pytest.skip("a precondition is missing")


def test_not_claimed():
    pytest.skip("a precondition is missing")
"""


def test_claims_table_tests_must_not_skip_in_ci(tmp_path):
    """The suite's conftest (copied beside a README naming one test) fails that test's
    skip when ``$CI`` is set, and only that one."""
    (tmp_path / "tests").mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_claimed.py").write_text(CLAIMED)
    (tmp_path / "README.md").write_text(
        "### Claims and their tests\n\n| claim | test |\n|---|---|\n"
        "| a claim | `tests/test_claimed.py::test_claimed` |\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests"],
        cwd=tmp_path,
        # The numpy backend: the conftest's seed fixture imports Keras, nothing more is needed.
        env={**os.environ, "CI": "1", "KERAS_BACKEND": "numpy"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = proc.stdout.strip().splitlines()[-1]
    assert "1 failed, 1 skipped" in summary, proc.stdout[-3000:]
    assert "test_claimed is named in README's claims table and skipped in CI" in proc.stdout


def test_ci_sets_ci_before_the_tests():
    """`.ci/run` exports CI=1 itself, before it runs README command 2 (so a missing
    dependency fails the tests instead of skipping them)."""
    script = (REPO / ".ci" / "run").read_text()
    lines = script.splitlines()
    export = lines.index("export CI=1")
    assert export < next(i for i, line in enumerate(lines) if line == 'eval "$test_cmd"')

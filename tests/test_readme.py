"""The README's two commands are what CI runs, and they name things that exist."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO


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


def test_ci_reads_its_commands_from_the_readme():
    script = (REPO / ".ci" / "run").read_text()
    assert (
        "README.md" in script and 'eval "$install_cmd"' in script and 'eval "$test_cmd"' in script
    )
    assert "ruff check" in script and "ruff format --check" in script
    out = subprocess.run(
        ["bash", "-c", "source <(sed -n '/^readme_cmd()/,/^}/p' .ci/run); readme_cmd 2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == _first_block()[1]


def test_console_script_and_extras_declared():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'keras-ce = "keras_ce_plugin.cli:main"' in pyproject
    for extra in ("export", "dev", "jax", "torch"):
        assert re.search(rf"^{extra} = ", pyproject, re.M), extra


def test_every_test_named_in_the_claims_table_exists():
    """README's "Claims and their tests": each named test is defined in its file."""
    text = (REPO / "README.md").read_text()
    table = text.split("### Claims and their tests", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "::" in line]
    assert len(rows) >= 40, len(rows)
    for row in rows:
        cell = row.rstrip(" |").rsplit("|", 1)[1]
        path = None
        for ref in re.findall(r"`([^`]+)`", cell):
            file, _, name = ref.rpartition("::")
            path = REPO / file if file else path
            assert path is not None and path.is_file(), (row, ref)
            assert re.search(rf"^def {re.escape(name)}\(", path.read_text(), re.M), (row, ref)

"""Shared fixtures: seeded randomness and the real CIFAR-10 sample from ../shared."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CIFAR_DIR = REPO.parent / "shared" / "data" / "cifar10-sample" / "cifar-10-batches-py"


def cifar_dir_path() -> Path:
    """The CIFAR-10 sample: $KERAS_CE_CIFAR10_DIR, else ../shared/... beside the repo."""
    return Path(os.environ.get("KERAS_CE_CIFAR10_DIR", DEFAULT_CIFAR_DIR))


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    path = cifar_dir_path()
    if not (path / "data_batch_1").is_file():
        pytest.fail(
            f"CIFAR-10 sample not found at {path}; set KERAS_CE_CIFAR10_DIR (tests never download)."
        )
    return path


@pytest.fixture(autouse=True)
def _seed():
    import keras

    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def run_python(code: str, *, cwd: Path | None = None, env: dict | None = None, timeout=600):
    """Runs ``code`` in a fresh Python process; returns the CompletedProcess.

    Raises AssertionError with the process output if it fails.
    """
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    )
    return proc


def claims_table_tests(readme: Path | None = None) -> list[tuple[str, str, str]]:
    """``(row, file, test name)`` for each test README's "Claims and their tests" names
    (``file::name``, or ``::name`` for the file named before it in the row)."""
    path = readme or REPO / "README.md"
    text = path.read_text() if path.is_file() else ""
    if "### Claims and their tests" not in text:
        return []
    table = text.split("### Claims and their tests", 1)[1]
    found = []
    for row in (line for line in table.splitlines() if line.startswith("| ") and "::" in line):
        cell = row.rstrip(" |").rsplit("|", 1)[1]
        file = ""
        for ref in re.findall(r"`([^`]+)`", cell):
            named, _, name = ref.rpartition("::")
            file = named or file
            found.append((row, file, name))
    return found


_CLAIMED: set[tuple[str, str]] | None = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``$CI`` set), a test named in README's claims table may not skip: the
    claim would stand on a test that did not run."""
    global _CLAIMED
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("CI")) or hasattr(report, "wasxfail"):
        return
    if os.environ.get("KERAS_CE_NESTED_RUN"):  # another backend: run_pytest counts skips
        return
    if _CLAIMED is None:
        _CLAIMED = {(file, name) for _, file, name in claims_table_tests()}
    file = item.nodeid.split("::")[0]
    name = getattr(item, "originalname", None) or item.name.split("[")[0]
    if (file, name) in _CLAIMED:
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} is named in README's claims table and skipped in CI: {why}"
        )


_BACKEND_EXTRAS = {
    "jax": "extra [jax], part of [dev]",
    "torch": 'extra [torch]: pip install -e ".[torch]"',
}


def require_backend(name: str) -> None:
    """Skips where the Keras backend ``name`` is not installed; in CI (``$CI`` set) fails."""
    try:
        __import__(name)
    except ImportError:
        message = f"{name} is not installed ({_BACKEND_EXTRAS[name]})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; .ci/run installs it")
        pytest.skip(message)


def rerun_from_tensorflow(backend: str, *args: str, **kwargs) -> str:
    """Runs ``pytest args`` again under ``backend`` in a fresh process (as
    :func:`run_pytest`, which takes ``kwargs``), from the TensorFlow process only: where
    this process already runs another backend, the re-run would nest, and it skips."""
    require_backend(backend)
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("already running on a non-TensorFlow backend")
    return run_pytest(*args, backend=backend, **kwargs)


def summary_counts(summary: str) -> dict[str, int]:
    """``{"passed": 12, "skipped": 1, ...}`` from a pytest summary line."""
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}


def run_pytest(
    *args: str, backend: str, min_passed: int, max_skipped: int = 0, timeout: int = 1200
) -> str:
    """Runs ``pytest args`` in a fresh process under ``KERAS_BACKEND=backend``.

    The README's options (``addopts``: doctests, workers) are left out. Fails unless
    the run passes with at least ``min_passed`` tests passed and at most
    ``max_skipped`` skipped or deselected (a backend that silently skips or
    deselects its tests is a failure); returns its summary line.
    """
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "KERAS_CE_NESTED_RUN": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    counts = summary_counts(summary)
    assert counts.get("passed", 0) >= min_passed, f"expected >= {min_passed} passed: {summary}"
    not_run = counts.get("skipped", 0) + counts.get("deselected", 0)
    assert not_run <= max_skipped, f"expected <= {max_skipped} skipped/deselected: {summary}"
    assert not {"failed", "error", "errors", "xpassed"} & set(counts), summary
    return summary


def spy_on(monkeypatch, module):
    """Replaces ``module.grads_in_forward`` (a backend's own gradient-in-forward pass)
    with a wrapper that records each call; returns the list of calls."""
    calls = []
    real = module.grads_in_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "grads_in_forward", counted)
    return calls

"""The cross-backend job: the backend-neutral tests, run again under ``KERAS_BACKEND=jax``
and ``KERAS_BACKEND=torch``.

A Keras backend is chosen once per process, so each run is a real pytest run in a
fresh process. JAX comes with ``[dev]``; torch with the ``[torch]`` extra (CPU build
``torch==2.13.0``), which ``.ci/run`` installs: in CI (``$CI`` set) a missing backend
fails the test; elsewhere its run skips where it is not installed. It covers the loss
parity/reference tests, the hypothesis properties, the golden files of earlier versions,
JSON/``.keras`` serialization and hostile-file loading; TensorFlow-only tests inside them
skip with a reason.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

BACKEND_NEUTRAL = [
    "tests/test_losses.py",
    "tests/test_golden.py",
    "tests/test_properties.py",
    "tests/test_safe_loading.py",
    "tests/test_serialization.py",
]


EXTRAS = {"jax": "extra [jax], part of [dev]", "torch": 'extra [torch]: pip install -e ".[torch]"'}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_neutral_tests_pass_on(backend):
    try:
        __import__(backend)
    except ImportError:
        message = f"{backend} is not installed ({EXTRAS[backend]})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; .ci/run installs it")
        pytest.skip(message)
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        pytest.skip("already running on a non-TensorFlow backend")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:doctest",
            "-o",
            "addopts=",
            *BACKEND_NEUTRAL,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
    print(summary)

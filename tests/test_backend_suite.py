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

import pytest
from conftest import rerun_from_tensorflow

BACKEND_NEUTRAL = [
    "tests/test_losses.py",
    "tests/test_golden.py",
    "tests/test_properties.py",
    "tests/test_safe_loading.py",
    "tests/test_serialization.py",
]


# (at least passed, at most skipped) per backend, as measured on this suite: the skips
# are its TensorFlow-only cases, each skipping with its reason.
# A backend that silently skips more, or passes fewer, fails the test.
EXPECTED = {"jax": (728, 21), "torch": (544, 205)}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_neutral_tests_pass_on(backend):
    passed, skipped = EXPECTED[backend]
    print(
        rerun_from_tensorflow(
            backend,
            "-p",
            "no:doctest",
            *BACKEND_NEUTRAL,
            min_passed=passed,
            max_skipped=skipped,
        )
    )

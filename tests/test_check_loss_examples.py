"""examples/your_own_loss: the tutorial's loss fails what the issue says; the fix passes all.

Also shows ``parametrize_loss_checks`` as a user's test suite would use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import keras_ce_plugin  # noqa: F401 - enables "package>Name" strings in compile()
from keras_ce_plugin.testing import (
    CHECKS,
    LossContractError,
    check_losses,
    parametrize_loss_checks,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "your_own_loss"))

from fixed_loss import CategoricalCrossEntropy  # noqa: E402
from tutorial_loss import Custom_CE_Loss  # noqa: E402

# keras-team/keras#20112 (by name), #20395/#19740 (reload), #19662 (sample weights /
# reduction), #20060 (inf at probability 0), #17371/#20014 (tf.* ops on other backends).
TUTORIAL_FAILS = {
    "registered",
    "output_shape",
    "config_roundtrip",
    "keras_file",
    "compile_by_name",
    "as_metric",
    "sample_weight",
    "reduction",
    "finite",
    "backends",
}


@pytest.fixture(scope="module")
def reports():
    tutorial, fixed, fixed_logits = check_losses(
        [Custom_CE_Loss, CategoricalCrossEntropy(), CategoricalCrossEntropy(from_logits=True)]
    )
    return {"tutorial": tutorial, "fixed": fixed, "fixed_logits": fixed_logits}


def test_tutorial_loss_fails_exactly_the_expected_checks(reports):
    report = reports["tutorial"]
    assert set(report.failed) == TUTORIAL_FAILS, str(report)
    assert report.skipped == ["mask", "reference"]
    assert "returns shape () for a batch of 6" in report.details["reduction"]
    assert "not finite at probabilities 0 and 1" in report.details["finite"]
    assert report.details["backends"].startswith("on jax:")
    with pytest.raises(LossContractError, match="Custom_CE_Loss\\(\\) fails 10 loss check"):
        raise report.error()


@pytest.mark.parametrize("which", ["fixed", "fixed_logits"])
def test_fixed_loss_passes_every_check(reports, which):
    report = reports[which]
    assert report.ok and not report.warnings, str(report)
    assert report.passed == [c for c in CHECKS if c != "reference"], str(report)


# What a user writes: one pytest case per (loss, check). (`checks=` keeps this demo
# short; the fixture above already ran every check on this loss.)
@parametrize_loss_checks(
    [CategoricalCrossEntropy(from_logits=True)],
    checks=["registered", "config_roundtrip", "sample_weight", "finite", "reference"],
)
def test_user_suite(loss, check):
    check(loss)


def test_parametrize_ids_and_failing_reason():
    mark = parametrize_loss_checks([CategoricalCrossEntropy(from_logits=True), Custom_CE_Loss()])
    ids = [p.id for p in mark.args[1]]
    assert len(ids) == 2 * len(CHECKS)
    assert "CategoricalCrossEntropy(from_logits=True)-finite" in ids
    assert "Custom_CE_Loss()-reduction" in ids
    loss, check = next(p.values for p in mark.args[1] if p.id == "Custom_CE_Loss()-reduction")
    with pytest.raises(LossContractError, match="reduction: call\\(\\) returns shape \\(\\)"):
        check(loss)
    loss, check = next(p.values for p in mark.args[1] if p.id == "Custom_CE_Loss()-reference")
    with pytest.raises(pytest.skip.Exception, match="no `reference=` function given"):
        check(loss)


def test_parametrize_expected_failed_checks_callable():
    mark = parametrize_loss_checks(
        [Custom_CE_Loss()],
        expected_failed_checks=lambda loss: {"reduction": "reduces over the batch"},
    )
    param = next(p for p in mark.args[1] if p.id.endswith("-reduction"))
    (xfail,) = param.marks
    assert xfail.name == "xfail" and xfail.kwargs["strict"] is True
    assert xfail.kwargs["reason"] == "reduces over the batch"
    assert xfail.kwargs["raises"] is LossContractError
    loss, check = param.values
    with pytest.raises(LossContractError, match="reduction: call"):
        check(loss)


USER_SUITE = """
import sys
sys.path.insert(0, {examples!r})
from fixed_loss import CategoricalCrossEntropy
from tutorial_loss import Custom_CE_Loss
from keras_ce_plugin.testing import parametrize_loss_checks

@parametrize_loss_checks(
    [Custom_CE_Loss(), CategoricalCrossEntropy()],
    checks=["registered", "output_shape"],
    expected_failed_checks={{"registered": "not registered", "output_shape": "a mean"}},
)
def test_user_suite(loss, check):
    check(loss)
"""


def test_expected_failures_are_strict_xfails_in_a_real_pytest_run(tmp_path):
    """The tutorial's loss fails both: 2 xfailed; the fixed loss passes both: XPASS(strict)."""
    examples = str(Path(__file__).resolve().parents[1] / "examples" / "your_own_loss")
    (tmp_path / "test_user.py").write_text(USER_SUITE.format(examples=examples))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rX"],
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "2 failed" in summary and "2 xfailed" in summary, summary
    assert proc.stdout.count("[XPASS(strict)] ") == 2, proc.stdout[-3000:]

"""``parametrize_loss_checks``: one pytest case per (loss, check)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import Any

import pytest

from keras_ce_plugin.testing._inputs import describe
from keras_ce_plugin.testing._report import FAILED, SKIPPED, WARNING, LossContractError
from keras_ce_plugin.testing._run import CHECKS, run_many


def _run_one(loss: Any, *, check: str, **kwargs: Any) -> None:
    timeout = kwargs.pop("timeout", 300.0)
    (report,) = run_many([(loss, {**kwargs, "checks": [check]})], timeout=timeout)
    result = report.results[check]
    if result.result == SKIPPED:
        pytest.skip(result.reason)
    if result.result == WARNING:
        warnings.warn(f"{check}: {result.reason}", stacklevel=2)
    if result.result == FAILED:
        raise report.error()


def _label(loss: Any) -> str:
    if isinstance(loss, type):
        return f"{loss.__name__}()"
    return describe(loss)


def parametrize(losses: Iterable[Any], **kwargs: Any) -> Any:
    expected = kwargs.pop("expected_failed_checks", None)
    checks = list(kwargs.pop("checks", None) or CHECKS)
    params = []
    for loss in losses:
        own = (expected(loss) if callable(expected) else expected) or {}
        unknown = sorted(set(own) - set(CHECKS))
        if unknown:
            raise ValueError(
                f"Unknown loss check {unknown[0]!r}. Valid checks: {', '.join(CHECKS)}"
            )
        for check in checks:
            # The check runs as is; an expected failure is a strict xfail around it.
            fn = functools.partial(_run_one, check=check, **kwargs)
            fn.__name__ = check  # type: ignore[attr-defined]
            marks = []
            if check in own:
                marks = [
                    pytest.mark.xfail(strict=True, reason=own[check], raises=LossContractError)
                ]
            params.append(pytest.param(loss, fn, id=f"{_label(loss)}-{check}", marks=marks))
    return pytest.mark.parametrize("loss, check", params)

"""Validation of the large-vocabulary settings, shared by the functions in
:mod:`keras_ce_plugin.large_vocab.ops` and by ``LinearCE.__init__``: one check per
argument, each raising a one-line, Keras-style message."""

from __future__ import annotations

import math
from typing import Any


def _is_number(value: Any) -> bool:
    """An int or float, not a bool (the one number test of these checks)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_chunk(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer or None. Received: {name}={value!r}")
    return int(value)


def _check_precision(value: Any) -> str:
    if value not in ("float32", "input"):
        raise ValueError(
            f"`matmul_precision` must be 'float32' or 'input'. Received: matmul_precision={value!r}"
        )
    return str(value)


def _check_positive(name: str, value: Any, what: str) -> float | None:
    """``value`` as a float if it is a positive finite number, None if None."""
    if value is None:
        return None
    if not _is_number(value) or not value > 0:
        raise ValueError(f"`{name}` must be {what} or None. Received: {name}={value!r}")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite. Received: {name}={value!r}")
    return float(value)


def _check_cap(value: Any) -> float | None:
    return _check_positive("logit_soft_cap", value, "a positive float")


def _check_budget(value: Any) -> float | None:
    """``chunk_budget_mib`` validated (None: the default budget)."""
    return _check_positive("chunk_budget_mib", value, "a positive number of MiB")


def _check_z_loss(value: Any) -> float:
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"`z_loss` must be a float in [0, 1). Received: z_loss={value!r}")
    return float(value)


# Unit roundoff of each matmul dtype; "auto" filters below a 32nd of it (as Cut
# Cross-Entropy's filter_eps="auto").
_EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def _check_filter(value: Any) -> float | str | None:
    """``filter_eps`` validated: None (off), ``"auto"`` or a float in (0, 1)."""
    if value is None or value == "auto":
        return value
    if not _is_number(value) or not 0 < value < 1:
        raise ValueError(
            "`filter_eps` must be 'auto', a float in (0, 1) or None. "
            f"Received: filter_eps={value!r}"
        )
    return float(value)


def _filter_threshold(value: Any, mm_dtype: str) -> float:
    """The threshold ``filter_eps`` stands for (0.0: no filtering)."""
    value = _check_filter(value)
    if value is None:
        return 0.0
    return _EPS[mm_dtype] / 32 if value == "auto" else float(value)

"""Shared helpers of the in-process checks, and the checks of names and configs.

Each check takes a Subject and returns ``(result, reason)``; :func:`check` (from
``_spec``) records its id, fix and needs beside it.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import keras
import numpy as np

from keras_ce_plugin.testing._inputs import (
    BATCH,
    SEED,
    Batch,
    Subject,
    _init_params,
    close,
    make_batch,
    max_diff,
    registered_name,
    to_numpy,
    with_reduction,
)
from keras_ce_plugin.testing._report import FAILED, PASSED, first_line
from keras_ce_plugin.testing._spec import Outcome, check

# Two float32 evaluations of the same math in another order (a reduction, a
# traced graph) differ by a few ulps: rtol 1e-5 covers that; atol 1e-6 keeps
# values near 0 (a confident correct prediction, loss ~1e-7) from failing on
# relative error alone.
RTOL, ATOL = 1e-5, 1e-6
# Another backend's kernels (log, exp, softmax) round differently: a few ulps more.
RTOL_BACKEND, ATOL_BACKEND = 1e-4, 1e-6
# A float32 loss against a float64 NumPy reference: float32 rounding (~1e-7
# relative per op) plus the usual clip at epsilon (1e-7) in absolute terms.
RTOL_REFERENCE, ATOL_REFERENCE = 1e-4, 1e-5

REDUCTIONS = ("sum", "sum_over_batch_size", "mean_with_sample_weight", None)


class _Given(keras.losses.Loss):
    """Returns ``y_pred`` as the per-sample values: Keras' own reduction of them."""

    def call(self, y_true, y_pred):
        return y_pred


def keras_reduce(values: np.ndarray, reduction: str | None, sample_weight=None) -> np.ndarray:
    """What Keras' ``Loss.__call__`` makes of per-sample ``values``."""
    v = np.asarray(values, dtype="float32")
    return to_numpy(_Given(reduction=reduction, name="given")(v, v, sample_weight=sample_weight))


def per_sample(s: Subject, batch: Batch) -> np.ndarray:
    """The unreduced values: ``__call__`` with ``reduction=None``."""
    return to_numpy(with_reduction(s.loss, None)(batch.y_true, batch.y_pred))


_LABELS = {"sparse": "integer labels", "binary": "0/1 labels"}


def targets_hint(s: Subject) -> str:
    """For a loss whose labels were not given and not known (checked on one-hot ones):
    if its call raised on them and runs on another kind, which kind to pass; else ""."""
    if not s.guessed:
        return ""
    try:
        per_sample(s, s.batch)
    except Exception:  # noqa: BLE001 - raised on one-hot labels: try the others
        pass
    else:
        return ""
    for kind, labels in _LABELS.items():
        try:
            values = per_sample(s, make_batch(kind, s.from_logits, BATCH, SEED))
        except Exception:  # noqa: BLE001 - not this kind either
            continue
        if values.shape == (BATCH,) and np.all(np.isfinite(values)):
            return (
                f"{s.label} raised on one-hot labels and runs on {labels}: check it with "
                f"targets={kind!r} (on the command line: --targets {kind})"
            )
    return ""


def sample_by_sample(s: Subject, batch: Batch) -> np.ndarray:
    """Each sample's values computed alone, stacked: what ``call`` should return."""
    rows = []
    none = with_reduction(s.loss, None)
    for i in range(batch.y_pred.shape[0]):
        out = to_numpy(none(batch.y_true[i : i + 1], batch.y_pred[i : i + 1]))
        rows.append(out.reshape(out.shape[1:]) if out.ndim and out.shape[0] == 1 else out)
    return np.stack(rows)


def fmt(x: Any) -> str:
    a = np.asarray(x)
    return f"{float(a):.6g}" if a.ndim == 0 else str(np.round(a, 6).tolist())


def sample_weights(shape: tuple[int, ...]) -> np.ndarray:
    """Seeded weights of the per-sample values' shape (``y_pred.shape[:-1]``: Keras
    takes ``(batch, tokens)`` weights for per-token values)."""
    w = np.random.default_rng(7).uniform(0.25, 2.0, size=shape).astype("float32")
    w.flat[0] = 0.0  # A zero weight must drop the sample.
    return w


def a_class(s: Subject) -> str | None:
    return "a function has no config (its arguments cannot be saved)" if s.fn else None


def floating(s: Subject) -> str | None:
    if not np.issubdtype(s.batch.y_pred.dtype, np.floating):
        return "y_pred is not floating point"
    return None


def normalize(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------- #
@check(
    "registered",
    passes_when="the class/function has a registered ``package>Name``",
    fix='decorate it with @keras.saving.register_keras_serializable(package="my_losses")',
    needs="a loss that is not a Keras built-in",
    applies=lambda s: (
        f"a Keras built-in: Keras resolves it by its own name {s.name!r}" if s.builtin else None
    ),
)
def check_registered(s: Subject) -> Outcome:
    if registered_name(s.cls_or_fn) is None:
        return FAILED, (
            f"{s.cls_or_fn.__qualname__} is not registered under a `package>Name`, so neither "
            "compile(loss='...') nor load_model() can find it"
        )
    return PASSED, f"registered as {s.name!r}"


@check(
    "config_complete",
    passes_when="every named ``__init__`` parameter appears in ``get_config()`` (``dtype`` "
    "too: Keras' base ``Loss.get_config`` returns only name and reduction)",
    fix="return every __init__ argument (dtype too) from get_config()",
    needs="a Loss class",
    applies=a_class,
)
def check_config_complete(s: Subject) -> Outcome:
    config = s.loss.get_config()
    params = _init_params(type(s.loss))
    if not params:
        return PASSED, "__init__ takes no arguments"
    missing = [n for n in params if n not in config]
    if missing:
        extra = ""
        if "dtype" in missing:
            extra = (
                " (Keras' base Loss.get_config() returns only name and reduction: "
                "a loss built with dtype='float64' reloads as float32)"
            )
        return FAILED, f"get_config() lacks __init__ argument(s) {', '.join(missing)}{extra}"
    return PASSED, f"get_config() has all {len(params)} __init__ arguments"


def _round_trip(loss: keras.losses.Loss, batches: list[Batch]) -> str | None:
    """Why ``from_config(get_config())`` is not the same loss, or None."""
    config = loss.get_config()
    try:
        new = type(loss).from_config(config)
    except Exception as exc:  # noqa: BLE001 - the reason is the report
        return f"from_config(get_config()) raised {first_line(exc)}"
    new_config = new.get_config()
    if normalize(new_config) != normalize(config):
        diff = sorted(
            k for k in set(config) | set(new_config) if config.get(k) != new_config.get(k)
        )
        return f"from_config(get_config()) gives another config (keys {diff})"
    for batch in batches:
        try:
            a = to_numpy(loss(batch.y_true, batch.y_pred))
        except Exception:  # noqa: BLE001 - values the loss cannot compute are not compared
            continue
        b = to_numpy(new(batch.y_true, batch.y_pred))
        if not close(a, b, RTOL, ATOL):
            return f"the reloaded loss gives other values ({max_diff(a, b)})"
    return None


@check(
    "config_roundtrip",
    passes_when="``from_config(get_config())`` gives the same config and values",
    fix="let __init__ accept what get_config() returns (name, reduction, dtype, **kwargs) "
    "and pass them to super().__init__",
    needs="a Loss class",
    applies=a_class,
)
def check_config_roundtrip(s: Subject) -> Outcome:
    bad = _round_trip(s.loss, [s.batch, s.partial])
    if bad:
        return FAILED, bad
    return PASSED, "same config and values after from_config(get_config())"


def perturb(value: Any) -> list[Any]:
    """Other valid-looking values for a numeric argument (first choice first)."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float):
        return [v for v in (value * 0.5 + 0.125, value + 0.5, value * 0.5) if v != value]
    if isinstance(value, (list, tuple)) and value and all(perturb(v) for v in value):
        return [type(value)(perturb(v)[0] for v in value)]
    return []


def perturbed_instances(loss: keras.losses.Loss) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """``(argument, value, instance)`` built through ``__init__`` with one numeric
    argument changed at a time; and the arguments that could not be changed."""
    cls, config = type(loss), loss.get_config()
    params = _init_params(cls)
    base = {n: config[n] for n in params if n in config}
    built, refused = [], []
    for name, param in params.items():
        current = config.get(name, param.default)
        if param.default is inspect.Parameter.empty and name not in config:
            continue
        for value in perturb(current):
            try:
                built.append((name, value, cls(**{**base, name: value})))
                break
            except Exception:  # noqa: BLE001 - an invalid value: try the next one
                continue
        else:
            if perturb(current):
                refused.append(name)
    return built, refused


@check(
    "config_perturbed",
    passes_when="an instance built with each numeric ``__init__`` argument changed "
    "(one at a time) has that value in ``get_config()`` and round-trips",
    fix="store each __init__ argument and return it (not a constant) from get_config()",
    needs="a Loss class",
    applies=a_class,
)
def check_config_perturbed(s: Subject) -> Outcome:
    built, refused = perturbed_instances(s.loss)
    if not built:
        return PASSED, "no numeric __init__ argument to change" + (
            f" ({', '.join(refused)} refused every other value)" if refused else ""
        )
    for name, value, inst in built:
        config = inst.get_config()
        if name in config and normalize(config[name]) != normalize(value):
            return FAILED, (
                f"built with {name}={value!r}, get_config() says {name}={config[name]!r}"
            )
        bad = _round_trip(inst, [s.batch])
        if bad:
            return FAILED, f"built with {name}={value!r}: {bad}"
    names = ", ".join(name for name, _, _ in built)
    return PASSED, f"{names} changed one at a time: kept in get_config(), round-trip"


@check(
    "config_json",
    passes_when="``keras.saving.serialize_keras_object(loss)`` is JSON",
    fix="keep only plain Python values (lists, not arrays or tensors) in get_config()",
)
def check_config_json(s: Subject) -> Outcome:
    try:
        serialized = keras.saving.serialize_keras_object(s.obj if s.fn else s.loss)
        json.dumps(serialized)
    except Exception as exc:  # noqa: BLE001
        return FAILED, f"serialize_keras_object() is not JSON-serializable: {first_line(exc)}"
    return PASSED, "serialize_keras_object() is JSON-serializable"


def reason_if_raised(fn, s: Subject) -> Outcome:
    try:
        return fn(s)
    except Exception as exc:  # noqa: BLE001 - a check that raises is a failure
        return FAILED, f"raised {first_line(exc)}"

"""The checks that need a small Keras model: names, metrics, mixed precision, saving."""

from __future__ import annotations

import os
from typing import Any

import keras
import numpy as np

from keras_ce_plugin.testing._checks import ATOL, RTOL, floating
from keras_ce_plugin.testing._inputs import (
    SEED,
    FunctionLoss,
    Subject,
    close,
    max_diff,
    to_numpy,
    with_reduction,
)
from keras_ce_plugin.testing._report import FAILED, PASSED, first_line
from keras_ce_plugin.testing._spec import Outcome, check

# Under mixed precision the model computes in half precision; against the float32
# model on the same rounded weights and inputs the loss moves by the half-precision
# rounding of a few (<= 5-term) dot products and the activation: ~1e-3 for float16
# (11-bit mantissa), ~1e-2 for bfloat16 (8-bit), relative and near 0 absolute.
MIXED_TOL = {"mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}


def build_model(s: Subject, dtype: Any = None) -> keras.Model:
    """Input -> Dense with y_pred's shape (softmax/sigmoid unless from_logits)."""
    b = s.batch
    width = b.y_pred.shape[-1]
    if s.targets == "example":
        act, init = None, "identity"
    else:
        act = None if s.from_logits else ("sigmoid" if s.targets == "binary" else "softmax")
        init = keras.initializers.GlorotUniform(seed=SEED)
    model = keras.Sequential(
        [
            keras.Input(b.x.shape[1:]),
            keras.layers.Dense(width, activation=act, kernel_initializer=init, dtype=dtype),
        ]
    )
    return model


def _default_instance(s: Subject) -> Any:
    """What ``compile(loss=name)`` should give: the class with its defaults, or the fn."""
    if s.fn is not None:
        return FunctionLoss(s.fn)
    return type(s.loss)()


def _loss_value(model: keras.Model, s: Subject, training: bool = False) -> np.ndarray:
    b = s.batch
    y_pred = model(b.x)
    return to_numpy(model.compute_loss(x=b.x, y=b.y_true, y_pred=y_pred, training=training))


def _in_a_fresh_process(s: Subject) -> Outcome:
    raise NotImplementedError("run_many runs this check in a fresh process")


check_keras_file = check(
    "keras_file",
    passes_when="a model compiled with the loss, trained one step and saved as ``.keras`` "
    "loads in a fresh process importing only the loss's module and the plugin "
    "(``safe_mode=True``, no ``custom_objects``) and gives the same loss",
    fix="register the loss and make get_config()/from_config() round-trip",
    needs="a fresh Python process (same backend)",
    fresh=True,
)(_in_a_fresh_process)


@check(
    "compile_by_name",
    passes_when='``compile(loss="package>Name")`` gives the same values as the class built '
    "with its defaults",
    fix="register the loss (and `import keras_ce_plugin`); the class must build with its defaults",
    needs="a registered name (else it fails)",
)
def check_compile_by_name(s: Subject) -> Outcome:
    if s.name is None:
        return FAILED, "no registered `package>Name` to compile by (see `registered`)"
    b = s.batch
    model = build_model(s)
    try:
        model.compile(optimizer="sgd", loss=s.name)
        got = _loss_value(model, s)
    except Exception as exc:  # noqa: BLE001
        return FAILED, f"compile(loss={s.name!r}) then computing the loss raised {first_line(exc)}"
    want = to_numpy(_default_instance(s)(b.y_true, model(b.x)))
    if not close(got, want, RTOL, ATOL):
        return FAILED, f"compile(loss={s.name!r}) gives other values ({max_diff(got, want)})"
    return PASSED, f"compile(loss={s.name!r}) gives the same values"


def _metric_value(model: keras.Model, s: Subject) -> float:
    b = s.batch
    results = model.compute_metrics(b.x, b.y_true, model(b.x))
    values = [to_numpy(v) for k, v in results.items() if k != "loss"]
    if len(values) != 1:
        raise ValueError(f"expected one metric, got {sorted(results)}")
    return float(values[0])


@check(
    "as_metric",
    passes_when='``metrics=["package>Name"]`` reports the mean of the per-sample values, and '
    "the model reloads",
    fix="register the loss and return per-sample values from call()",
    needs="a registered name (else it fails)",
)
def check_as_metric(s: Subject) -> Outcome:
    if s.name is None:
        return FAILED, "no registered `package>Name` to use in metrics=[...] (see `registered`)"
    b = s.batch
    model = build_model(s)
    try:
        model.compile(optimizer="sgd", loss="mse", metrics=[s.name])
        got = _metric_value(model, s)
    except Exception as exc:  # noqa: BLE001
        return FAILED, f"metrics=[{s.name!r}] raised {first_line(exc)}"
    default = _default_instance(s)
    want = float(np.mean(to_numpy(with_reduction(default, None)(b.y_true, model(b.x)))))
    if not close(got, want, RTOL, ATOL):
        return FAILED, (
            f"metrics=[{s.name!r}] reports {got:.6g}, the mean of the per-sample values "
            f"is {want:.6g}"
        )
    path = os.path.join(s.tmpdir, "as_metric.keras")
    try:
        model.save(path)
        again = _metric_value(keras.models.load_model(path), s)
    except Exception as exc:  # noqa: BLE001
        return (
            FAILED,
            f"a model compiled with metrics=[{s.name!r}] does not reload: {first_line(exc)}",
        )
    if not close(again, want, RTOL, ATOL):
        return FAILED, f"the reloaded model's metric reports {again:.6g}, not {want:.6g}"
    return PASSED, f"metrics=[{s.name!r}] is the mean of the per-sample values; reloads"


def _rounded(x: np.ndarray, policy: str) -> np.ndarray:
    half = "float16" if policy == "mixed_float16" else "bfloat16"
    return to_numpy(keras.ops.cast(keras.ops.cast(x, half), "float32"))


@check(
    "mixed_precision",
    passes_when="inside a model under ``mixed_float16``/``mixed_bfloat16``, a finite float32 "
    "loss close to the float32 model's",
    fix="compute in float32: cast y_pred/y_true with ops.cast before the math",
    needs="floating-point y_pred",
    applies=floating,
)
def check_mixed_precision(s: Subject) -> Outcome:
    b = s.batch
    notes = []
    for policy, tol in MIXED_TOL.items():
        model = build_model(s, dtype=policy)
        model.compile(optimizer="sgd", loss=s.loss)
        y_pred = model(b.x)
        try:
            value = model.compute_loss(x=b.x, y=b.y_true, y_pred=y_pred, training=False)
        except Exception as exc:  # noqa: BLE001
            return FAILED, f"under {policy}: {first_line(exc)}"
        # A custom training loop calls the loss on the float16 output directly.
        direct = s.loss(b.y_true, y_pred)
        dtypes = {keras.backend.standardize_dtype(v.dtype) for v in (value, direct)}
        value = to_numpy(value)
        ref = build_model(s)
        ref.set_weights([_rounded(w, policy) for w in model.get_weights()])
        ref.compile(optimizer="sgd", loss=s.loss)
        x = _rounded(b.x, policy)
        want = to_numpy(ref.compute_loss(x=x, y=b.y_true, y_pred=ref(x), training=False))
        if not np.all(np.isfinite(value)):
            return FAILED, f"under {policy} the loss is {value} (float32 model: {want:.6g})"
        if dtypes != {"float32"}:
            bad = sorted(dtypes - {"float32"})
            return FAILED, f"under {policy} the loss on the model's output is {bad[0]}, not float32"
        for got in (value, to_numpy(direct)):
            if not close(got, want, tol, tol):
                return FAILED, f"under {policy} the loss is {got:.6g}, float32 model {want:.6g}"
        notes.append(policy)
    return PASSED, f"finite float32 loss close to float32 under {' and '.join(notes)}"


def prepare_keras_file(
    s: Subject, tmpdir: str, index: int = 0
) -> tuple[Outcome | None, dict[str, Any]]:
    """Trains one step, saves ``model.keras``; returns (early outcome, worker job)."""
    b = s.batch
    model = build_model(s)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=s.obj if s.fn else s.loss)
    try:
        model.train_on_batch(b.x, b.y_true)
        value = float(_loss_value(model, s))
    except Exception as exc:  # noqa: BLE001
        return (FAILED, f"training one step raised {first_line(exc)}"), {}
    path = os.path.join(tmpdir, f"model-{index}.keras")
    try:
        model.save(path)
    except Exception as exc:  # noqa: BLE001
        return (FAILED, f"model.save() raised {first_line(exc)}"), {}
    return None, {"path": path, "value": value}


def keras_file_outcome(job: dict[str, Any], result: dict[str, Any]) -> Outcome:
    if "error" in result:
        return FAILED, f"loading in a fresh process failed: {result['error']}"
    got, want = result["value"], job["value"]
    if not close(got, want, RTOL, ATOL):
        return FAILED, f"the reloaded model's loss is {got:.6g}, not {want:.6g}"
    return PASSED, "saved .keras loads in a fresh process (safe_mode, no custom_objects)"

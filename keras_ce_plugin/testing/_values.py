"""The checks on values: per-sample shape, reductions, weights, masks, edges, gradients."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_ce_plugin.testing._checks import (
    ATOL,
    ATOL_REFERENCE,
    REDUCTIONS,
    RTOL,
    RTOL_REFERENCE,
    _init_params,
    floating,
    fmt,
    keras_reduce,
    normalize,
    per_sample,
    sample_by_sample,
    sample_weights,
)
from keras_ce_plugin.testing._inputs import (
    Batch,
    Subject,
    close,
    max_diff,
    to_numpy,
    value_and_grad,
    with_reduction,
)
from keras_ce_plugin.testing._report import FAILED, PASSED, SKIPPED, first_line
from keras_ce_plugin.testing._spec import Outcome, check

# Finite differences: a step of 1e-3 on entries in [0.05, 0.95] (probabilities) keeps
# clear of the clip at epsilon; the central difference's truncation error there is
# h^2 |f'''| / 6 <= 1e-6 * 2 / 0.05^3 / 6 ~ 3e-3 relative to the gradient's size, and
# float32 rounding of a sum of ~10 adds ~6e-8 * 10 / 2e-3 ~ 3e-4 absolute. A sign flip
# or a factor of 2 is off by 100% or more.
FD_STEP, FD_RTOL, FD_ATOL = 1e-3, 1e-2, 1e-3
FD_ENTRIES = 6


def _kind(s: Subject) -> str:
    return "the example's" if s.targets == "example" else f"{s.targets}"


@check(
    "output_shape",
    passes_when="``call`` returns ``y_pred.shape[:-1]`` values (``(batch,)`` for the three "
    "target kinds: one value per sample, the class axis reduced, as Keras' losses)",
    fix="reduce over the class axis only: e.g. ops.sum(..., axis=-1), never over the batch",
)
def check_output_shape(s: Subject) -> Outcome:
    for batch in (s.batch, s.partial):
        values = per_sample(s, batch)
        want = tuple(batch.y_pred.shape[:-1])
        if values.shape != want:
            return FAILED, (
                f"call() returns shape {values.shape} for y_pred {batch.y_pred.shape} "
                f"({_kind(s)} targets): Keras' losses return y_pred.shape[:-1] = {want}"
            )
    return PASSED, f"call() returns y_pred.shape[:-1] = {tuple(s.batch.y_pred.shape[:-1])}"


@check(
    "sample_weight",
    passes_when="a weighted call equals Keras' weighted reduction of the per-sample values "
    "(each sample computed alone)",
    fix="return one value per sample from call() and let Keras reduce (no mean over the batch)",
)
def check_sample_weight(s: Subject) -> Outcome:
    b = s.batch
    w = sample_weights(b.y_pred.shape[:-1])
    actual = to_numpy(s.loss(b.y_true, b.y_pred, sample_weight=w))
    expected = keras_reduce(sample_by_sample(s, b), s.loss.reduction, w)
    if not close(actual, expected, RTOL, ATOL):
        return FAILED, (
            f"a weighted call gives {fmt(actual)}, Keras' weighted reduction of the "
            f"per-sample values {fmt(expected)}: the weights do not weight the samples"
        )
    return PASSED, f"weighted call equals Keras' {s.loss.reduction!r} reduction"


def _rebuilt(s: Subject, reduction: str | None) -> keras.losses.Loss:
    # Through the constructor (a reduction that __init__ drops is caught), where the
    # config round-trips; otherwise (config_roundtrip reports that) a patched copy.
    if s.fn is None and "reduction" in _init_params(type(s.loss)):
        try:
            config = {**s.loss.get_config(), "reduction": reduction}
            new = type(s.loss).from_config(config)
            if normalize({**new.get_config(), "reduction": reduction}) == normalize(config):
                return new
        except Exception:  # noqa: BLE001
            pass
    return with_reduction(s.loss, reduction)


@check(
    "reduction",
    passes_when="``call`` returns one value per sample (each independent of the others); "
    '``"sum"``, ``"sum_over_batch_size"``, ``"mean_with_sample_weight"`` and ``None`` '
    "agree with it",
    fix="return one value per sample from call(): reduce over the class axis only",
)
def check_reduction(s: Subject) -> Outcome:
    b = s.batch
    n = b.y_pred.shape[0]
    values = per_sample(s, b)
    if values.ndim == 0 or values.shape[0] != n:
        return FAILED, (
            f"call() returns shape {values.shape} for a batch of {n}: it reduces over "
            "the batch axis, so Keras' reduction and sample weights have nothing to act on"
        )
    alone = sample_by_sample(s, b)
    if not close(values, alone, RTOL, ATOL):
        return FAILED, (
            "a sample's value depends on the other samples of the batch "
            f"({max_diff(values, alone)} from computing each sample alone)"
        )
    for reduction in REDUCTIONS:  # Unweighted: weights are `sample_weight`'s business.
        got = to_numpy(_rebuilt(s, reduction)(b.y_true, b.y_pred))
        want = keras_reduce(values, reduction)
        if not close(got, want, RTOL, ATOL):
            return FAILED, f"reduction={reduction!r} disagrees with call() ({max_diff(got, want)})"
    return PASSED, f"call() is per-sample {values.shape}; all {len(REDUCTIONS)} reductions agree"


@check(
    "mask",
    passes_when="a ``y_pred`` carrying a Keras mask (from a ``Masking`` layer, as in a "
    "masked sequence model) is reduced as Keras' losses reduce it: masked samples "
    "dropped, every reduction",
    fix="let Loss.__call__ reduce (it reads y_pred's mask); an overridden __call__ must "
    "apply the mask of y_pred itself",
    needs="floating-point y_pred",
    applies=floating,
)
def check_mask(s: Subject) -> Outcome:
    b = s.batch
    masked_out = [1, b.y_pred.shape[0] - 2]  # a Masking layer makes their y_pred rows 0
    y_pred = b.y_pred.copy()
    y_pred[masked_out] = 0.0
    keep = np.any(y_pred != 0.0, axis=-1)
    masked = keras.layers.Masking(mask_value=0.0)(y_pred)
    values = per_sample(s, Batch(b.y_true, y_pred, b.x)).astype("float64")
    if values.shape != keep.shape:
        return SKIPPED, f"per-sample shape {values.shape} is not the mask's {keep.shape}"
    if not np.all(np.isfinite(values)):
        return SKIPPED, "the loss is not finite on an all-zero row (a Masking layer's output)"
    for reduction in REDUCTIONS:
        got = to_numpy(with_reduction(s.loss, reduction)(b.y_true, masked))
        # Keras' rule (keras.losses.Loss.__call__): the mask is a weight; for the
        # mean reductions, over the samples kept.
        weight = keep.astype("float32")
        if reduction == "sum_over_batch_size":
            weight *= keep.size / max(1, int(keep.sum()))
        want = keras_reduce(values, reduction, weight)
        if not close(got, want, RTOL, ATOL):
            return FAILED, (
                f"with samples {masked_out} masked, reduction={reduction!r} gives {fmt(got)}, "
                f"Keras' masked reduction {fmt(want)}: the mask is ignored"
            )
    return PASSED, f"masked samples dropped in all {len(REDUCTIONS)} reductions"


def _shape_variants(s: Subject) -> list[tuple[str, np.ndarray, np.ndarray]]:
    yt, yp = s.batch.y_true, s.batch.y_pred
    n = yp.shape[0]
    if s.targets == "categorical":
        return [("int32 one-hot y_true", yt.astype("int32"), yp)]
    if s.targets == "sparse":
        return [
            (f"y_true {(n, 1)}", yt.reshape(n, 1), yp),
            ("int64 y_true", yt.astype("int64"), yp),
            ("float32 y_true", yt.astype("float32"), yp),
        ]
    return [
        (f"y_true {(n,)} with y_pred {yp.shape}", yt.reshape(n), yp),
        ("int32 y_true", yt.astype("int32"), yp),
    ]


@check(
    "shapes",
    passes_when="label shapes/dtypes Keras accepts for the target kind give the same values, "
    "never a silent ``(B, B)`` broadcast",
    fix="squeeze/expand y_true to y_pred's rank explicitly before combining them",
    needs="one of the three target kinds (not an `example`)",
    applies=lambda s: (
        "no label shape variants are known for a custom `example`"
        if s.targets == "example"
        else None
    ),
)
def check_shapes(s: Subject) -> Outcome:
    base = per_sample(s, s.batch)
    base_red = to_numpy(s.loss(s.batch.y_true, s.batch.y_pred))
    none = with_reduction(s.loss, None)
    for what, yt, yp in _shape_variants(s):
        try:
            got = to_numpy(none(yt, yp))
            red = to_numpy(s.loss(yt, yp))
        except Exception as exc:  # noqa: BLE001
            return FAILED, f"{what} (accepted by Keras' built-ins) raises {first_line(exc)}"
        if got.shape != base.shape:
            n = yp.shape[0]
            how = " (a silent broadcast)" if got.shape[:2] == (n, n) else ""
            return FAILED, f"{what} gives per-sample shape {got.shape}, not {base.shape}{how}"
        if not (close(got, base, RTOL, ATOL) and close(red, base_red, RTOL, ATOL)):
            return FAILED, f"{what} gives other values ({max_diff(got, base)})"
    return PASSED, f"{len(_shape_variants(s))} label shape/dtype variants give the same values"


def _edge_batch(s: Subject) -> tuple[Any, np.ndarray, str]:
    """Labels and predictions at the edges of the valid inputs."""
    c = s.batch.y_pred.shape[-1]
    if s.targets == "binary":
        y = np.array([[0.0], [0.0], [1.0], [1.0]], "float32")
        p = np.array([[0.0], [1.0], [0.0], [1.0]], "float32")
        if s.from_logits:
            return y, (2.0 * p - 1.0) * 1e4, "logits of +-1e4"
        return y, p, "probabilities 0 and 1"
    labels = np.array([0, 1, 2, 0], "int32") % c
    eye = np.eye(c, dtype="float32")
    p = np.stack([eye[labels[0]], eye[(labels[1] + 1) % c], eye[labels[2]], eye[labels[3]]])
    p[3] = (1.0 - eye[labels[3]]) / (c - 1)  # true class 0, the others share the mass
    y = labels if s.targets == "sparse" else eye[labels]
    if s.from_logits:
        return y, (2.0 * p - 1.0) * 1e4, "logits of +-1e4"
    return y, p, "probabilities 0 and 1 for the true and the other classes"


def _finite(s: Subject, y: Any, p: np.ndarray) -> str | None:
    """Which of value and gradient is not finite (a missing gradient is `gradient`'s)."""
    value, grad = value_and_grad(lambda yp: ops.sum(s.loss(y, yp)), p)
    bad = [
        what
        for what, array in (("value", value), ("gradient", grad))
        if array is not None and not np.all(np.isfinite(array))
    ]
    return " and ".join(bad) if bad else None


@check(
    "finite",
    passes_when="value and gradient finite at probability 0 and 1 (logits of +-1e4 for "
    "``from_logits``); an all-zero prediction row is reported, informational",
    fix="clip probabilities to [epsilon, 1 - epsilon] (or use log_softmax on logits)",
)
def check_finite(s: Subject) -> Outcome:
    if s.targets == "example":
        bad = _finite(s, s.batch.y_true, s.batch.y_pred)
        if bad:
            return FAILED, f"{bad} not finite on the example batch"
        return PASSED, "finite on the example batch (edges unknown for a custom example)"
    y, p, what = _edge_batch(s)
    bad = _finite(s, y, p)
    if bad:
        return FAILED, f"{bad} not finite at {what}"
    note = ""
    if not s.from_logits and s.targets != "binary":
        zero = _finite(s, y[:1], np.zeros_like(p[:1]))
        note = f"; all-zero prediction row: {zero} not finite (informational)" if zero else ""
        note = note or "; all-zero prediction row finite"
    return PASSED, f"value and gradient finite at {what}{note}"


@check(
    "reference",
    passes_when="only with ``reference=``: per-sample values match the NumPy function",
    fix="compare the formula with the reference; check the clipping epsilon and the axis",
    needs="``reference=``, a NumPy function",
    applies=lambda s: "no `reference=` function given" if s.reference is None else None,
)
def check_reference(s: Subject) -> Outcome:
    assert s.reference is not None
    for batch in (s.batch, s.partial):
        want = np.asarray(s.reference(batch.y_true, batch.y_pred), dtype="float64")
        got = per_sample(s, batch)
        if not close(got, want, RTOL_REFERENCE, ATOL_REFERENCE):
            return FAILED, f"per-sample values differ from the reference ({max_diff(got, want)})"
    return PASSED, "per-sample values match the NumPy reference"


def _gradient(s: Subject) -> np.ndarray | None:
    b = s.batch
    return value_and_grad(lambda yp: ops.sum(s.loss(b.y_true, yp)), b.y_pred)[1]


@check(
    "gradient",
    passes_when="the gradient w.r.t. ``y_pred`` exists, is finite and not identically zero "
    "on random inputs",
    fix="use differentiable keras.ops only (no argmax/round/stop_gradient/NumPy on y_pred)",
    needs="floating-point y_pred",
    applies=floating,
)
def check_gradient(s: Subject) -> Outcome:
    grad = _gradient(s)
    if grad is None:
        return FAILED, "no gradient w.r.t. y_pred (a non-differentiable op or a NumPy round trip)"
    if not np.all(np.isfinite(grad)):
        return FAILED, "the gradient w.r.t. y_pred is not finite on random inputs"
    if not np.any(grad):
        return FAILED, "the gradient w.r.t. y_pred is identically zero on random inputs"
    return PASSED, "gradient w.r.t. y_pred exists, finite and non-zero"


def _float64(s: Subject) -> tuple[keras.losses.Loss, str]:
    """The loss computing in float64 where its config takes ``dtype`` (and rebuilds the
    same loss: a broken config is another check's), else as is."""
    if s.fn is None:
        try:
            new = type(s.loss).from_config({**s.loss.get_config(), "dtype": "float64"})
            b = s.batch
            probe = new(b.y_true, b.y_pred.astype("float64"))
            same = close(to_numpy(probe), to_numpy(s.loss(b.y_true, b.y_pred)), 1e-4, 1e-5)
            if keras.backend.standardize_dtype(probe.dtype) == "float64" and same:
                return new, "float64"
        except Exception:  # noqa: BLE001 - no float64 variant: float32 differences
            pass
    return s.loss, "float32"


def _entries(s: Subject, grad: np.ndarray) -> list[tuple[int, ...]]:
    """The largest-gradient entries and seeded random ones, away from the clip."""
    p = s.batch.y_pred
    valid = np.ones(p.shape, bool)
    if not s.from_logits and s.targets != "example":
        valid = (p > 0.05) & (p < 0.95)
    index = np.argwhere(valid)
    if not len(index):
        return []
    order = np.argsort(-np.abs(grad[valid]), kind="stable")[: FD_ENTRIES // 2]
    rng = np.random.default_rng(0)
    extra = rng.choice(len(index), size=min(len(index), FD_ENTRIES // 2), replace=False)
    chosen = dict.fromkeys(tuple(int(i) for i in index[k]) for k in [*order, *extra])
    return list(chosen)


def _central(f, x: np.ndarray, entries: list[tuple[int, ...]], h: float) -> np.ndarray:
    out = []
    for e in entries:
        up, down = x.copy(), x.copy()
        up[e] += h
        down[e] -= h
        out.append((f(up) - f(down)) / (2.0 * h))
    return np.asarray(out)


@check(
    "gradient_value",
    passes_when="the gradient w.r.t. ``y_pred`` equals central finite differences (in "
    "float64 where the loss takes ``dtype``) on a few entries, and the finite "
    "differences of ``reference`` when given",
    fix="remove or correct the custom gradient (ops.custom_gradient, stop_gradient tricks): "
    "it must be the derivative of the value",
    needs="floating-point y_pred",
    applies=floating,
)
def check_gradient_value(s: Subject) -> Outcome:
    y_true = s.batch.y_true
    # Of the sum of the per-sample values: the reference's scale.
    none = with_reduction(s.loss, None)
    grad = value_and_grad(lambda yp: ops.sum(none(y_true, yp)), s.batch.y_pred)[1]
    if grad is None or not np.all(np.isfinite(grad)) or not np.any(grad):
        return SKIPPED, "no usable gradient (the `gradient` check reports it)"
    entries = _entries(s, grad)
    if not entries:
        return SKIPPED, "no entry of y_pred away from the clipping edges"
    loss, precision = _float64(s)
    loss = with_reduction(loss, None)
    x = s.batch.y_pred.astype(precision)

    def f(y_pred):
        return float(to_numpy(ops.sum(loss(y_true, y_pred))))

    auto = np.asarray([grad[e] for e in entries], "float64")
    atol = FD_ATOL * max(1.0, float(np.max(np.abs(auto))))
    numeric = _central(f, x, entries, FD_STEP)
    if not np.allclose(auto, numeric, rtol=FD_RTOL, atol=atol):
        return FAILED, (
            f"the gradient at entries {entries[:3]}... is {fmt(auto[:3])}, central finite "
            f"differences ({precision}) give {fmt(numeric[:3])}: a wrong custom gradient"
        )
    note = ""
    if s.reference is not None:
        ref = s.reference

        def g(y_pred):
            return float(np.sum(np.asarray(ref(y_true, y_pred), "float64")))

        want = _central(g, s.batch.y_pred.astype("float64"), entries, FD_STEP)
        if not np.allclose(auto, want, rtol=FD_RTOL, atol=atol):
            return FAILED, (
                f"the gradient is {fmt(auto[:3])}, the reference's finite differences "
                f"{fmt(want[:3])}"
            )
        note = " and the reference's"
    return PASSED, f"gradient = central differences ({precision}){note} on {len(entries)} entries"

"""Each behaviour the README claims, checked as the README states it.

The README's "Claims and their tests" table points here (or to the test that
proves a claim elsewhere).
"""

from __future__ import annotations

import math
import textwrap

import keras
import numpy as np
import pytest
from conftest import REPO, run_python

from keras_ce_plugin import BinaryCE, CategoricalCE, SparseCategoricalCE

SAVE_STRING_COMPILED = """
import numpy as np, keras
import keras_ce_plugin  # noqa: F401
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
model.compile(optimizer="adam", loss="customloss>CategoricalCE")
x = np.random.rand(8, 4).astype("float32")
y = np.eye(3, dtype="float32")[np.arange(8) % 3]
model.fit(x, y, epochs=1, verbose=0)
model.save({path!r})
np.savez({data!r}, x=x, y=y)
"""


def test_without_the_plugin_a_string_compiled_model_loads_and_fails_at_first_use(tmp_path):
    """README, Usage: without ``import keras_ce_plugin`` a ``compile=True`` load succeeds,
    and the first ``evaluate``/``fit`` fails with Keras' *Could not interpret loss
    identifier*; ``compile=False`` gives a model for inference."""
    path, data = str(tmp_path / "m.keras"), str(tmp_path / "d.npz")
    run_python(SAVE_STRING_COMPILED.format(path=path, data=data), cwd=REPO)
    code = textwrap.dedent(
        f"""
        import sys, numpy as np, keras
        d = np.load({data!r})
        model = keras.models.load_model({path!r})  # compile=True: loads
        print("LOADED")
        assert "keras_ce_plugin" not in sys.modules
        try:
            model.evaluate(d["x"], d["y"], verbose=0)
        except ValueError as exc:
            print("EVALUATE", " ".join(str(exc).split()))
        inference = keras.models.load_model({path!r}, compile=False)
        print("PREDICT", inference.predict(d["x"], verbose=0).shape)
        """
    )
    out = run_python(code, cwd=str(tmp_path)).stdout
    assert "LOADED" in out, out
    evaluate = next(line for line in out.splitlines() if line.startswith("EVALUATE"))
    assert "Could not interpret loss identifier" in evaluate, evaluate
    assert "customloss>CategoricalCE" in evaluate, evaluate
    assert "PREDICT (8, 3)" in out, out


# --------------------------------------------------------------------------- #
# README, API > Bad input: NaN/Inf inputs give NaN, so TerminateOnNaN stops training
# --------------------------------------------------------------------------- #
def _case(kind: str, from_logits: bool, where: str, bad: float):
    """A 4-sample, 3-class batch with one non-finite entry in sample 1."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.1, 0.9, size=(4, 3)).astype("float32")
    if not from_logits:
        p /= p.sum(-1, keepdims=True)
    if kind == "scce":
        y = np.array([0, 1, 2, 0], "float32")
    elif kind == "cce":
        y = np.eye(3, dtype="float32")[[0, 1, 2, 0]]
    else:
        y = (rng.uniform(size=(4, 3)) > 0.5).astype("float32")
    if where == "y_pred":
        p[1, 2] = bad  # class 2 is not sample 1's target
    elif kind == "scce":
        y[1] = bad
    else:
        y[1, 2] = bad
    return y, p


def _non_finite_params():
    params = []
    for kind in ("cce", "scce", "bce"):
        for from_logits in (False, True):
            for where in ("y_pred", "y_true"):
                for bad in (math.nan, math.inf, -math.inf):
                    name = f"{kind}-{'logits' if from_logits else 'probs'}-{where}-{bad}"
                    params.append(pytest.param(kind, from_logits, where, bad, id=name))
    return params


def _probability_zero_logit(kind: str, from_logits: bool, where: str, bad: float) -> bool:
    """A -inf logit for a class that is not the sparse label: a valid probability of 0."""
    return (kind, from_logits, where, bad) == ("scce", True, "y_pred", -math.inf)


@pytest.mark.parametrize("kind,from_logits,where,bad", _non_finite_params())
def test_nan_or_inf_input_is_never_a_silently_finite_loss(kind, from_logits, where, bad):
    """README, Bad input: a NaN input gives NaN, an infinite one NaN or +-inf; the one
    finite case is a -inf logit on a class other than the sparse label (probability 0),
    whose loss is the float64 softmax cross-entropy of the remaining logits."""
    y, p = _case(kind, from_logits, where, bad)
    cls = {"cce": CategoricalCE, "scce": SparseCategoricalCE, "bce": BinaryCE}[kind]
    per_sample = keras.ops.convert_to_numpy(cls(from_logits=from_logits, reduction=None)(y, p))
    reduced = float(cls(from_logits=from_logits)(y, p))
    assert np.all(np.isfinite(np.delete(per_sample, 1))), per_sample  # only sample 1
    if _probability_zero_logit(kind, from_logits, where, bad):
        logits = p[1].astype("float64")
        target = int(y[1])
        finite = logits[np.isfinite(logits)]
        expected = np.log(np.sum(np.exp(finite))) - logits[target]
        # float32 log-sum-exp of three O(1) logits: a few ulps.
        np.testing.assert_allclose(per_sample[1], expected, rtol=1e-6)
        assert np.isfinite(reduced)
    elif math.isnan(bad):
        assert np.isnan(per_sample[1]) and np.isnan(reduced), (per_sample, reduced)
    else:
        assert not np.isfinite(per_sample[1]) and not np.isfinite(reduced), (per_sample, reduced)


@pytest.mark.parametrize("where,bad", [("x", math.nan), ("x", math.inf), ("y", math.nan)])
def test_terminate_on_nan_stops_fit_at_the_first_batch(where, bad):
    """README, Bad input: NaN/Inf inputs give NaN "(so keras.callbacks.TerminateOnNaN
    stops training)", with the loss compiled by its string name."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(12) % 3]
    (x if where == "x" else y)[0, 0] = bad  # in the first batch
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="customloss>CategoricalCE")
    history = model.fit(
        x,
        y,
        batch_size=4,
        epochs=3,  # 3 batches x 3 epochs without the callback
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert model.stop_training is True
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 1  # one batch
    assert len(history.history["loss"]) == 1 and np.isnan(history.history["loss"][0])


# --------------------------------------------------------------------------- #
# README, API > class_weights: soft targets, segmentation maps, multi-output models
# --------------------------------------------------------------------------- #
W3 = np.array([0.5, 2.0, 1.5])
W5 = np.array([1.0, 0.25, 3.0, 0.0, 2.0])


def test_class_weights_on_a_channels_first_segmentation_map_with_soft_targets():
    """README, class_weights: ``-sum_c w_c * y_c * log p_c`` (the sparse loss: the true
    class' weight), also for segmentation maps and soft targets."""
    rng = np.random.default_rng(3)
    shape = (2, 5, 3, 4)  # (batch, classes, height, width)
    p = rng.uniform(0.05, 1.0, size=shape)
    p /= p.sum(axis=1, keepdims=True)  # no clipping anywhere: p >= ~0.01
    soft = rng.dirichlet(np.ones(5), size=(2, 3, 4)).transpose(0, 3, 1, 2)  # soft targets
    expected = -(W5[None, :, None, None] * soft * np.log(p)).sum(axis=1)
    got = CategoricalCE(axis=1, class_weights=W5.tolist(), reduction=None)(
        soft.astype("float32"), p.astype("float32")
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, rtol=1e-5)

    labels = rng.integers(0, 5, size=(2, 3, 4))
    p_true = np.take_along_axis(p, labels[:, None], axis=1)[:, 0]
    expected = -W5[labels] * np.log(p_true)
    got = SparseCategoricalCE(axis=1, class_weights=W5.tolist(), reduction=None)(
        labels, p.astype("float32")
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), expected, rtol=1e-5)


def test_class_weights_per_output_of_a_multi_output_model(tmp_path):
    """README, class_weights: "works for multi-output models" (Keras' fit(class_weight=...)
    is single-output only); each output keeps its own weights through save/load."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 4)).astype("float32")
    ya = np.eye(3, dtype="float32")[rng.integers(0, 3, 16)]
    yb = rng.integers(0, 5, 16)
    inputs = keras.Input((4,))
    a = keras.layers.Dense(3, activation="softmax", name="a")(inputs)
    b = keras.layers.Dense(5, activation="softmax", name="b")(inputs)
    model = keras.Model(inputs, {"a": a, "b": b})
    model.compile(
        optimizer="sgd",
        loss={
            "a": CategoricalCE(class_weights=W3.tolist()),
            "b": SparseCategoricalCE(class_weights=W5.tolist()),
        },
    )
    pred = model.predict(x, verbose=0)
    pa, pb = np.float64(pred["a"]), np.float64(pred["b"])
    loss_a = np.mean(-(W3 * ya * np.log(pa)).sum(-1))
    loss_b = np.mean(-W5[yb] * np.log(pb[np.arange(16), yb]))
    y = {"a": ya, "b": yb}
    got = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    assert got["loss"] == pytest.approx(loss_a + loss_b, rel=1e-5)
    assert got["a_loss"] == pytest.approx(loss_a, rel=1e-5)
    assert got["b_loss"] == pytest.approx(loss_b, rel=1e-5)

    path = tmp_path / "two_outputs.keras"
    model.save(path)
    again = keras.models.load_model(path)
    assert again.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)["loss"] == (
        pytest.approx(loss_a + loss_b, rel=1e-5)
    )

"""keras_ce_plugin.testing.check_loss: no false positives, and each check catches its bug.

The plugin's losses and a correct user loss with extra arguments pass every
check; each deliberately broken loss below fails exactly the checks its bug
implies, on each backend (the table runs again under JAX and torch, each in one
fresh pytest process). The fresh-process checks (``keras_file``, ``backends``) run
once for all losses together (one process per backend); the broken-loss table runs
the in-process checks only, plus dedicated losses for the two fresh-process checks.
"""

from __future__ import annotations

import json
import os
import re
import sys

import keras
import numpy as np
import pytest
from conftest import require_backend, rerun_from_tensorflow
from keras import ops

import keras_ce_plugin
import keras_ce_plugin.large_vocab
from keras_ce_plugin.testing import CHECKS, LossContractError, check_loss, check_losses

PKG = "check_loss_tests"
BACKEND = keras.backend.backend()
EPS = 1e-7
IN_PROCESS = [c for c in CHECKS if c not in ("keras_file", "backends")]


# --------------------------------------------------------------------------- #
# A correct user loss with extra arguments, and its float64 NumPy reference
# --------------------------------------------------------------------------- #
@keras.saving.register_keras_serializable(package=PKG, name="FocalCE")
class FocalCE(keras.losses.Loss):
    """Focal cross-entropy ``-sum_c w_c y_c (1 - p_c)^gamma log p_c`` per sample."""

    def __init__(
        self,
        gamma=2.0,
        class_weights=None,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="focal_ce",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.gamma = float(gamma)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.from_logits = from_logits
        self._dtype_arg = dtype

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        if self.from_logits:
            log_p = ops.log_softmax(y_pred, axis=-1)
        else:
            log_p = ops.log(ops.clip(y_pred, EPS, 1.0 - EPS))
        terms = y_true * (1.0 - ops.exp(log_p)) ** self.gamma * log_p
        if self.class_weights is not None:
            terms = terms * ops.convert_to_tensor(self.class_weights, dtype=terms.dtype)
        return -ops.sum(terms, axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "gamma": self.gamma,
            "class_weights": self.class_weights,
            "from_logits": self.from_logits,
            "dtype": self._dtype_arg,
        }


def focal_reference(gamma=2.0, class_weights=None, from_logits=False):
    def ref(y_true, y_pred):
        y, z = np.asarray(y_true, "float64"), np.asarray(y_pred, "float64")
        if from_logits:
            z = z - z.max(axis=-1, keepdims=True)
            log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        else:
            log_p = np.log(np.clip(z, EPS, 1.0 - EPS))
        w = np.ones(z.shape[-1]) if class_weights is None else np.asarray(class_weights)
        return -(w * y * (1.0 - np.exp(log_p)) ** gamma * log_p).sum(axis=-1)

    return ref


@keras.saving.register_keras_serializable(package=PKG, name="mean_abs_error")
def mean_abs_error(y_true, y_pred):
    """A registered loss function for an `example` batch (regression)."""
    return ops.mean(ops.abs(ops.cast(y_true, y_pred.dtype) - y_pred), axis=-1)


# --------------------------------------------------------------------------- #
# Broken losses: each differs from FocalCE by one bug
# --------------------------------------------------------------------------- #
class Unregistered(FocalCE):
    """Not decorated with register_keras_serializable."""


@keras.saving.register_keras_serializable(package=PKG, name="NoDtypeInConfig")
class NoDtypeInConfig(FocalCE):
    def get_config(self):
        config = super().get_config()
        del config["dtype"]
        return config


@keras.saving.register_keras_serializable(package=PKG, name="WrongConfig")
class WrongConfig(FocalCE):
    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma + 1.0}


@keras.saving.register_keras_serializable(package=PKG, name="SetConfig")
class SetConfig(FocalCE):
    def __init__(self, tags=("focal",), **kwargs):
        super().__init__(**kwargs)
        self.tags = set(tags)

    def get_config(self):
        return {**super().get_config(), "tags": self.tags}


@keras.saving.register_keras_serializable(package=PKG, name="IgnoresWeights")
class IgnoresWeights(FocalCE):
    def __call__(self, y_true, y_pred, sample_weight=None):
        return super().__call__(y_true, y_pred)


@keras.saving.register_keras_serializable(package=PKG, name="SwallowsReduction")
class SwallowsReduction(FocalCE):
    def __init__(self, reduction="sum_over_batch_size", **kwargs):
        super().__init__(**kwargs)  # `reduction` never reaches Loss.__init__
        self._reduction_arg = reduction

    def get_config(self):
        return {**super().get_config(), "reduction": self._reduction_arg}


@keras.saving.register_keras_serializable(package=PKG, name="MeanInCall")
class MeanInCall(FocalCE):
    def call(self, y_true, y_pred):
        return ops.mean(super().call(y_true, y_pred))


@keras.saving.register_keras_serializable(package=PKG, name="NoClip")
class NoClip(FocalCE):
    def call(self, y_true, y_pred):
        return -ops.sum(ops.cast(y_true, y_pred.dtype) * ops.log(y_pred), axis=-1)


@keras.saving.register_keras_serializable(package=PKG, name="StopsGradient")
class StopsGradient(FocalCE):
    def call(self, y_true, y_pred):
        return super().call(y_true, ops.stop_gradient(y_pred))


@keras.saving.register_keras_serializable(package=PKG, name="StaticBatch")
class StaticBatch(FocalCE):
    def call(self, y_true, y_pred):
        return ops.reshape(super().call(y_true, y_pred), (int(y_pred.shape[0]),))


class _Given(keras.losses.Loss):
    def call(self, y_true, y_pred):
        return y_pred


@keras.saving.register_keras_serializable(package=PKG, name="HalfPrecision")
class HalfPrecision(FocalCE):
    """Skips Loss.__call__'s cast: under mixed_float16 it computes in float16."""

    def __call__(self, y_true, y_pred, sample_weight=None):
        values = self.call(ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred))
        reduce = _Given(reduction=self.reduction, dtype=values.dtype, name="given")
        return reduce(values, values, sample_weight=sample_weight)


@keras.saving.register_keras_serializable(package=PKG, name="BinaryBroadcast")
class BinaryBroadcast(FocalCE):
    """Binary CE that combines (B,) labels with (B, 1) predictions by broadcasting."""

    def call(self, y_true, y_pred):
        p = ops.clip(y_pred, EPS, 1.0 - EPS)
        y = ops.cast(y_true, p.dtype)
        return -ops.mean(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p), axis=-1)


@keras.saving.register_keras_serializable(package=PKG, name="NeedsArgument")
class NeedsArgument(FocalCE):
    def __init__(self, temperature, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package=PKG, name="TfOps")
class TfOps(FocalCE):
    """Written with tf.* ops: fine on TensorFlow, nowhere else."""

    def call(self, y_true, y_pred):
        import tensorflow as tf

        p = tf.clip_by_value(y_pred, EPS, 1.0 - EPS)
        return -tf.reduce_sum(tf.cast(y_true, p.dtype) * tf.math.log(p), axis=-1)


@keras.saving.register_keras_serializable(package=PKG, name="ForgetsSum")
class ForgetsSum(FocalCE):
    """Forgets the sum over classes: returns (batch, classes)."""

    def call(self, y_true, y_pred):
        p = ops.clip(y_pred, EPS, 1.0 - EPS)
        return -ops.cast(y_true, p.dtype) * ops.log(p)


def _scaled_gradient(values, factor):
    """``values`` unchanged, their gradient times ``factor`` (a wrong custom gradient)."""
    stopped = ops.stop_gradient(values)
    return stopped + factor * (values - stopped)


@keras.saving.register_keras_serializable(package=PKG, name="FlippedGradient")
class FlippedGradient(FocalCE):
    def call(self, y_true, y_pred):
        return _scaled_gradient(super().call(y_true, y_pred), -1.0)


@keras.saving.register_keras_serializable(package=PKG, name="DoubledGradient")
class DoubledGradient(FocalCE):
    def call(self, y_true, y_pred):
        return _scaled_gradient(super().call(y_true, y_pred), 2.0)


@keras.saving.register_keras_serializable(package=PKG, name="ConstantConfig")
class ConstantConfig(FocalCE):
    """get_config() writes the default, not self.gamma: right at the defaults only."""

    def get_config(self):
        return {**super().get_config(), "gamma": 2.0}


@keras.saving.register_keras_serializable(package=PKG, name="IgnoresMask")
class IgnoresMask(FocalCE):
    """Drops y_pred's Keras mask (a new tensor) before Loss.__call__ can read it."""

    def __call__(self, y_true, y_pred, sample_weight=None):
        return super().__call__(y_true, ops.convert_to_tensor(y_pred) + 0.0, sample_weight)


@keras.saving.register_keras_serializable(package=PKG, name="NoGradientOnTorch")
class NoGradientOnTorch(FocalCE):
    """Differentiable except on torch (as a NumPy round trip in one backend's branch)."""

    def call(self, y_true, y_pred):
        if keras.backend.backend() == "torch":
            y_pred = ops.stop_gradient(y_pred)
        return super().call(y_true, y_pred)


def _local_class():
    @keras.saving.register_keras_serializable(package=PKG, name="LocalLoss")
    class LocalLoss(FocalCE):
        """Registered only when this function runs: a fresh process cannot find it."""

    return LocalLoss()


# bug -> (loss, check_loss kwargs, failed checks among the in-process ones, and
# per backend where it differs). The first check in CHECKS order that fails is the
# one the bug is named after ("it first catches"), except for the consequences
# listed beside it.
BROKEN = {
    "registered": (Unregistered(), {}, {"registered", "compile_by_name", "as_metric"}),
    "config_complete": (NoDtypeInConfig(), {}, {"config_complete"}),
    "config_roundtrip": (WrongConfig(), {}, {"config_roundtrip", "config_perturbed"}),
    "config_perturbed": (ConstantConfig, {}, {"config_perturbed"}),
    "config_json": (SetConfig(), {}, {"config_json"}),
    "compile_by_name": (NeedsArgument(1.0), {}, {"compile_by_name", "as_metric"}),
    "output_shape": (ForgetsSum(), {}, {"output_shape", "sample_weight"}),
    "sample_weight": (IgnoresWeights(), {}, {"sample_weight"}),
    "reduction": (SwallowsReduction(), {}, {"reduction"}),
    "output_shape-mean_in_call": (MeanInCall(), {}, {"output_shape", "reduction", "sample_weight"}),
    "mask": (IgnoresMask(), {}, {"mask"}),
    "shapes": (BinaryBroadcast(), {"targets": "binary"}, {"shapes"}),
    "finite": (NoClip(), {}, {"finite"}),
    "gradient": (StopsGradient(), {}, {"gradient"}),
    "gradient_value-flipped": (FlippedGradient(), {}, {"gradient_value"}),
    "gradient_value-doubled": (DoubledGradient(from_logits=True), {}, {"gradient_value"}),
    "graph": (StaticBatch(), {}, {"graph"}, {"torch": set(), "jax": set()}),
    "mixed_precision": (HalfPrecision(), {}, {"mixed_precision", "mask"}),
    "reference": (
        FocalCE(),
        {"reference": focal_reference(gamma=1.0)},
        {"reference", "gradient_value"},
    ),
}


def expected_failures(bug: str, backend: str) -> set[str]:
    loss, kwargs, expected, *per_backend = BROKEN[bug]
    return per_backend[0].get(backend, expected) if per_backend else expected


@pytest.mark.parametrize("bug", sorted(BROKEN))
def test_each_check_catches_its_bug(bug):
    loss, kwargs = BROKEN[bug][:2]
    expected = expected_failures(bug, BACKEND)
    report = check_loss(loss, checks=IN_PROCESS, raise_on_failure=False, **kwargs)
    assert set(report.failed) == expected, str(report)
    for check in expected:  # A failure says why and how to fix it.
        assert report.details[check]
        assert report.results[check].fix
    first = next((c for c in report.results if c in report.failed), None)
    assert first == (bug.split("-")[0] if expected else None), str(report)


def test_every_check_has_a_broken_loss_it_catches_first():
    named = {bug.split("-")[0] for bug in BROKEN}
    fresh = {check for *_, failed in FRESH.values() for check in failed}
    uncaught = set(CHECKS) - named - fresh - {"xla", "as_metric"}
    assert not uncaught, uncaught


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_broken_loss_table_on(backend):
    """The table above, again in a fresh pytest process on another backend."""
    print(
        rerun_from_tensorflow(
            backend,
            "tests/test_check_loss.py::test_each_check_catches_its_bug",
            min_passed=len(BROKEN),
        )
    )


def test_static_batch_is_an_xla_warning_not_a_failure():
    if BACKEND != "tensorflow":
        pytest.skip("XLA through tf.function: TensorFlow only")
    report = check_loss(StaticBatch(), checks=["xla"], raise_on_failure=False)
    assert report.warnings == ["xla"] and report.ok, str(report)


# --------------------------------------------------------------------------- #
# Every check, fresh processes included, for many losses at once
# --------------------------------------------------------------------------- #
GOOD = {
    "CategoricalCE": (keras_ce_plugin.CategoricalCE(), {}),
    "CategoricalCE-logits": (keras_ce_plugin.CategoricalCE(from_logits=True), {}),
    "SparseCategoricalCE": (keras_ce_plugin.SparseCategoricalCE(), {"targets": "sparse"}),
    "SparseCategoricalCE-logits": (
        keras_ce_plugin.SparseCategoricalCE(from_logits=True),
        {"targets": "sparse"},
    ),
    "BinaryCE": (keras_ce_plugin.BinaryCE(), {"targets": "binary"}),
    "BinaryCE-logits": (keras_ce_plugin.BinaryCE(from_logits=True), {"targets": "binary"}),
    "FocalCE": (
        FocalCE(gamma=2.0, class_weights=[1.0, 2.0, 1.0, 0.5]),
        {"reference": focal_reference(2.0, [1.0, 2.0, 1.0, 0.5])},
    ),
    "FocalCE-logits": (
        FocalCE(gamma=1.0, from_logits=True),
        {"reference": focal_reference(1.0, from_logits=True)},
    ),
    "mean_abs_error": (
        mean_abs_error,
        {
            "example": (
                np.random.default_rng(0).normal(size=(5, 3)),
                np.random.default_rng(1).normal(size=(5, 3)),
            )
        },
    ),
}
# Losses whose bug only a fresh process shows: expected failed checks (all of them).
# (Built in the fixture: a module-level LocalLoss would exist in the fresh process too.)
FRESH = {
    "TfOps": (TfOps, {}, {"backends"}),
    "NoGradientOnTorch": (NoGradientOnTorch, {}, {"backends"}),
    "LocalLoss": (_local_class, {}, {"keras_file", "backends"}),
    "keras.losses.CategoricalCrossentropy": (
        keras.losses.CategoricalCrossentropy,
        {},
        {"config_complete"},
    ),
}


def linear_ce_reference(y_true, y_pred):
    """Sparse cross-entropy of logits, per token, in float64."""
    z = np.asarray(y_pred, "float64")
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    labels = np.asarray(y_true).astype("int64")
    return -np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]


_seq = np.random.default_rng(5)
SEQUENCES = (  # (batch, tokens) labels, (batch, tokens, vocab) logits: per-token values
    _seq.integers(0, 8, size=(4, 3)).astype("int32"),
    _seq.normal(0.0, 3.0, size=(4, 3, 8)).astype("float32"),
)
# Every loss the plugin registers (Keras' registry, package "customloss", losses only)
# and the labels it takes; each runs through every check.
PLUGIN_LOSSES = {
    "customloss>CategoricalCE": [{}],
    "customloss>SparseCategoricalCE": [{"targets": "sparse"}],
    "customloss>BinaryCE": [{"targets": "binary"}],
    "customloss>categorical_ce": [{}],
    "customloss>sparse_categorical_ce": [{"targets": "sparse"}],
    "customloss>binary_ce": [{"targets": "binary"}],
    "customloss>LinearCE": [
        {"targets": "sparse"},
        {"example": SEQUENCES, "reference": linear_ce_reference},
    ],
}


def registered_plugin_losses() -> list[str]:
    objects = keras.saving.get_custom_objects()
    return sorted(
        name
        for name, obj in objects.items()
        if name.startswith("customloss>")
        and (
            (isinstance(obj, type) and issubclass(obj, keras.losses.Loss))
            or (
                not isinstance(obj, type) and callable(obj) and "y_pred" in obj.__code__.co_varnames
            )
        )
    )


PLUGIN_CASES = {
    f"{name}-{i}": (keras.saving.get_registered_object(name), kw)
    for name, kws in PLUGIN_LOSSES.items()
    for i, kw in enumerate(kws)
}


@pytest.fixture(scope="module")
def full_reports():
    items = [GOOD[k] for k in GOOD] + [(make(), kw) for make, kw, _ in FRESH.values()]
    items += list(PLUGIN_CASES.values())
    reports = check_losses(items)
    return dict(zip([*GOOD, *FRESH, *PLUGIN_CASES], reports))


def test_the_plugin_loss_list_is_keras_registry():
    assert registered_plugin_losses() == sorted(PLUGIN_LOSSES)


@pytest.mark.parametrize("case", list(PLUGIN_CASES))
def test_every_registered_plugin_loss_passes_check_loss(full_reports, case):
    report = full_reports[case]
    assert report.ok and not report.warnings and not report.xfailed, str(report)
    assert report.results["backends"].result == "passed", str(report)
    if "reference" in PLUGIN_CASES[case][1]:
        assert report.results["reference"].result == "passed", str(report)


@pytest.mark.parametrize("name", list(GOOD))
def test_correct_losses_pass_every_check(full_reports, name):
    report = full_reports[name]
    assert report.ok and not report.warnings, str(report)
    assert list(report.results) == list(CHECKS)
    kwargs = GOOD[name][1]
    expected_skips = set() if "reference" in kwargs else {"reference"}
    if "example" in kwargs:
        expected_skips |= {"shapes", "config_complete", "config_roundtrip", "config_perturbed"}
    assert set(report.skipped) == expected_skips, str(report)
    assert "jax" in report.details["backends"], str(report)
    json.dumps(report.to_dict())


@pytest.mark.parametrize("name", list(FRESH))
def test_fresh_process_checks_catch_their_bugs(full_reports, name):
    if name == "NoGradientOnTorch":  # its bug shows on torch only
        require_backend("torch")
    report = full_reports[name]
    assert set(report.failed) == FRESH[name][2], str(report)


def test_a_gradient_on_one_backend_only_fails(full_reports):
    require_backend("torch")
    reason = full_reports["NoGradientOnTorch"].details["backends"]
    assert reason == "gradient w.r.t. y_pred exists on tensorflow, not on torch", reason


def test_builtin_reports_are_informative(full_reports):
    report = full_reports["keras.losses.CategoricalCrossentropy"]
    assert report.results["registered"].result == "skipped"
    assert "dtype" in report.details["config_complete"]
    assert "all-zero prediction row: value and gradient not finite" in report.details["finite"]


# --------------------------------------------------------------------------- #
# API behaviour
# --------------------------------------------------------------------------- #
def test_raises_listing_every_failure_with_its_fix():
    with pytest.raises(LossContractError) as info:
        check_loss(MeanInCall(), checks=["reduction", "sample_weight", "registered"])
    message = str(info.value)
    assert isinstance(info.value, AssertionError)
    assert "MeanInCall() fails 2 loss check(s)" in message
    assert "- reduction: call() returns shape ()" in message
    assert "- sample_weight:" in message and "Fix: return one value per sample" in message


def test_expected_failures_are_xfailed_and_a_passing_one_fails_the_report():
    report = check_loss(
        MeanInCall(),
        checks=["reduction", "sample_weight", "finite"],
        expected_failed_checks={"sample_weight": "a batch-level loss", "finite": "no reason"},
        raise_on_failure=False,
    )
    assert report.failed == ["reduction"]
    assert report.xfailed == ["sample_weight"] and report.xpassed == ["finite"], str(report)
    assert report.details["sample_weight"].startswith("expected to fail: a batch-level loss (")
    assert report.details["finite"].startswith("expected to fail (no reason) but passes:")
    assert report.results["finite"].fix == "remove it from expected_failed_checks"
    assert not report.ok
    message = str(report.error())
    assert "fails 2 loss check(s)" in message and "- finite: expected to fail" in message


def test_only_expected_failures_is_ok():
    report = check_loss(
        MeanInCall(),
        checks=["reduction", "registered"],
        expected_failed_checks={"reduction": "a batch-level loss"},
    )
    assert report.ok and report.xfailed == ["reduction"] and report.passed == ["registered"]
    assert str(report).splitlines()[-1] == "OK: 1 passed, 1 xfailed"


def test_table_lists_every_check():
    report = check_loss(FocalCE(gamma=3.0), checks=["registered", "reference"])
    text = str(report)
    assert text.splitlines()[0] == "check_loss(FocalCE(gamma=3.0))"
    assert "registered  passed   registered as 'check_loss_tests>FocalCE'" in text
    assert "reference   skipped  no `reference=` function given" in text
    assert text.splitlines()[-1] == "OK: 1 passed, 1 skipped"


def test_docstring_table_is_generated_from_the_checks():
    """The module docstring's table is the registry's: one place per check."""
    import keras_ce_plugin.testing as testing
    from keras_ce_plugin.testing._spec import REGISTRY, table

    assert table() in testing.__doc__
    assert tuple(REGISTRY) == CHECKS
    for name, spec in REGISTRY.items():
        public = getattr(testing, f"check_{name}")
        assert public.spec is spec and public.__name__ == f"check_{name}"
        assert spec.fix and spec.needs and spec.passes_when, name
        assert f"check_{name}" in testing.__all__


def test_applicable_checks_yields_what_applies():
    from keras_ce_plugin.testing import applicable_checks

    ids = [
        c.id
        for c in applicable_checks(mean_abs_error, example=GOOD["mean_abs_error"][1]["example"])
    ]
    for absent in (
        "config_complete",
        "config_roundtrip",
        "config_perturbed",
        "shapes",
        "reference",
    ):
        assert absent not in ids
    assert "gradient_value" in ids and "output_shape" in ids
    focal = [c.id for c in applicable_checks(FocalCE(), reference=focal_reference())]
    assert "reference" in focal and ("xla" in focal) == (BACKEND == "tensorflow")


def test_one_check_function_runs_that_check_alone():
    from keras_ce_plugin.testing import check_config_perturbed, check_output_shape

    result = check_output_shape(FocalCE())
    assert result.check == "output_shape" and result.result == "passed"
    with pytest.raises(
        LossContractError, match="output_shape: call\\(\\) returns shape \\(6, 4\\)"
    ):
        check_output_shape(ForgetsSum())
    result = check_config_perturbed(ConstantConfig, raise_on_failure=False)
    assert result.result == "failed" and "get_config() says gamma=2.0" in result.reason


def test_custom_objects_as_keras_loaders_take_them():
    """An unregistered loss, found by name through ``custom_objects`` (in this process
    and in the fresh one that reloads the saved model)."""
    report = check_loss(
        Unregistered,
        checks=["keras_file", "config_roundtrip"],
        custom_objects={"Unregistered": Unregistered},
        raise_on_failure=False,
    )
    assert report.ok and report.passed == ["keras_file", "config_roundtrip"], str(report)
    assert check_loss(Unregistered, checks=["keras_file"], raise_on_failure=False).failed


def test_a_class_is_built_with_its_defaults():
    report = check_loss(FocalCE, checks=["config_complete"])
    assert report.loss == "FocalCE()"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"checks": ["nope"]}, "Unknown loss check 'nope'"),
        ({"expected_failed_checks": {"nope": "x"}}, "Unknown loss check 'nope'"),
        ({"targets": "regression"}, "`targets` must be one of"),
        ({"example": (np.zeros(3), np.zeros((2, 3)))}, "same batch size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_loss(FocalCE(), **kwargs)


@keras.saving.register_keras_serializable(package=PKG, name="UserSparse")
class UserSparse(keras.losses.Loss):
    """A correct sparse cross-entropy of probabilities that the checker does not know:
    its ``call`` raises on one-hot labels."""

    def call(self, y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        picked = ops.take_along_axis(y_pred, labels[:, None], axis=-1)[:, 0]
        return -ops.log(ops.clip(picked, EPS, 1.0))


class SubclassedSparse(keras_ce_plugin.SparseCategoricalCE):
    """A user's subclass of a known loss: the same labels."""


LABEL_CHECKS = ["output_shape", "sample_weight", "reduction", "shapes"]
KNOWN_KINDS = {
    "SparseCategoricalCE": (keras_ce_plugin.SparseCategoricalCE(), "sparse"),
    "sparse_categorical_ce": (keras_ce_plugin.sparse_categorical_ce, "sparse"),
    "LinearCE": (keras_ce_plugin.large_vocab.LinearCE(), "sparse"),
    "subclass": (SubclassedSparse(from_logits=True), "sparse"),
    "keras.SparseCategoricalCrossentropy": (keras.losses.SparseCategoricalCrossentropy(), "sparse"),
    "keras.sparse_categorical_crossentropy": (
        keras.losses.sparse_categorical_crossentropy,
        "sparse",
    ),
    "BinaryCE": (keras_ce_plugin.BinaryCE(from_logits=True), "binary"),
    "keras.BinaryFocalCrossentropy": (keras.losses.BinaryFocalCrossentropy(), "binary"),
    "keras.binary_crossentropy": (keras.losses.binary_crossentropy, "binary"),
    "CategoricalCE": (keras_ce_plugin.CategoricalCE(), "categorical"),
    "keras.CategoricalCrossentropy": (keras.losses.CategoricalCrossentropy(), "categorical"),
}


@pytest.mark.parametrize("name", list(KNOWN_KINDS))
def test_a_known_loss_is_checked_on_its_own_labels_by_default(name):
    """Without ``targets``, Keras' and the plugin's cross-entropies (and subclasses) get
    the labels they take: the same results as naming the kind, and (for the sparse ones)
    not those of the one-hot labels every other loss gets."""
    loss, kind = KNOWN_KINDS[name]
    default = check_loss(loss, checks=LABEL_CHECKS, raise_on_failure=False)
    named = check_loss(loss, checks=LABEL_CHECKS, targets=kind, raise_on_failure=False)
    assert default.ok and not default.hint, str(default)
    assert default.details == named.details
    if kind == "sparse":
        onehot = check_loss(
            loss, checks=LABEL_CHECKS, targets="categorical", raise_on_failure=False
        )
        assert not onehot.ok, str(onehot)


def test_an_unknown_loss_that_raises_on_one_hot_labels_gets_a_hint():
    """A loss the checker does not know is checked on one-hot labels: it fails there,
    and the report (and the error) say which labels it runs on. The hint only points:
    the checks still fail until the labels are given."""
    report = check_loss(UserSparse(), checks=LABEL_CHECKS, raise_on_failure=False)
    assert set(report.failed) == set(LABEL_CHECKS), str(report)
    assert "runs on integer labels" in report.hint and "targets='sparse'" in report.hint
    assert report.hint in str(report) and report.to_dict()["hint"] == report.hint
    with pytest.raises(LossContractError, match="--targets sparse"):
        check_loss(UserSparse(), checks=LABEL_CHECKS)
    assert check_loss(UserSparse(), checks=LABEL_CHECKS, targets="sparse").ok
    named = check_loss(
        UserSparse(), checks=LABEL_CHECKS, targets="categorical", raise_on_failure=False
    )
    assert not named.ok and named.hint == "", "the labels were given: no hint"


@pytest.mark.parametrize("bug", ["output_shape", "sample_weight", "finite"])
def test_no_hint_where_the_labels_are_not_the_cause(bug):
    """A broken loss that runs on one-hot labels fails without a hint."""
    loss, kwargs = BROKEN[bug][:2]
    report = check_loss(loss, checks=IN_PROCESS, raise_on_failure=False, **kwargs)
    assert report.failed and report.hint == "", str(report)


def test_bad_loss():
    with pytest.raises(TypeError, match="`loss` must be a keras.losses.Loss"):
        check_loss("categorical_crossentropy")


def test_import_does_not_import_pytest_or_tensorflow_on_jax():
    code = (
        "import sys\n"
        "import keras_ce_plugin.testing as t\n"
        "assert 'pytest' not in sys.modules and 'tensorflow' not in sys.modules\n"
        "from keras_ce_plugin import CategoricalCE\n"
        "r = t.check_loss(CategoricalCE(), checks=['graph', 'xla', 'gradient'])\n"
        "assert r.results['graph'].result == 'passed' and 'jax.jit' in r.details['graph'], r\n"
        "assert r.results['xla'].result == 'skipped', r\n"
        "assert 'pytest' not in sys.modules and 'tensorflow' not in sys.modules\n"
    )
    import subprocess

    env = {**os.environ, "KERAS_BACKEND": "jax"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_workers_only_for_the_checks_that_need_them_and_always_reaped(monkeypatch):
    """No worker process without `keras_file`/`backends`; with them, an interrupted run
    still kills and reaps every worker before their temporary directory goes."""
    from keras_ce_plugin.testing import _run
    from keras_ce_plugin.testing._subprocess import Job, installed_backends

    started = []

    class Recorded(Job):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(_run, "Job", Recorded)
    check_loss(FocalCE(), checks=[c for c in IN_PROCESS if c not in ("mixed_precision",)])
    assert started == []

    def interrupted(fn, s):
        raise KeyboardInterrupt

    monkeypatch.setattr(_run.C, "reason_if_raised", interrupted)
    with pytest.raises(KeyboardInterrupt):
        check_loss(FocalCE(), checks=["backends", "keras_file", "registered"])
    assert len(started) == len(installed_backends()), started  # the others + keras_file
    for job in started:
        assert job.proc.returncode is not None, f"{job.backend} worker not reaped"
        assert not os.path.exists(os.path.dirname(job.out))  # removed after the reaping


def test_readme_lists_every_check():
    """README's sentence "`check_loss` runs N named checks (`a`, `b`, ...)" is CHECKS."""
    from conftest import REPO

    text = (REPO / "README.md").read_text()
    match = re.search(r"`check_loss` runs (\d+) named checks \((.*?); the table", text, re.S)
    assert match, "README no longer says which checks check_loss runs"
    assert int(match.group(1)) == len(CHECKS)
    assert tuple(re.findall(r"`(\w+)`", match.group(2))) == CHECKS

"""A contract checker for Keras 3 losses: ``check_loss(MyLoss)``.

A custom loss that works in one eager call can still fail to compile by name,
to reload, to honour sample weights, to stay finite at probability 0, or to run
on JAX (keras-team/keras#20112, #20395, #19740, #19662, #20060, #17371, #20014).
:func:`check_loss` runs every check below on seeded batches and reports them
all at once; :func:`parametrize_loss_checks` makes one pytest case per
(loss, check).

Check ids (a stable contract; each is also a function ``check_<id>(loss, ...)``
that runs it alone, and :func:`applicable_checks` yields those that apply):

==================  ==========================================================
id                  passes when
==================  ==========================================================
registered          the class/function has a registered ``package>Name``
config_complete     every named ``__init__`` parameter appears in
                    ``get_config()`` (``dtype`` too: Keras' base
                    ``Loss.get_config`` returns only name and reduction)
config_roundtrip    ``from_config(get_config())`` gives the same config and
                    values
config_perturbed    an instance built with each numeric ``__init__`` argument
                    changed (one at a time) has that value in ``get_config()``
                    and round-trips
config_json         ``keras.saving.serialize_keras_object(loss)`` is JSON
keras_file          a model compiled with the loss, trained one step and saved
                    as ``.keras`` loads in a fresh process importing only the
                    loss's module and the plugin (``safe_mode=True``, no
                    ``custom_objects``) and gives the same loss
compile_by_name     ``compile(loss="package>Name")`` gives the same values as
                    the class built with its defaults
as_metric           ``metrics=["package>Name"]`` reports the mean of the per-
                    sample values, and the model reloads
mixed_precision     inside a model under ``mixed_float16``/``mixed_bfloat16``,
                    a finite float32 loss close to the float32 model's
graph               same values inside ``tf.function`` with an unknown batch
                    size (``jax.jit`` on JAX), full and partial batch
xla                 same under ``jit_compile=True``; a *warning* otherwise (TF
                    ``fit`` does not XLA-compile on CPU by default)
output_shape        ``call`` returns ``y_pred.shape[:-1]`` values
                    (``(batch,)`` for the three target kinds: one value per
                    sample, the class axis reduced, as Keras' losses)
sample_weight       a weighted call equals Keras' weighted reduction of the
                    per-sample values (each sample computed alone)
reduction           ``call`` returns one value per sample (each independent of
                    the others); ``"sum"``, ``"sum_over_batch_size"``,
                    ``"mean_with_sample_weight"`` and ``None`` agree with it
mask                a ``y_pred`` carrying a Keras mask (from a ``Masking``
                    layer, as in a masked sequence model) is reduced as Keras'
                    losses reduce it: masked samples dropped, every reduction
shapes              label shapes/dtypes Keras accepts for the target kind give
                    the same values, never a silent ``(B, B)`` broadcast
finite              value and gradient finite at probability 0 and 1 (logits
                    of +-1e4 for ``from_logits``); an all-zero prediction row
                    is reported, informational
reference           only with ``reference=``: per-sample values match the
                    NumPy function
gradient            the gradient w.r.t. ``y_pred`` exists, is finite and not
                    identically zero on random inputs
gradient_value      the gradient w.r.t. ``y_pred`` equals central finite
                    differences (in float64 where the loss takes ``dtype``) on
                    a few entries, and the finite differences of ``reference``
                    when given
backends            same values and gradients on every other installed backend
                    (one fresh process each; a gradient on one backend only
                    fails)
==================  ==========================================================

Every check reports ``passed``, ``failed``, ``skipped`` (with why) or
``warning``; none passes silently. A check listed in ``expected_failed_checks``
reports ``xfailed``, or ``xpassed`` when it passes: like a strict xfail, that fails
the report (remove it from the list).

>>> import keras_ce_plugin
>>> from keras_ce_plugin.testing import CHECKS
>>> CHECKS[:3]
('registered', 'config_complete', 'config_roundtrip')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from keras_ce_plugin.testing._checks import (
    check_config_complete,
    check_config_json,
    check_config_perturbed,
    check_config_roundtrip,
    check_registered,
)
from keras_ce_plugin.testing._inputs import make_subject
from keras_ce_plugin.testing._models import (
    check_as_metric,
    check_compile_by_name,
    check_keras_file,
    check_mixed_precision,
)
from keras_ce_plugin.testing._report import CheckResult, LossCheckReport, LossContractError
from keras_ce_plugin.testing._run import CHECKS, check_backends, run_many
from keras_ce_plugin.testing._spec import Check, applicable
from keras_ce_plugin.testing._traced import check_graph, check_xla
from keras_ce_plugin.testing._values import (
    check_finite,
    check_gradient,
    check_gradient_value,
    check_mask,
    check_output_shape,
    check_reduction,
    check_reference,
    check_sample_weight,
    check_shapes,
)

__all__ = [
    "CHECKS",
    "Check",
    "CheckResult",
    "LossCheckReport",
    "LossContractError",
    "applicable_checks",
    "check_as_metric",
    "check_backends",
    "check_compile_by_name",
    "check_config_complete",
    "check_config_json",
    "check_config_perturbed",
    "check_config_roundtrip",
    "check_finite",
    "check_gradient",
    "check_gradient_value",
    "check_graph",
    "check_keras_file",
    "check_loss",
    "check_losses",
    "check_mask",
    "check_mixed_precision",
    "check_output_shape",
    "check_reduction",
    "check_reference",
    "check_registered",
    "check_sample_weight",
    "check_shapes",
    "check_xla",
    "parametrize_loss_checks",
]


def check_loss(
    loss: Any,
    *,
    targets: str | None = None,
    example: tuple[Any, Any] | None = None,
    reference: Callable[[Any, Any], Any] | None = None,
    expected_failed_checks: Mapping[str, str] | None = None,
    raise_on_failure: bool = True,
    checks: Iterable[str] | None = None,
    module: str | None = None,
    custom_objects: Mapping[str, Any] | None = None,
    timeout: float = 300.0,
) -> LossCheckReport:
    """Checks a loss against the loss contract; returns the report.

    Args:
        loss: A ``keras.losses.Loss`` instance, a ``Loss`` subclass (built with
            its defaults) or a registered loss function returning per-sample values.
        targets: ``"categorical"`` (one-hot), ``"sparse"`` (integer ids) or
            ``"binary"``. ``y_pred`` holds probabilities or logits as the loss's
            own ``from_logits`` says. Default: the loss's own kind for Keras' and
            the plugin's cross-entropies (subclasses too: ``"sparse"`` for
            ``SparseCategoricalCE`` and ``LinearCE``), else ``"categorical"``; a
            loss that then raises on one-hot labels and runs on another kind gets
            a ``hint`` in its report.
        example: ``(y_true, y_pred)``, a batch for any other kind of target
            (regression, sequences); replaces ``targets``.
        reference: A NumPy function ``(y_true, y_pred) -> per-sample values``.
        expected_failed_checks: ``{check id: reason}`` for known limitations:
            reported as ``xfailed``; one that passes is ``xpassed``, a failure.
        raise_on_failure: Raise :class:`LossContractError` (an
            ``AssertionError``) listing every failed check, why, and the fix.
        checks: Run only these check ids (default: all).
        module: What a fresh process imports to find the loss (a module name
            or a ``.py`` path); default: the loss's own module or its file.
        custom_objects: ``{name: class or function}``, as Keras' loaders take it:
            in scope for every check, and rebuilt by name in the fresh processes
            (each object is imported from its own module there).
        timeout: Seconds allowed to each fresh process.

    >>> from keras_ce_plugin import CategoricalCE
    >>> report = check_loss(CategoricalCE(), checks=["config_complete", "reference"])
    >>> report.details["reference"]
    'no `reference=` function given'
    >>> report.ok
    True
    """
    kwargs = {
        "targets": targets,
        "example": example,
        "reference": reference,
        "expected_failed_checks": expected_failed_checks,
        "checks": checks,
        "module": module,
        "custom_objects": custom_objects,
    }
    (report,) = run_many([(loss, kwargs)], timeout=timeout)
    if raise_on_failure and not report.ok:
        raise report.error()
    return report


def check_losses(
    losses: Iterable[Any | tuple[Any, Mapping[str, Any]]], *, timeout: float = 300.0
) -> list[LossCheckReport]:
    """Checks several losses at once, sharing one fresh process per backend.

    Each item is a loss or ``(loss, {check_loss keyword arguments})``; nothing is
    raised: look at each report's ``ok``.
    """
    items = [item if isinstance(item, tuple) else (item, {}) for item in losses]
    return run_many([(loss, dict(kw)) for loss, kw in items], timeout=timeout)


def applicable_checks(loss: Any, **kwargs: Any) -> Iterable[Check]:
    """Yields the checks that apply to ``loss`` (each a :class:`Check`: ``id``,
    ``passes_when``, ``fix``, ``needs``); ``kwargs`` are :func:`check_loss`'s
    ``targets``, ``example``, ``reference``, ``module``.

    >>> from keras_ce_plugin import CategoricalCE
    >>> ids = [c.id for c in applicable_checks(CategoricalCE())]
    >>> "reference" in ids, "config_perturbed" in ids
    (False, True)
    """
    yield from applicable(make_subject(loss, **kwargs))


def parametrize_loss_checks(losses: Iterable[Any], **kwargs: Any) -> Any:
    """A ``pytest.mark.parametrize`` with one case per (loss, check).

    ``kwargs`` are :func:`check_loss`'s (``targets``, ``example``,
    ``expected_failed_checks`` -- a dict or a callable ``loss -> dict`` --,
    ``reference``, ``module``, ``custom_objects``, ``timeout``; ``checks`` limits the
    cases). An expected failure is a strict ``xfail``: a check that now passes shows
    as ``XPASS(strict)`` and fails the run. pytest is imported only here.
    """
    from keras_ce_plugin.testing._pytest import parametrize

    return parametrize(losses, **kwargs)

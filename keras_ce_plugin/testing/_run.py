"""``check_loss``: runs every check on one loss and collects the report."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import keras
import numpy as np

from keras_ce_plugin.testing import _checks as C
from keras_ce_plugin.testing import _models as M
from keras_ce_plugin.testing._inputs import Subject, close, make_subject, max_diff, value_and_grad
from keras_ce_plugin.testing._report import FAILED, PASSED, SKIPPED, LossCheckReport, first_line
from keras_ce_plugin.testing._subprocess import Job, installed_backends, module_spec

CHECKS = (
    "registered",
    "config_complete",
    "config_roundtrip",
    "config_json",
    "keras_file",
    "compile_by_name",
    "as_metric",
    "sample_weight",
    "reduction",
    "shapes",
    "finite",
    "gradient",
    "graph",
    "xla",
    "mixed_precision",
    "backends",
    "reference",
)

FIXES = {
    "registered": 'decorate it with @keras.saving.register_keras_serializable(package="my_losses")',
    "config_complete": "return every __init__ argument (dtype too) from get_config()",
    "config_roundtrip": "let __init__ accept what get_config() returns (name, reduction, dtype, **kwargs) and pass them to super().__init__",
    "config_json": "keep only plain Python values (lists, not arrays or tensors) in get_config()",
    "keras_file": "register the loss and make get_config()/from_config() round-trip",
    "compile_by_name": "register the loss (and `import keras_ce_plugin`); the class must build with its defaults",
    "as_metric": "register the loss and return per-sample values from call()",
    "sample_weight": "return one value per sample from call() and let Keras reduce (no mean over the batch)",
    "reduction": "return one value per sample from call(): reduce over the class axis only",
    "shapes": "squeeze/expand y_true to y_pred's rank explicitly before combining them",
    "finite": "clip probabilities to [epsilon, 1 - epsilon] (or use log_softmax on logits)",
    "gradient": "use differentiable keras.ops only (no argmax/round/stop_gradient/NumPy on y_pred)",
    "graph": "use keras.ops and ops.shape() instead of Python control flow or .numpy() on tensors",
    "xla": "avoid ops that XLA cannot compile (string ops, dynamic shapes from values)",
    "mixed_precision": "compute in float32: cast y_pred/y_true with ops.cast before the math",
    "backends": "use keras.ops instead of tf.* (or jax/torch) functions",
    "reference": "compare the formula with the reference; check the clipping epsilon and the axis",
}

SIMPLE: dict[str, Callable[[Subject], C.Outcome]] = {
    "registered": C.check_registered,
    "config_complete": C.check_config_complete,
    "config_roundtrip": C.check_config_roundtrip,
    "config_json": C.check_config_json,
    "compile_by_name": M.check_compile_by_name,
    "sample_weight": C.check_sample_weight,
    "reduction": C.check_reduction,
    "shapes": C.check_shapes,
    "finite": C.check_finite,
    "gradient": C.check_gradient,
    "graph": C.check_graph,
    "xla": C.check_xla,
    "mixed_precision": M.check_mixed_precision,
    "reference": C.check_reference,
}


def _serialized(s: Subject) -> Any:
    """The loss as JSON for another process, if it round-trips; else None."""
    if s.fn is not None:
        return None
    try:
        serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(s.loss)))
        keras.saving.deserialize_keras_object(serialized)
    except Exception:  # noqa: BLE001 - the config checks report it
        return None
    return serialized


def _backend_expected(s: Subject, w: np.ndarray) -> dict[str, Any]:
    b, none = s.batch, C.with_reduction(s.loss, None)
    return {
        "per_sample": C.to_numpy(none(b.y_true, b.y_pred)),
        "reduced": C.to_numpy(s.loss(b.y_true, b.y_pred)),
        "weighted": C.to_numpy(s.loss(b.y_true, b.y_pred, sample_weight=w)),
        "partial": C.to_numpy(none(s.partial.y_true, s.partial.y_pred)),
        "gradient": value_and_grad(lambda p: keras.ops.sum(s.loss(b.y_true, p)), b.y_pred)[1],
    }


def _backends_outcome(results: dict[str, dict], expected: dict[str, Any], missing: list[str]):
    if not results:
        return SKIPPED, "no other Keras backend installed (" + ", ".join(missing) + " missing)"
    for backend, res in results.items():
        if "error" in res:
            return FAILED, f"on {backend}: {res['error']}"
        for key, want in expected.items():
            got = res.get(key)
            if want is None or got is None:
                continue
            if not close(got, want, C.RTOL_BACKEND, C.ATOL_BACKEND):
                return FAILED, f"on {backend}, {key} differs ({max_diff(got, want)})"
    note = f"; not installed: {', '.join(missing)}" if missing else ""
    return PASSED, f"same values and gradients on {', '.join(results)} (fresh process){note}"


def _validate(checks: Iterable[str] | None, expected: Mapping[str, str] | None) -> list[str]:
    selected = list(CHECKS) if checks is None else list(checks)
    for name in [*selected, *(expected or {})]:
        if name not in CHECKS:
            raise ValueError(f"Unknown loss check {name!r}. Valid checks: {', '.join(CHECKS)}")
    return selected


class _Run:
    """One loss being checked: its subject, selection and outcomes so far."""

    def __init__(self, index: int, loss: Any, kwargs: dict[str, Any], tmp: str) -> None:
        self.expected = kwargs.pop("expected_failed_checks", None)
        self.selected = _validate(kwargs.pop("checks", None), self.expected)
        self.s = make_subject(loss, **kwargs)
        self.outcomes: dict[str, C.Outcome] = {}
        self.w = C.sample_weights(self.s.batch.y_pred.shape[0])
        self.data = os.path.join(tmp, f"batch-{index}.npz")
        b, p = self.s.batch, self.s.partial
        np.savez(
            self.data, x=b.x, y_true=b.y_true, y_pred=b.y_pred, w=self.w, pt=p.y_true, pp=p.y_pred
        )
        self.task = {"module": module_spec(self.s.cls_or_fn, self.s.module), "data": self.data}
        self.file_job: dict[str, Any] = {}

    def backend_task(self) -> dict[str, Any]:
        return {
            **self.task,
            "task": "backend",
            "serialized": _serialized(self.s),
            "qualname": self.s.cls_or_fn.__qualname__,
            "kind": "function" if self.s.fn is not None else "class",
        }

    def report(self) -> LossCheckReport:
        report = LossCheckReport(self.s.label)
        for name in self.selected:
            result, reason = self.outcomes[name]
            fix = FIXES[name] if result == FAILED else ""
            if self.expected and name in self.expected:
                why = self.expected[name]
                if result == PASSED:
                    why += "; it passes now: remove it from expected_failed_checks"
                result, reason, fix = SKIPPED, f"expected to fail: {why}", ""
            report.add(name, result, reason, fix)
        return report


def run_many(
    items: list[tuple[Any, dict[str, Any]]], timeout: float = 300.0
) -> list[LossCheckReport]:
    """Checks several losses; the fresh-process work is shared, one process per backend.

    ``items`` are ``(loss, check_loss keyword arguments)``.
    """
    backend = keras.backend.backend()
    others = [b for b in installed_backends() if b != backend]
    missing = [b for b in ("tensorflow", "jax", "torch") if b != backend and b not in others]
    with tempfile.TemporaryDirectory(prefix="keras_ce_check_") as tmp:
        runs = [_Run(i, loss, dict(kw), tmp) for i, (loss, kw) in enumerate(items)]
        # Start the other backends' processes first: they run while this one works.
        on_backends = [r for r in runs if "backends" in r.selected]
        workers = {b: Job([r.backend_task() for r in on_backends], tmp, b, timeout) for b in others}
        on_file: list[_Run] = []
        for r in runs:
            if "keras_file" in r.selected:
                early, r.file_job = M.prepare_keras_file(r.s, tmp, len(on_file))
                if early is not None:
                    r.outcomes["keras_file"] = early
                else:
                    on_file.append(r)
        tasks = [{**r.task, **r.file_job, "task": "keras_file"} for r in on_file]
        file_worker = Job(tasks, tmp, backend, timeout) if tasks else None
        for r in runs:
            for name in r.selected:
                if name in SIMPLE:
                    r.outcomes[name] = C.reason_if_raised(SIMPLE[name], r.s)
                elif name == "as_metric":
                    r.outcomes[name] = C.reason_if_raised(lambda s: M.check_as_metric(s, tmp), r.s)
        for i, r in enumerate(on_file):
            assert file_worker is not None
            r.outcomes["keras_file"] = M.keras_file_outcome(r.file_job, file_worker.result(i))
        for i, r in enumerate(on_backends):
            results = {b: job.result(i) for b, job in workers.items()}
            try:
                expected = _backend_expected(r.s, r.w)
            except Exception as exc:  # noqa: BLE001
                reason = f"the loss fails on {backend} itself ({first_line(exc)})"
                r.outcomes["backends"] = (SKIPPED, reason)
            else:
                r.outcomes["backends"] = _backends_outcome(results, expected, missing)
    return [r.report() for r in runs]

"""``check_loss``: runs the selected checks on each loss and collects the reports.

The checks register themselves (``_spec.check``) as their modules are imported, in
the order below: that order is ``CHECKS`` and the order of every report.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import keras
import numpy as np

from keras_ce_plugin.testing import _checks as C
from keras_ce_plugin.testing import _models as M
from keras_ce_plugin.testing import _traced, _values  # noqa: F401 - they register checks
from keras_ce_plugin.testing._inputs import Subject, close, make_subject, max_diff, value_and_grad
from keras_ce_plugin.testing._report import (
    FAILED,
    PASSED,
    SKIPPED,
    XFAILED,
    XPASSED,
    LossCheckReport,
    first_line,
)
from keras_ce_plugin.testing._spec import REGISTRY, Outcome, check, set_runner
from keras_ce_plugin.testing._subprocess import Job, installed_backends, module_spec


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


def _backends_outcome(
    results: dict[str, dict], expected: dict[str, Any], here: str, missing: list[str]
) -> Outcome:
    if not results:
        return SKIPPED, "no other Keras backend installed (" + ", ".join(missing) + " missing)"
    for backend, res in results.items():
        if "error" in res:
            return FAILED, f"on {backend}: {res['error']}"
        for key, want in expected.items():
            got = res.get(key)
            if want is None and got is None:
                continue
            if want is None or got is None:  # a gradient on one backend only
                has, lacks = (here, backend) if got is None else (backend, here)
                return FAILED, f"{key} w.r.t. y_pred exists on {has}, not on {lacks}"
            if not close(got, want, C.RTOL_BACKEND, C.ATOL_BACKEND):
                return FAILED, f"on {backend}, {key} differs ({max_diff(got, want)})"
    note = f"; not installed: {', '.join(missing)}" if missing else ""
    return PASSED, f"same values and gradients on {', '.join(results)} (fresh process){note}"


check_backends = check(
    "backends",
    passes_when="same values and gradients on every other installed backend (one fresh "
    "process each; a gradient on one backend only fails)",
    fix="use keras.ops instead of tf.* (or jax/torch) functions",
    needs="another installed Keras backend (a fresh process each)",
    fresh=True,
)(M._in_a_fresh_process)

CHECKS = tuple(REGISTRY)
FIXES = {name: spec.fix for name, spec in REGISTRY.items()}


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
        self.custom_objects = dict(kwargs.pop("custom_objects", None) or {})
        with self.scope():
            self.s = make_subject(loss, **kwargs)
        self.s.tmpdir = tmp
        self.outcomes: dict[str, Outcome] = {}
        for name in self.selected:  # what does not apply is skipped, with why
            why = REGISTRY[name].applies(self.s)
            if why is not None:
                self.outcomes[name] = (SKIPPED, why)
        self.w = C.sample_weights(self.s.batch.y_pred.shape[:-1])
        self.data = os.path.join(tmp, f"batch-{index}.npz")
        b, p = self.s.batch, self.s.partial
        np.savez(
            self.data, x=b.x, y_true=b.y_true, y_pred=b.y_pred, w=self.w, pt=p.y_true, pp=p.y_pred
        )
        self.task = {
            "module": module_spec(self.s.cls_or_fn, self.s.module),
            "data": self.data,
            "custom_objects": {
                name: {"module": module_spec(obj, None), "qualname": obj.__qualname__}
                for name, obj in self.custom_objects.items()
            },
        }
        self.file_job: dict[str, Any] = {}

    def scope(self) -> Any:
        """Keras' custom object scope of ``custom_objects`` (as its loaders take it)."""
        return keras.saving.custom_object_scope(self.custom_objects)

    def wants(self, name: str) -> bool:
        return name in self.selected and name not in self.outcomes

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
                if result == FAILED:
                    result, reason, fix = XFAILED, f"expected to fail: {why} ({reason})", ""
                elif result == PASSED:
                    result, fix = XPASSED, "remove it from expected_failed_checks"
                    reason = f"expected to fail ({why}) but passes: {reason}"
            report.add(name, result, reason, fix)
        if not report.ok:
            with self.scope():
                report.hint = C.targets_hint(self.s)
        return report


def run_many(
    items: list[tuple[Any, dict[str, Any]]], timeout: float = 300.0
) -> list[LossCheckReport]:
    """Checks several losses; the fresh-process work is shared, one process per backend.

    ``items`` are ``(loss, check_loss keyword arguments)``. A worker process is started
    only for a fresh-process check that some loss needs, and every worker is waited
    for (killed past ``timeout`` or on an error) before the temporary directory goes.
    """
    backend = keras.backend.backend()
    with tempfile.TemporaryDirectory(prefix="keras_ce_check_") as tmp:
        jobs: list[Job] = []
        try:
            return _run_all(items, backend, tmp, timeout, jobs)
        finally:
            for job in jobs:
                job.close()


def _run_all(items, backend: str, tmp: str, timeout: float, jobs: list[Job]):
    runs = [_Run(i, loss, dict(kw), tmp) for i, (loss, kw) in enumerate(items)]
    on_backends = [r for r in runs if r.wants("backends")]
    others, missing = [], []
    if on_backends:
        others = [b for b in installed_backends() if b != backend]
        missing = [b for b in ("tensorflow", "jax", "torch") if b != backend and b not in others]
    # Start the other backends' processes first: they run while this one works.
    workers = {b: Job([r.backend_task() for r in on_backends], tmp, b, timeout) for b in others}
    jobs.extend(workers.values())
    on_file: list[_Run] = []
    for r in runs:
        if r.wants("keras_file"):
            with r.scope():
                early, r.file_job = M.prepare_keras_file(r.s, tmp, len(on_file))
            if early is not None:
                r.outcomes["keras_file"] = early
            else:
                on_file.append(r)
    tasks = [{**r.task, **r.file_job, "task": "keras_file"} for r in on_file]
    file_worker = Job(tasks, tmp, backend, timeout) if tasks else None
    if file_worker is not None:
        jobs.append(file_worker)
    for r in runs:
        with r.scope():
            for name in r.selected:
                if r.wants(name) and not REGISTRY[name].fresh:
                    r.outcomes[name] = C.reason_if_raised(REGISTRY[name].impl, r.s)
    for i, r in enumerate(on_file):
        assert file_worker is not None
        r.outcomes["keras_file"] = M.keras_file_outcome(r.file_job, file_worker.result(i))
    for i, r in enumerate(on_backends):
        results = {b: job.result(i) for b, job in workers.items()}
        try:
            with r.scope():
                expected = _backend_expected(r.s, r.w)
        except Exception as exc:  # noqa: BLE001
            reason = f"the loss fails on {backend} itself ({first_line(exc)})"
            r.outcomes["backends"] = (SKIPPED, reason)
        else:
            r.outcomes["backends"] = _backends_outcome(results, expected, backend, missing)
    return [r.report() for r in runs]


set_runner(run_many)

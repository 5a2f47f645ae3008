"""Fresh-process checks: ``keras_file`` (same backend) and ``backends`` (the others).

The parent writes the batch and a JSON job, starts one ``python -c`` per backend
(concurrently, while the in-process checks run) and reads back a JSON result.
The child imports the plugin and the loss's module -- by name with the parent's
``sys.path``, or from its file for a loss defined in ``__main__`` or a test file
-- and nothing else of the caller's.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from keras_ce_plugin.testing._report import first_line

WORKER = "from keras_ce_plugin.testing._subprocess import main; main()"
USER_MODULE = "_keras_ce_checked_module"


# --------------------------------------------------------------------------- #
# Parent side
# --------------------------------------------------------------------------- #
def module_spec(obj: Any, module: str | None) -> dict[str, Any]:
    """How a fresh process finds ``obj``: a module name and/or a file path."""
    name: str | None = module or getattr(obj, "__module__", None)
    file = None
    if name is not None and (name.endswith(".py") or os.sep in name):
        name, file = None, os.path.abspath(str(name))
    elif name is not None and name in sys.modules:
        file = getattr(sys.modules[name], "__file__", None)
    return {"name": name, "file": file}


def installed_backends() -> list[str]:
    names = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    return [b for b, mod in names.items() if importlib.util.find_spec(mod) is not None]


class Job:
    """A started worker process for a list of tasks; ``result(i)`` waits for task i."""

    def __init__(self, tasks: list[dict[str, Any]], tmpdir: str, backend: str, timeout: float):
        self.backend, self.timeout = backend, timeout
        self.out = os.path.join(tmpdir, f"result-{backend}-{id(self)}.json")
        spec = os.path.join(tmpdir, f"job-{backend}-{id(self)}.json")
        with open(spec, "w") as f:
            json.dump({"tasks": tasks, "out": self.out}, f)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env = {
            **os.environ,
            "KERAS_BACKEND": backend,
            "PYTHONPATH": os.pathsep.join(paths),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "KERAS_CE_CHECK_JOB": spec,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._results: list[dict[str, Any]] | dict[str, Any] | None = None

    def _wait(self) -> list[dict[str, Any]] | dict[str, Any]:
        try:
            _, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return {"error": f"the {self.backend} process timed out after {self.timeout:.0f} s"}
        if os.path.exists(self.out):
            with open(self.out) as f:
                return json.load(f)
        lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
        tail = lines[-1] if lines else f"exit status {self.proc.returncode}"
        return {"error": f"the {self.backend} process failed: {tail[:200]}"}

    def close(self) -> None:
        """Kills the process if it still runs (an error cut the run short); reaps it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def result(self, index: int) -> dict[str, Any]:
        if self._results is None:
            self._results = self._wait()
        if isinstance(self._results, dict):
            return self._results
        return self._results[index]


# --------------------------------------------------------------------------- #
# Child side
# --------------------------------------------------------------------------- #
def _import_user(spec: dict[str, Any]):
    name, file = spec.get("name"), spec.get("file")
    if name and name != "__main__":
        try:
            return importlib.import_module(name)
        except ImportError:
            if not file:
                raise
    if not file:
        raise ImportError(
            f"cannot import the loss's module {name!r} in a fresh process (no file to "
            "load); define the loss in a module and pass check_loss(..., module=...)"
        )
    mod_spec = importlib.util.spec_from_file_location(USER_MODULE, file)
    if mod_spec is None or mod_spec.loader is None:
        raise ImportError(f"cannot load the loss's module from {file}")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[USER_MODULE] = module
    mod_spec.loader.exec_module(module)
    return module


def _keras_file(job: dict[str, Any], data: Any) -> dict[str, Any]:
    import keras

    model = keras.models.load_model(job["path"], safe_mode=True)
    y_pred = model(data["x"])
    value = model.compute_loss(x=data["x"], y=data["y_true"], y_pred=y_pred, training=False)
    return {"value": float(keras.ops.convert_to_numpy(value))}


def _rebuild_loss(job: dict[str, Any], module: Any) -> Any:
    import keras

    if job.get("serialized") is not None:
        return keras.saving.deserialize_keras_object(job["serialized"])
    obj = module
    for part in job["qualname"].split("."):
        obj = getattr(obj, part)
    if job["kind"] == "function":
        from keras_ce_plugin.testing._inputs import FunctionLoss

        return FunctionLoss(obj)
    return obj()


def _backend_values(job: dict[str, Any], data: Any, module: Any) -> dict[str, Any]:
    import keras

    from keras_ce_plugin.testing._inputs import to_numpy, value_and_grad, with_reduction

    loss = _rebuild_loss(job, module)
    none = with_reduction(loss, None)
    yt, yp, w = data["y_true"], data["y_pred"], data["w"]
    out: dict[str, Any] = {}

    def grad(yt, yp):
        return value_and_grad(lambda p: keras.ops.sum(loss(yt, p)), yp)[1]

    def all_values(yt, yp, w, pt, pp):
        return {
            "per_sample": none(yt, yp),
            "reduced": loss(yt, yp),
            "weighted": loss(yt, yp, sample_weight=w),
            "partial": none(pt, pp),
            "gradient": grad(yt, yp),
        }

    args = (yt, yp, w, data["pt"], data["pp"])
    if keras.backend.backend() == "jax":
        # Eager JAX dispatches op by op (seconds); fit() jits anyway: one jit call.
        import jax

        steps = {"jax.jit": lambda: jax.jit(all_values)(*args)}
    else:
        steps = {"eager": lambda: all_values(*args)}
    for step, fn in steps.items():
        try:
            values = fn()
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            return {"error": f"{step}: {first_line(exc)}"}
        for key, value in values.items():
            out[key] = None if value is None else to_numpy(value).astype("float64").tolist()
    return out


def _custom_objects(task: dict[str, Any]) -> dict[str, Any]:
    """``custom_objects`` rebuilt by name: each imported from its own module."""
    objects = {}
    for name, where in task.get("custom_objects", {}).items():
        obj = _import_user(where["module"])
        for part in where["qualname"].split("."):
            obj = getattr(obj, part)
        objects[name] = obj
    return objects


def _task(task: dict[str, Any]) -> dict[str, Any]:
    import keras

    try:
        module = _import_user(task["module"])
        data = np.load(task["data"])
        with keras.saving.custom_object_scope(_custom_objects(task)):
            if task["task"] == "keras_file":
                return _keras_file(task, data)
            return _backend_values(task, data, module)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return {"error": first_line(exc)}


def main() -> None:
    with open(os.environ["KERAS_CE_CHECK_JOB"]) as f:
        job = json.load(f)
    import keras_ce_plugin  # noqa: F401 - the plugin, then each loss's module

    results = [_task(task) for task in job["tasks"]]
    with open(job["out"], "w") as f:
        json.dump(results, f)

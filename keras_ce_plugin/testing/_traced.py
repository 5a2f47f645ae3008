"""The checks under tracing: ``tf.function``/``jax.jit`` and XLA."""

from __future__ import annotations

import logging

import keras

from keras_ce_plugin.testing._checks import ATOL, RTOL, per_sample
from keras_ce_plugin.testing._inputs import Subject, close, max_diff, to_numpy, with_reduction
from keras_ce_plugin.testing._report import FAILED, PASSED, WARNING, first_line
from keras_ce_plugin.testing._spec import Outcome, check


def _traced(s: Subject, jit_compile: bool | None):
    """The per-sample and reduced values under tf.function/jax.jit."""
    none = with_reduction(s.loss, None)

    def both(yt, yp):
        return none(yt, yp), s.loss(yt, yp)

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(both)
    import tensorflow as tf

    b = s.batch
    signature = [
        tf.TensorSpec([None, *b.y_true.shape[1:]], b.y_true.dtype),
        tf.TensorSpec([None, *b.y_pred.shape[1:]], b.y_pred.dtype),
    ]
    return tf.function(both, input_signature=signature, jit_compile=jit_compile)


def _compare_traced(s: Subject, fn) -> str | None:
    # TensorFlow warns about "retracing" when several checks trace the same loss.
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        for batch in (s.batch, s.partial):
            got = [to_numpy(v) for v in fn(batch.y_true, batch.y_pred)]
            want = [per_sample(s, batch), to_numpy(s.loss(batch.y_true, batch.y_pred))]
            for g, w in zip(got, want):
                if not close(g, w, RTOL, ATOL):
                    n = batch.y_pred.shape[0]
                    return f"differs from eager on a batch of {n} ({max_diff(g, w)})"
        return None
    finally:
        tf_logger.setLevel(level)


def _traceable(s: Subject) -> str | None:
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        return f"the {backend} backend runs eagerly (fit does not trace the loss)"
    return None


@check(
    "graph",
    passes_when="same values inside ``tf.function`` with an unknown batch size (``jax.jit`` "
    "on JAX), full and partial batch",
    fix="use keras.ops and ops.shape() instead of Python control flow or .numpy() on tensors",
    needs="the TensorFlow or JAX backend",
    applies=_traceable,
)
def check_graph(s: Subject) -> Outcome:
    backend = keras.backend.backend()
    where = "jax.jit" if backend == "jax" else "tf.function with an unknown batch size"
    try:
        bad = _compare_traced(s, _traced(s, None if backend == "jax" else False))
    except Exception as exc:  # noqa: BLE001
        return FAILED, f"{where} raised {first_line(exc)}"
    if bad:
        return FAILED, f"{where} {bad}"
    return PASSED, f"{where}: same values as eager (full and partial batch)"


def _xla(s: Subject) -> str | None:
    backend = keras.backend.backend()
    if backend == "jax":
        return "on JAX, `graph` already runs under jax.jit (XLA)"
    if backend != "tensorflow":
        return f"no XLA compilation on the {backend} backend"
    return None


@check(
    "xla",
    passes_when="same under ``jit_compile=True``; a *warning* otherwise (TF ``fit`` does not "
    "XLA-compile on CPU by default)",
    fix="avoid ops that XLA cannot compile (string ops, dynamic shapes from values)",
    needs="the TensorFlow backend",
    applies=_xla,
)
def check_xla(s: Subject) -> Outcome:
    try:
        bad = _compare_traced(s, _traced(s, True))
    except Exception as exc:  # noqa: BLE001
        bad = f"raised {first_line(exc)}"
    if bad:
        # TF's fit() does not XLA-compile on CPU by default: a warning, not a failure.
        return WARNING, f"tf.function(jit_compile=True) {bad}; fit(jit_compile=True) would fail"
    return PASSED, "XLA-compiled (jit_compile=True): same values"

"""Distributed training and mixed precision for the plugin's losses (TensorFlow backend).

:func:`make_strategy` builds the ``tf.distribute`` strategy behind
``keras-ce train --strategy {none,mirrored,multiworker} [--devices N]`` and
:func:`set_mixed_precision` sets the Keras policy behind ``--mixed-precision``.

With ``fit``, nothing else is needed: build and compile the model inside
``strategy.scope()`` and pass the *global* batch size; Keras splits each batch
across the replicas and scales the loss so that the summed gradients equal the
single-device ones.

Custom training loops
---------------------
In a custom loop each replica sees only its share of the global batch. Ask the
loss for per-sample values (``reduction=None``) and divide their (weighted) sum
by the **global** batch size with ``tf.nn.compute_average_loss``; the strategy
then *sums* the replicas' gradients. Dividing by the per-replica batch instead
(the default ``"sum_over_batch_size"`` reduction inside a replica) multiplies
the gradients by the number of replicas. :func:`compute_average_loss` is that
recipe; :func:`make_train_step` wraps it into a distributed training step::

    strategy = make_strategy("mirrored", devices=2)
    with strategy.scope():
        model = make_model()
        optimizer = keras.optimizers.SGD(0.1)
    loss = keras_ce_plugin.CategoricalCE(reduction=None)
    step = make_train_step(model, loss, optimizer, strategy)  # divides by the global batch
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    )
    for x_batch, y_batch in dataset:
        batch_loss = step(x_batch, y_batch)  # mean over the global batch

The same step runs without a strategy (the default strategy has one replica):

>>> import numpy as np, keras, tensorflow as tf
>>> from keras_ce_plugin import CategoricalCE
>>> keras.utils.set_random_seed(0)
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
>>> step = make_train_step(model, CategoricalCE(reduction=None), keras.optimizers.SGD(0.1))
>>> x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
>>> y = np.eye(3, dtype="float32")[np.arange(8) % 3]
>>> before = float(CategoricalCE()(y, model(x)))
>>> abs(float(step(x, y)) - before) < 1e-6  # the step returns the global-batch mean
True
>>> float(CategoricalCE()(y, model(x))) < before  # and it took a descent step
True

Mixed precision
---------------
``set_mixed_precision("bfloat16")`` (or ``"float16"``) sets the global Keras
policy ``mixed_bfloat16`` (``mixed_float16``): layers compute in the low
precision and keep float32 variables. Give the final softmax/sigmoid layer
``dtype="float32"``; the plugin's losses compute in float32 regardless. Under
``mixed_float16`` Keras' ``fit`` wraps the optimizer in a ``LossScaleOptimizer``
automatically; a custom loop must do so itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

from keras_ce_plugin.errors import KerasCEError

__all__ = [
    "STRATEGIES",
    "compute_average_loss",
    "is_chief",
    "make_strategy",
    "make_train_step",
    "parse_tf_config",
    "set_mixed_precision",
]

#: Accepted ``name`` values of :func:`make_strategy`.
STRATEGIES = ("none", "mirrored", "multiworker")

_POLICIES = {
    None: "float32",
    "none": "float32",
    "float32": "float32",
    "float16": "mixed_float16",
    "mixed_float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
    "mixed_bfloat16": "mixed_bfloat16",
}


def _tf():
    import keras

    if keras.backend.backend() != "tensorflow":
        raise KerasCEError(
            "tf.distribute strategies need the TensorFlow backend. Received: "
            f"KERAS_BACKEND={keras.backend.backend()!r}. Unset KERAS_BACKEND or set it to "
            "'tensorflow'."
        )
    import tensorflow as tf

    return tf


def _check_devices(devices: Any) -> int | None:
    if devices is None:
        return None
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise KerasCEError(f"`devices` must be a positive integer. Received: devices={devices!r}")
    return devices


def _split_cpu(tf: Any, n: int) -> list[str]:
    """Splits the (first) physical CPU into ``n`` logical devices; returns their names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return [d.name for d in tf.config.list_logical_devices("CPU")]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError as exc:  # TF refuses once its devices are initialised.
        have = len(tf.config.list_logical_devices("CPU"))
        raise KerasCEError(
            f"Cannot split the CPU into {n} logical devices: TensorFlow has already "
            f"initialised its devices ({have} logical CPU device(s)). Call "
            f"make_strategy('mirrored', devices={n}) before any TensorFlow operation "
            f"runs (before building models or tensors) in this process. ({exc})"
        ) from None
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def parse_tf_config(raw: str | None = None) -> dict[str, Any]:
    """Validates a ``TF_CONFIG`` JSON string (default: the environment variable).

    Returns the parsed dict. Raises :class:`KerasCEError` with a message naming
    what is wrong.

    >>> cfg = parse_tf_config(
    ...     '{"cluster": {"worker": ["h1:2222", "h2:2222"]}, "task": {"type": "worker", "index": 1}}'
    ... )
    >>> cfg["task"]["index"]
    1
    >>> parse_tf_config('{"cluster": {"worker": ["h1:2222"]}, "task": {"type": "worker", "index": 3}}')
    Traceback (most recent call last):
    ...
    keras_ce_plugin.errors.KerasCEError: TF_CONFIG task index 3 is out of range: cluster['worker'] has 1 address(es).
    """
    if raw is None:
        raw = os.environ.get("TF_CONFIG")
    example = (
        'e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}\''
    )
    if raw is None or not raw.strip():
        raise KerasCEError(
            "--strategy multiworker needs the TF_CONFIG environment variable describing the "
            f"cluster and this process' task, {example}. It is not set."
        )
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise KerasCEError(f"TF_CONFIG is not valid JSON ({exc}); {example}.") from None
    if not isinstance(cfg, dict):
        raise KerasCEError(f"TF_CONFIG must be a JSON object; {example}. Received: {raw!r}")
    cluster, task = cfg.get("cluster"), cfg.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise KerasCEError(f"TF_CONFIG has no 'cluster' mapping; {example}. Received: {raw!r}")
    for role, addresses in cluster.items():
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and ":" in a for a in addresses)
        ):
            raise KerasCEError(
                f"TF_CONFIG cluster[{role!r}] must be a non-empty list of 'host:port' strings. "
                f"Received: {addresses!r}"
            )
    if "worker" not in cluster and "chief" not in cluster:
        raise KerasCEError(f"TF_CONFIG cluster has no 'worker' list; {example}.")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise KerasCEError(
            f"TF_CONFIG has no 'task' with 'type' and 'index'; {example}. Received: {raw!r}"
        )
    role, index = task["type"], task["index"]
    if role not in cluster:
        raise KerasCEError(
            f"TF_CONFIG task type {role!r} is not in the cluster (roles: {sorted(cluster)})."
        )
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise KerasCEError(
            f"TF_CONFIG task index must be a non-negative integer. Received: {index!r}"
        )
    if index >= len(cluster[role]):
        raise KerasCEError(
            f"TF_CONFIG task index {index} is out of range: cluster[{role!r}] has "
            f"{len(cluster[role])} address(es)."
        )
    return cfg


def is_chief(tf_config: dict[str, Any] | None = None) -> bool:
    """Whether this process is the cluster's chief: the one that writes the run's files.

    The ``chief`` task if the cluster has one, else worker 0 (TensorFlow's rule).
    ``tf_config`` is a :func:`parse_tf_config` result (default: that of
    ``TF_CONFIG``).

    >>> is_chief({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}})
    True
    >>> is_chief({"cluster": {"chief": ["a:1"], "worker": ["b:1"]},
    ...           "task": {"type": "worker", "index": 0}})
    False
    """
    cfg = parse_tf_config() if tf_config is None else tf_config
    task = cfg["task"]
    if "chief" in cfg["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


_MWMS_CLASS: Any = None


def _multi_worker_class(tf: Any) -> Any:
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` accepts what Keras 3's ``fit`` passes.

    Keras 3's TensorFlow trainer calls ``strategy.reduce`` with a nested (x, y)
    batch before the first step and with ``axis=0`` on scalar per-replica
    metrics; ``MultiWorkerMirroredStrategy.reduce`` accepts neither, so ``fit``
    fails with "Attempt to convert a value (PerReplica...)" or "Invalid reduction
    dimension 0" (keras-team/keras#20585, open). This subclass overrides only the
    public ``reduce``: it maps over nested structures and reduces scalars with
    ``axis=None``. Everything else is the TensorFlow class unchanged.
    """
    global _MWMS_CLASS
    if _MWMS_CLASS is None:

        class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
            __doc__ = _multi_worker_class.__doc__

            def reduce(self, reduce_op, value, axis=None):
                parent_reduce = super().reduce  # the base class is untyped TensorFlow

                def one(v):
                    ax = axis
                    if ax is not None:
                        local = self.experimental_local_results(v)[0]
                        if len(getattr(local, "shape", ())) == 0:
                            ax = None
                    return parent_reduce(reduce_op, v, axis=ax)

                return tf.nest.map_structure(one, value)

        _MWMS_CLASS = MultiWorkerMirroredStrategy
    return _MWMS_CLASS


def make_strategy(name: str, devices: int | None = None) -> Any:
    """Returns the ``tf.distribute.Strategy`` named ``name``, or ``None`` for ``"none"``.

    Args:
        name: ``"none"``; ``"mirrored"`` (``MirroredStrategy`` over the visible
            GPUs, or over ``devices`` logical CPU devices on a CPU-only machine);
            or ``"multiworker"`` (``MultiWorkerMirroredStrategy`` configured from
            the ``TF_CONFIG`` environment variable, with a ``reduce`` that works
            around keras-team/keras#20585 so that ``fit`` runs). Call it first in
            the program, on every worker, with the same code; the batch size
            given to ``fit`` is the global batch, split across all workers.
        devices: With ``"mirrored"``: how many devices to use. On a machine
            without GPUs the CPU is split into that many logical devices, which
            TensorFlow allows only before it initialises its devices, so call
            this first in the process.

    Raises:
        KerasCEError: unknown ``name``, bad ``devices``, too late to split the
            CPU, more GPUs asked for than visible, or a missing/invalid ``TF_CONFIG``.

    >>> make_strategy("none") is None
    True
    >>> make_strategy("ring")
    Traceback (most recent call last):
    ...
    keras_ce_plugin.errors.KerasCEError: `strategy` must be one of ('none', 'mirrored', 'multiworker'). Received: strategy='ring'
    """
    if name not in STRATEGIES:
        raise KerasCEError(f"`strategy` must be one of {STRATEGIES}. Received: strategy={name!r}")
    devices = _check_devices(devices)
    if name == "none":
        if devices not in (None, 1):
            raise KerasCEError(
                f"`devices` needs --strategy mirrored. Received: strategy='none', devices={devices}"
            )
        return None
    tf = _tf()
    if name == "mirrored":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            n = len(gpus) if devices is None else devices
            if n > len(gpus):
                raise KerasCEError(
                    f"`devices`={n} but only {len(gpus)} GPU(s) are visible. Received: devices={n}"
                )
            return tf.distribute.MirroredStrategy(devices=[f"/gpu:{i}" for i in range(n)])
        if devices is None:  # every visible (logical) CPU device, usually one
            names = [d.name for d in tf.config.list_logical_devices("CPU")]
        else:
            names = _split_cpu(tf, devices) if devices > 1 else ["/cpu:0"]
        return tf.distribute.MirroredStrategy(devices=names[: devices or len(names)])
    # multiworker
    if devices is not None:
        raise KerasCEError(
            "`devices` applies to --strategy mirrored only; with multiworker each worker "
            f"uses its own visible devices. Received: devices={devices}"
        )
    parse_tf_config()
    try:
        return _multi_worker_class(tf)()
    except (RuntimeError, ValueError) as exc:
        raise KerasCEError(
            "Could not start MultiWorkerMirroredStrategy from TF_CONFIG: it must be created "
            "at the start of the program, before any TensorFlow operation runs, and every "
            f"worker in TF_CONFIG must be started. ({exc})"
        ) from None


def set_mixed_precision(policy: str | None) -> str:
    """Sets the global Keras dtype policy; returns its name.

    ``"float16"`` -> ``"mixed_float16"``, ``"bfloat16"`` -> ``"mixed_bfloat16"``,
    ``None``/``"float32"`` -> ``"float32"`` (the default).

    >>> set_mixed_precision("bfloat16")
    'mixed_bfloat16'
    >>> set_mixed_precision(None)
    'float32'
    >>> set_mixed_precision("int8")
    Traceback (most recent call last):
    ...
    keras_ce_plugin.errors.KerasCEError: `mixed_precision` must be one of 'float16', 'bfloat16', 'float32' or None. Received: mixed_precision='int8'
    """
    import keras

    if policy not in _POLICIES:
        raise KerasCEError(
            "`mixed_precision` must be one of 'float16', 'bfloat16', 'float32' or None. "
            f"Received: mixed_precision={policy!r}"
        )
    name = _POLICIES[policy]
    keras.config.set_dtype_policy(name)
    return name


def compute_average_loss(per_sample_loss: Any, global_batch_size: int, sample_weight: Any = None):
    """Sum of (weighted) per-sample losses divided by the **global** batch size.

    Call it inside a replica's step with the output of a loss built with
    ``reduction=None``. Summed over the replicas it equals the
    ``"sum_over_batch_size"`` loss of the whole global batch. ``global_batch_size``
    is an int or a scalar integer tensor (e.g. an all-reduced batch size).

    >>> import numpy as np
    >>> float(compute_average_loss(np.array([1.0, 3.0], "float32"), global_batch_size=4))
    1.0
    """
    tf = _tf()
    if not tf.is_tensor(global_batch_size):
        if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
            raise TypeError(
                "`global_batch_size` must be a positive integer. "
                f"Received: global_batch_size={global_batch_size!r}"
            )
        if global_batch_size < 1:
            raise ValueError(
                "`global_batch_size` must be a positive integer. "
                f"Received: global_batch_size={global_batch_size!r}"
            )
    per_sample_loss = tf.convert_to_tensor(per_sample_loss)
    if len(per_sample_loss.shape) > 1:  # e.g. per-pixel losses: mean over the other axes
        per_sample_loss = tf.reduce_mean(
            per_sample_loss, axis=list(range(1, len(per_sample_loss.shape)))
        )
    if sample_weight is not None:
        sample_weight = tf.cast(tf.reshape(sample_weight, [-1]), per_sample_loss.dtype)
    return tf.nn.compute_average_loss(
        per_sample_loss, sample_weight=sample_weight, global_batch_size=global_batch_size
    )


def make_train_step(
    model: Any,
    loss: Any,
    optimizer: Any,
    strategy: Any = None,
    *,
    global_batch_size: int | None = None,
):
    """Returns ``step(x, y, sample_weight=None) -> loss``: one distributed SGD step.

    ``loss`` must be built with ``reduction=None`` (per-sample values); each
    replica's loss is :func:`compute_average_loss` over the global batch and the
    returned value is its sum over the replicas, i.e. the mean loss of the global
    batch. With ``global_batch_size=None`` the step sums the replicas' actual
    batch sizes (one extra all-reduce per step), which stays exact for a short
    final batch that does not split evenly; with an int it divides by that number
    every step (use it with ``drop_remainder=True`` batches). ``strategy=None``
    uses the current (default) strategy. Create ``model`` (built) and
    ``optimizer`` inside ``strategy.scope()``.
    """
    tf = _tf()
    if getattr(loss, "reduction", None) is not None:
        raise ValueError(
            "`loss` must be built with reduction=None so that the step can divide by the "
            f"global batch size. Received: reduction={loss.reduction!r}"
        )
    strategy = strategy or tf.distribute.get_strategy()
    if not model.built:
        raise ValueError("`model` must be built (call it once or give it an Input) first.")
    with strategy.scope():
        if not optimizer.built:
            optimizer.build(model.trainable_variables)

    if global_batch_size is not None:
        compute_average_loss(tf.zeros([1]), global_batch_size)  # validates it

    def replica_step(x, y, sample_weight):
        n = global_batch_size
        if n is None:
            local = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
            ctx = tf.distribute.get_replica_context()
            n = tf.cast(ctx.all_reduce(tf.distribute.ReduceOp.SUM, local), tf.int64)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            per_sample = loss(y, y_pred)
            value = compute_average_loss(per_sample, n, sample_weight)
            scaled = value
            if hasattr(optimizer, "scale_loss"):  # LossScaleOptimizer under mixed_float16
                scaled = optimizer.scale_loss(value)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return value

    @tf.function
    def step(x, y, sample_weight=None):
        per_replica = strategy.run(replica_step, args=(x, y, sample_weight))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return step

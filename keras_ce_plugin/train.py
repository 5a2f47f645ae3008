"""The tutorial's CIFAR-10 experiment: train, compare with Keras' built-in loss, fast.

:func:`train` trains :func:`~keras_ce_plugin.models.build_vgg16_classifier` on
CIFAR-10 the way the tutorial does (Adam, batch 32, 10 epochs, one-hot labels,
pixels / 255, ``validation_data`` = the test split) and returns the full model
(base + head, compiled with the loss) with its history. ``keras-ce train`` and
``keras-ce compare`` (:func:`train_command`, :func:`compare_command`) write the
artifacts of a run.

**Feature cache.** The VGG16 base is frozen and there is no augmentation, so its
output for an image never changes. Instead of running it on every image in every
epoch, :func:`train` computes the features once (batched) and fits the head alone
on them: the same layer objects (same initial weights, same dropout seed
generators), the same optimizer settings, batch size, loss and metrics, and the
same ``fit(..., shuffle=True)`` data order (the seed is reset right before ``fit``
on both paths). Afterwards the full model is compiled with the trained optimizer
state and returned. With a plain Adam this is bitwise the tutorial's run.

**Fast input gradient.** TensorFlow computes a ``Dense`` layer's input gradient as
``dy @ W^T``; oneDNN takes 15 ms for it at batch 32 on the 4096x4096 layer of the
2-core test machine, but 4 ms for ``(W @ dy^T)^T``, which gives the very same bits
there at the batch sizes of a run (its kernels sum each dot product in the same
order). So the head's large ``Dense`` layers compute it that way in training -- for
each layer and batch size only where a probe on random data, run before ``fit``,
shows bit-for-bit the output and gradients of TensorFlow's own (at batch sizes 2-15
it does not, and TensorFlow's formula is used). The run stays bitwise the same
(``fast_input_grad=False`` turns it off).

**XLA.** By default, on the TensorFlow backend, Adam's own per-variable update step is
XLA-compiled on this path (its element-wise operations fuse into one pass over
each 4096x4096 kernel: 46 ms -> 15 ms per step on the 2-core test machine, next to
~15 ms for the head's forward and backward pass); XLA's fused multiply-adds
round differently, so the curves differ from the tutorial's by ~1e-7 (2.4e-7 over
10 epochs on the 5,085-image sample), while single weights whose Adam second
moment is tiny can drift further. ``xla_step=True`` (``keras-ce train --xla step``)
XLA-compiles the head's whole train step instead. Keras' own ``jit_compile=True``
would draw the dropout masks inside XLA with another random algorithm (another
run); here the masks are drawn outside XLA exactly as Keras draws them, so a step
is the tutorial's step up to rounding: XLA's 4096-term matmuls sum in another
order than oneDNN's (~1e-9 per step), which training amplifies to ~1e-3 in the
curves after 10 epochs on the sample. ``xla_optimizer=False`` gives the tutorial's
run bitwise. ``feature_cache=False`` or a trainable base run the tutorial's
``model.fit`` on the full model.

**Checkpoints.** With ``checkpoint_every`` > 0 each epoch is its own ``fit`` call
with a data order seeded by :func:`epoch_seed`, and :func:`save_checkpoint` writes
the trained variables (dropout seed states included), the optimizer state, the
epoch and the seed to one file, atomically; a run resumed from it
(:func:`load_checkpoint`, ``train(..., resume=...)``) ends with the same weights
as the uninterrupted run. ``keras-ce train`` holds ``RUN_DIR/.keras-ce.lock``
(:func:`run_lock`) while it writes ``RUN_DIR``.

Validation uses the test split, as the tutorial does: ``val_loss`` and
``val_accuracy`` are test-set numbers, and the reported test loss and accuracy
are those of the last epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from keras_ce_plugin import files as kio
from keras_ce_plugin._versions import versions
from keras_ce_plugin.data import load_cifar10
from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.files import LOCK_FILE, run_lock
from keras_ce_plugin.models import build_vgg16_classifier, split_base_and_head

__all__ = [
    "CHECKPOINT_FILE",
    "DEFAULT_LOSS",
    "LOCK_FILE",
    "Checkpoint",
    "TrainConfig",
    "TrainResult",
    "compare_command",
    "epoch_seed",
    "extract_features",
    "load_checkpoint",
    "run_lock",
    "save_checkpoint",
    "train",
    "train_command",
    "write_run",
]

DEFAULT_LOSS = "customloss>CategoricalCE"
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
RUN_FILES = ("model.keras", "history.json", "metrics.json", "curves.png")
VALIDATION_NOTE = (
    "validation_data is the test split, as in the tutorial: val_loss and val_accuracy are "
    "test-set numbers, and test_loss/test_accuracy are those of the last epoch"
)
# Images run through the full model to check the assembled model against the head.
_ASSEMBLY_CHECK_IMAGES = 64


# --------------------------------------------------------------------------- #
# Configuration and result
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What :func:`train` does; the defaults are the tutorial's.

    >>> TrainConfig().epochs, TrainConfig().batch_size, TrainConfig().loss
    (10, 32, 'customloss>CategoricalCE')
    """

    weights: str | os.PathLike | None = "imagenet"
    loss: Any = DEFAULT_LOSS
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    feature_cache: bool = True
    freeze_base: bool = True
    #: XLA-compile Adam's update step on the feature-cache path (TensorFlow only).
    xla_optimizer: bool = True
    #: XLA-compile the head's whole train step (forward, loss, gradients, Adam) on the
    #: feature-cache path (TensorFlow only). The dropout masks stay the tutorial's (drawn
    #: outside XLA), but XLA's 4096-term matmuls round differently from oneDNN's, so the
    #: curves drift from the tutorial's by float rounding (~1e-3 after 10 epochs).
    xla_step: bool = False
    #: On the feature-cache path (TensorFlow, float32, no strategy), compute each large
    #: ``Dense`` layer's input gradient as ``(W @ dy^T)^T`` instead of ``dy @ W^T``
    #: (oneDNN: 4 ms instead of 15 ms for the 4096x4096 layer at batch 32), for each
    #: layer where a probe at the run's batch sizes shows the very bits of TensorFlow's
    #: own gradient; the run stays bitwise the same. Not used with ``xla_step``.
    fast_input_grad: bool = True
    extract_batch_size: int = 128
    verbose: bool = True
    #: > 0: each epoch is its own ``fit`` with a per-epoch seeded data order, so that a
    #: run resumed from a checkpoint (written every N epochs) repeats the uninterrupted one.
    checkpoint_every: int = 0

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "extract_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KerasCEError(f"`{name}` must be a positive integer. Received: {value!r}")
        every = self.checkpoint_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise KerasCEError(f"`checkpoint_every` must be an integer >= 0. Received: {every!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise KerasCEError(f"`seed` must be an integer. Received: seed={self.seed!r}")
        lr = self.learning_rate
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise KerasCEError(
                f"`learning_rate` must be a positive number. Received: learning_rate={lr!r}"
            )
        resolve_loss(self.loss)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: keras.Model
    history: dict[str, list[float]]
    test_loss: float
    test_accuracy: float
    feature_cache: bool
    timings: dict[str, float]
    num_train: int
    num_test: int
    initial_weights_sha256: str
    features: tuple[np.ndarray, np.ndarray] | None = None
    assembly_max_abs_diff: float | None = None


def resolve_loss(loss: Any) -> Any:
    """Checks that ``loss`` is usable in ``compile``; raises :class:`KerasCEError` if not.

    >>> resolve_loss("customloss>CategoricalCE").name
    'categorical_ce'
    """
    if isinstance(loss, str):
        from keras_ce_plugin import get

        try:
            return get(loss)
        except (ValueError, TypeError) as exc:
            raise KerasCEError(
                f"Unknown loss {loss!r}: give a name that `model.compile(loss=...)` accepts, "
                f"e.g. {DEFAULT_LOSS!r} or 'categorical_crossentropy'. ({exc})"
            ) from None
    if isinstance(loss, keras.losses.Loss) or callable(loss):
        return loss
    raise KerasCEError(f"`loss` must be a name or a loss object. Received: {loss!r}")


def _loss_label(loss: Any) -> str:
    """A readable name: the string itself, or the public path of a loss object's class.

    >>> _loss_label(keras.losses.CategoricalCrossentropy())
    'keras.losses.CategoricalCrossentropy()'
    """
    if isinstance(loss, str):
        return loss
    cls = type(loss)
    if getattr(keras.losses, cls.__name__, None) is cls:
        return f"keras.losses.{cls.__name__}()"
    return f"{cls.__module__}.{cls.__qualname__}()"


# --------------------------------------------------------------------------- #
# Feature extraction and the fused optimizer
# --------------------------------------------------------------------------- #
def extract_features(
    base: keras.Model,
    images: np.ndarray,
    *,
    batch_size: int = 128,
    verbose: bool = True,
    desc: str = "VGG16 features",
) -> np.ndarray:
    """``base`` applied to ``images`` in inference mode, batch by batch, with a progress bar.

    >>> import numpy as np, keras
    >>> base = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten()])
    >>> extract_features(base, np.ones((5, 2, 2, 1), "float32"), batch_size=2, verbose=False).shape
    (5, 4)
    """
    from tqdm.auto import tqdm

    out: list[np.ndarray] = []
    with tqdm(
        total=len(images), desc=desc, unit="img", disable=not verbose, file=sys.stderr
    ) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            n = len(batch)
            if n < batch_size and start:  # pad the last batch (VGG16 sees each image alone)
                pad = np.zeros((batch_size - n, *batch.shape[1:]), dtype=batch.dtype)
                batch = np.concatenate([batch, pad])
            out.append(keras.ops.convert_to_numpy(base.predict_on_batch(batch))[:n])
            bar.update(n)
    if not out:
        return np.zeros((0, *base.output.shape[1:]), dtype="float32")
    return np.concatenate(out)


_XLA_ADAM: type | None = None


def _xla_adam_class() -> type:
    """``keras.optimizers.Adam`` whose per-variable ``update_step`` runs XLA-compiled.

    The body is Adam's own ``update_step``, wrapped in ``tf.function(jit_compile=True)``:
    its ~10 element-wise passes over each variable fuse into one. Used only to train
    the head on cached features; the saved model gets a plain ``Adam`` with the same
    state (:func:`_as_plain_adam`).
    """
    global _XLA_ADAM
    if _XLA_ADAM is None:
        import tensorflow as tf

        class XlaUpdateAdam(keras.optimizers.Adam):
            __doc__ = _xla_adam_class.__doc__

            def update_step(self, gradient, variable, learning_rate):
                parent = super().update_step
                step = tf.function(
                    lambda g: parent(g, variable, learning_rate),
                    jit_compile=True,
                    autograph=False,
                )
                return step(gradient)

        _XLA_ADAM = XlaUpdateAdam
    return _XLA_ADAM


def _make_optimizer(config: TrainConfig, *, fused: bool) -> keras.optimizers.Optimizer:
    if fused:
        return _xla_adam_class()(learning_rate=config.learning_rate)
    return keras.optimizers.Adam(learning_rate=config.learning_rate)


def _as_plain_adam(optimizer: keras.optimizers.Optimizer, variables: list) -> Any:
    """A ``keras.optimizers.Adam`` with ``optimizer``'s config and state."""
    if type(optimizer) is keras.optimizers.Adam:
        return optimizer
    plain = keras.optimizers.Adam.from_config(optimizer.get_config())
    plain.build(variables)
    if [tuple(v.shape) for v in plain.variables] != [tuple(v.shape) for v in optimizer.variables]:
        raise RuntimeError("optimizer state does not line up with a plain Adam")  # pragma: no cover
    for dst, src in zip(plain.variables, optimizer.variables):
        dst.assign(src)
    return plain


_XLA_STEP_HEAD: type | None = None
_XLA_STEP_LAYERS = (keras.layers.Flatten, keras.layers.Dense, keras.layers.Dropout)


def _xla_step_head_class() -> type:
    """A ``keras.Sequential`` whose ``train_step`` runs as one XLA computation.

    Keras' own ``jit_compile=True`` would also draw the dropout masks inside XLA,
    with another random algorithm than TensorFlow's kernels: other masks, another
    run. Here each ``Dropout`` layer's uniform noise is drawn outside XLA exactly as
    ``keras.random.dropout`` draws it (the layer's seed generator advanced once, then
    ``tf.random.stateless_uniform``), and the XLA computation applies it as
    ``tf.nn.experimental.stateless_dropout`` does (``where(noise >= rate, x / (1 -
    rate), 0)``), then computes the loss, the gradients and the optimizer update.
    Loss tracking and metrics are updated outside, as ``Model.train_step`` does.
    """
    global _XLA_STEP_HEAD
    if _XLA_STEP_HEAD is None:
        import tensorflow as tf

        class XlaStepHead(keras.Sequential):
            __doc__ = _xla_step_head_class.__doc__

            def _dropout_noise(self, batch: Any) -> list:
                noise = []
                for layer in self.layers:
                    if isinstance(layer, keras.layers.Dropout):
                        seed = layer.seed_generator.next()
                        if seed.dtype != tf.int32:  # as keras' TF backend casts it
                            seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
                        shape = tf.concat([[batch], layer.output.shape[1:]], axis=0)
                        noise.append(
                            tf.random.stateless_uniform(shape, seed=seed, dtype=layer.compute_dtype)
                        )
                return noise

            def train_step(self, data: Any) -> dict:
                x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
                noise = self._dropout_noise(tf.shape(x)[0])
                loss, y_pred = self._xla_step(x, y, sample_weight, noise)
                for metric in self.metrics:
                    if metric.name == "loss":  # Model.train_step's loss tracker
                        metric.update_state(loss, sample_weight=tf.shape(x)[0])
                return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

            @tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
            def _xla_step(self, x: Any, y: Any, sample_weight: Any, noise: list) -> tuple:
                with tf.GradientTape() as tape:
                    h, masks = x, iter(noise)
                    for layer in self.layers:
                        if isinstance(layer, keras.layers.Dropout):
                            scale = tf.constant(1 / (1 - layer.rate), h.dtype)
                            h = tf.where(
                                next(masks) >= layer.rate, h * scale, tf.zeros((), h.dtype)
                            )
                        else:
                            h = layer(h, training=True)
                    loss = self.compute_loss(x, y, h, sample_weight, training=True)
                grads = tape.gradient(loss, self.trainable_variables)
                self.optimizer.apply(grads, self.trainable_variables)
                return loss, h

        _XLA_STEP_HEAD = XlaStepHead
    return _XLA_STEP_HEAD


# Dense layers with fewer inputs or units than this keep TensorFlow's gradient (no
# time to gain).
_FAST_INPUT_GRAD_MIN_SIZE = 1024


def _dense_fast_input_grad(layer: keras.layers.Layer, x: Any, fast_batches: Sequence[int]) -> Any:
    """``layer(x)`` for a plain float ``Dense`` layer whose gradient with respect to ``x``
    is computed as ``(W @ dy^T)^T`` for batch sizes in ``fast_batches`` (as TensorFlow's
    ``dy @ W^T`` for the others); forward, kernel and bias gradients as TensorFlow's."""
    import tensorflow as tf

    fast = tf.constant(sorted(fast_batches) or [-1], tf.int32)

    @tf.custom_gradient
    def matmul(x: Any, w: Any) -> tuple:
        def grad(dy: Any) -> tuple:
            dx = tf.cond(
                tf.reduce_any(tf.equal(tf.shape(dy)[0], fast)),
                lambda: tf.transpose(tf.matmul(w, dy, transpose_b=True)),
                lambda: tf.matmul(dy, w, transpose_b=True, grad_a=True),
            )
            return dx, tf.matmul(x, dy, transpose_a=True, grad_b=True)

        return keras.ops.matmul(x, w), grad

    y = matmul(x, layer.kernel.value)
    if layer.bias is not None:
        y = keras.ops.add(y, layer.bias)
    if layer.activation is not None:
        y = layer.activation(y)
    return y


def _same_bits_as_tensorflow(
    layer: keras.layers.Layer,
    batches: Sequence[int],
    fast_batches: Sequence[int],
    fast: Callable[..., Any] | None = None,
) -> bool:
    """Whether ``fast`` (:func:`_dense_fast_input_grad`) gives ``layer``'s output and
    gradients bit for bit at each of these batch sizes (random inputs, in a
    ``tf.function`` traced without the batch size, as in ``fit``)."""
    import tensorflow as tf

    dtype = layer.compute_dtype
    sources = [v.value for v in layer.trainable_variables]
    fast = fast or _dense_fast_input_grad
    forwards = (lambda t: layer(t, training=True), lambda t: fast(layer, t, fast_batches))
    signature = [tf.TensorSpec([None, n], dtype) for n in (layer.kernel.shape[0], layer.units)]

    @tf.function(autograph=False, input_signature=signature)
    def both(x: Any, dy: Any) -> list:
        out = []
        for forward in forwards:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = forward(x)
            out += [y, *tape.gradient(y, [x, *sources], output_gradients=dy)]
        return out

    for batch in batches:
        rng = np.random.default_rng(batch)
        x, dy = (rng.standard_normal((batch, spec.shape[1])).astype(dtype) for spec in signature)
        values = [keras.ops.convert_to_numpy(v) for v in both(x, dy)]
        half = len(values) // 2
        if not all(np.array_equal(a, b) for a, b in zip(values[:half], values[half:])):
            return False
    return True


def _fast_input_grad_layers(
    head_layers: Sequence[keras.layers.Layer], batch_sizes: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """``{name: batch sizes}``: the head's large ``Dense`` layers and the batch sizes at
    which their fast input gradient passes :func:`_same_bits_as_tensorflow`, for layers
    whose gradient, fast at those sizes and TensorFlow's at the others, passes at all."""
    chosen = {}
    for layer in head_layers:
        if not (
            type(layer) is keras.layers.Dense
            and min(layer.kernel.shape) >= _FAST_INPUT_GRAD_MIN_SIZE
            and not layer.lora_enabled
            and not layer.quantization_mode
            and layer.compute_dtype == layer.variable_dtype
        ):
            continue
        sizes = tuple(batch_sizes)
        if not _same_bits_as_tensorflow(layer, sizes, sizes):  # fast at every size?
            sizes = tuple(b for b in batch_sizes if _same_bits_as_tensorflow(layer, [b], [b]))
            if not sizes or not _same_bits_as_tensorflow(layer, batch_sizes, sizes):
                continue
        chosen[layer.name] = sizes
    return chosen


class _FastInputGradHead(keras.Sequential):
    """A ``keras.Sequential`` that, in training, runs the layers named in ``fast_dense``
    (``{name: batch sizes}``) through :func:`_dense_fast_input_grad` (same bits, less
    time), the others as usual."""

    fast_dense: dict = {}  # noqa: RUF012 - replaced per instance, never mutated

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if not training or not self.fast_dense:
            return super().call(inputs, training=training, mask=mask)
        h = inputs
        for layer in self.layers:
            if layer.name in self.fast_dense:
                h = _dense_fast_input_grad(layer, h, self.fast_dense[layer.name])
            else:
                h = layer(h, training=training)
        return h


def _head_model(
    input_shape: tuple,
    head_layers: Sequence[keras.layers.Layer],
    *,
    xla_step: bool,
    fast_input_grad_batches: Sequence[int] = (),
) -> keras.Model:
    """The head alone on feature inputs: the same layer objects as the full model's.

    With ``fast_input_grad_batches`` (the batch sizes ``fit`` will use), large ``Dense``
    layers that pass :func:`_same_bits_as_tensorflow` at each of them get the fast
    input gradient in training.
    """
    if fast_input_grad_batches and not xla_step:
        head = _FastInputGradHead([keras.Input(input_shape), *head_layers], name="head")
        head.fast_dense = _fast_input_grad_layers(head_layers, fast_input_grad_batches)
        return head
    if xla_step:
        for layer in head_layers:
            if not isinstance(layer, _XLA_STEP_LAYERS):
                raise KerasCEError(
                    "`xla_step` handles Flatten, Dense and Dropout head layers only. "
                    f"Received a {type(layer).__name__} layer ({layer.name!r})."
                )
            if isinstance(layer, keras.layers.Dropout) and (
                layer.noise_shape is not None or not 0 < layer.rate < 1
            ):
                raise KerasCEError(
                    f"`xla_step` needs plain dropout (0 < rate < 1, no noise_shape). "
                    f"Received: {layer.name} with rate={layer.rate}, "
                    f"noise_shape={layer.noise_shape}"
                )
        cls = _xla_step_head_class()
    else:
        cls = keras.Sequential
    return cls([keras.Input(input_shape), *head_layers], name="head")


def _weights_sha256(model: keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# Checkpoints: model + optimizer + epoch + seed, one atomically written file
# --------------------------------------------------------------------------- #
CHECKPOINT_FILE = "checkpoint.npz"
_CHECKPOINT_FORMAT = 1


@dataclasses.dataclass
class Checkpoint:
    """The state of a run after ``epoch`` completed epochs (see :func:`load_checkpoint`)."""

    epoch: int
    history: dict[str, list[float]]
    model_values: list[np.ndarray]
    optimizer_values: list[np.ndarray]
    meta: dict[str, Any]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order in a checkpointed run.

    >>> epoch_seed(0, 0), epoch_seed(0, 1) != epoch_seed(1, 0)
    (1, True)
    """
    return (seed * 1_000_003 + epoch + 1) % (2**31 - 1)


def save_checkpoint(
    path: str | os.PathLike,
    fit_model: keras.Model,
    *,
    epoch: int,
    history: dict[str, list[float]],
    meta: dict[str, Any],
) -> None:
    """Writes ``fit_model``'s variables (dropout seed states included), its optimizer's
    variables, the epoch and ``meta`` into one ``.npz``, atomically."""
    arrays: dict[str, np.ndarray] = {}
    for prefix, variables in (
        ("model", fit_model.variables),
        ("optimizer", fit_model.optimizer.variables),
    ):
        for i, v in enumerate(variables):
            arrays[f"{prefix}/{i:05d}"] = keras.ops.convert_to_numpy(v)
    info = {**meta, "format": _CHECKPOINT_FORMAT, "epoch": epoch, "history": history}
    arrays["meta"] = np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)
    with kio.atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a :func:`save_checkpoint` file; a damaged one raises :class:`KerasCEError`."""
    path = Path(path)
    if not path.is_file():
        raise KerasCEError(
            f"There is no checkpoint to resume from: {path} does not exist. A run writes it "
            "with --checkpoint-every N and removes it once the run has finished."
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            names = sorted(k for k in z.files if k != "meta")
            values = {k: z[k] for k in names}
        if meta.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {meta.get('format')!r}")
        history = {k: [float(x) for x in meta["history"][k]] for k in HISTORY_KEYS}
        epoch = int(meta["epoch"])
    except Exception as exc:
        raise KerasCEError(
            f"Checkpoint {path} is damaged or not a keras-ce checkpoint "
            f"({type(exc).__name__}: {exc}). Start the run again with --overwrite."
        ) from None
    return Checkpoint(
        epoch=epoch,
        history=history,
        model_values=[values[k] for k in names if k.startswith("model/")],
        optimizer_values=[values[k] for k in names if k.startswith("optimizer/")],
        meta=meta,
    )


class _RunProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, numbering epochs out of the whole run's."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self._run_epochs = epochs

    def set_params(self, params: dict[str, Any]) -> None:
        super().set_params({**params, "epochs": self._run_epochs})


def _assign_all(variables: Sequence[Any], values: Sequence[np.ndarray], what: str) -> None:
    got = [tuple(v.shape) for v in variables]
    want = [tuple(a.shape) for a in values]
    if got != want:
        raise KerasCEError(
            f"The checkpoint's {what} state does not fit this model ({len(want)} arrays, "
            f"expected {len(got)} with shapes {got[:3]}...). Resume with the same version "
            "and arguments that wrote it."
        )
    for v, a in zip(variables, values):
        v.assign(a)


def _restore(fit_model: keras.Model, checkpoint: Checkpoint) -> None:
    _assign_all(fit_model.variables, checkpoint.model_values, "model")
    fit_model.optimizer.build(fit_model.trainable_variables)
    _assign_all(fit_model.optimizer.variables, checkpoint.optimizer_values, "optimizer")


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def _history(hist: Any, epochs: int) -> dict[str, list[float]]:
    out = {key: [float(v) for v in hist.history.get(key, [])] for key in HISTORY_KEYS}
    bad = [k for k, v in out.items() if len(v) != epochs]
    if bad:  # pragma: no cover - Keras changed its history keys
        raise RuntimeError(f"history lacks per-epoch {bad}: {sorted(hist.history)}")
    return out


def _check_data(data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        (x_train, y_train), (x_test, y_test) = data
    except (TypeError, ValueError):
        raise KerasCEError(
            "`data` must be ((x_train, y_train), (x_test, y_test)) as load_cifar10 returns."
        ) from None
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y) or len(x) == 0:
            raise KerasCEError(
                f"The {name} split must have as many labels as images, at least one. "
                f"Received: {len(x)} images, {len(y)} labels"
            )
    return x_train, y_train, x_test, y_test


def train(
    config: TrainConfig,
    data: Any,
    *,
    features: tuple[np.ndarray, np.ndarray] | None = None,
    strategy: Any = None,
    resume: Checkpoint | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Trains the tutorial's model on ``data`` (as :func:`~keras_ce_plugin.data.load_cifar10`
    returns it) and returns the full model, compiled with ``config.loss``, and its history.

    Args:
        config: The run's settings.
        data: ``((x_train, y_train), (x_test, y_test))``.
        features: The base's features of the train and test images from an earlier
            run with the same base (``result.features``), to skip extracting them again.
        strategy: A ``tf.distribute.Strategy``: the model is built and compiled in
            its scope (the Adam update is then not XLA-compiled).
        resume: A :func:`load_checkpoint` result of this configuration: training
            continues after its epoch, from its weights, optimizer and dropout states.
        checkpoint_path: Where :func:`save_checkpoint` writes the state every
            ``config.checkpoint_every`` epochs (and after the last), with
            ``checkpoint_meta`` (e.g. the command's arguments) stored beside it.

    With ``config.checkpoint_every`` > 0 (or ``resume``) the epochs run one ``fit``
    call each, the data order of epoch ``e`` seeded with :func:`epoch_seed`, so a run
    resumed from a checkpoint repeats exactly what the uninterrupted run would have
    done. That order differs from a single ``fit`` over all epochs (the default and
    the tutorial), so such a run's curves differ from the default run's by the data
    order alone.
    """
    config.validate()
    if checkpoint_path is not None and not config.checkpoint_every:
        raise KerasCEError("`checkpoint_path` needs `config.checkpoint_every` >= 1.")
    x_train, y_train, x_test, y_test = _check_data(data)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        keras.utils.set_random_seed(config.seed)
        model = build_vgg16_classifier(config.weights, freeze_base=config.freeze_base)
        base, head_layers = split_base_and_head(model)
        initial_sha = _weights_sha256(model)
        timings["build_model_s"] = time.perf_counter() - t0
        use_cache = config.feature_cache and not base.trainable
        xla_ok = (
            use_cache
            and strategy is None
            and keras.backend.backend() == "tensorflow"
            and keras.config.dtype_policy().name == "float32"
        )
        xla_step = xla_ok and config.xla_step
        optimizer = _make_optimizer(config, fused=xla_ok and config.xla_optimizer and not xla_step)
        metrics = ["accuracy"]
        if use_cache:
            t = time.perf_counter()
            if features is None:
                features = tuple(
                    extract_features(
                        base,
                        x,
                        batch_size=config.extract_batch_size,
                        verbose=config.verbose,
                        desc=f"VGG16 features ({name})",
                    )
                    for name, x in (("train", x_train), ("test", x_test))
                )
            f_train, f_test = features
            if len(f_train) != len(x_train) or len(f_test) != len(x_test):
                raise KerasCEError("`features` do not match the images: pass those of this data.")
            timings["extract_features_s"] = time.perf_counter() - t
            last = len(f_train) % config.batch_size  # the last, partial batch's size
            batches = [config.batch_size, last] if last else [config.batch_size]
            fit_model = _head_model(
                f_train.shape[1:],
                head_layers,
                xla_step=xla_step,
                fast_input_grad_batches=batches if xla_ok and config.fast_input_grad else (),
            )
            fit_x, val_x = f_train, f_test
        else:
            fit_model, fit_x, val_x = model, x_train, x_test
            features = None
        fit_model.compile(optimizer=optimizer, loss=config.loss, metrics=metrics)
        if xla_step:  # its variables must exist before the XLA step is traced
            optimizer.build(fit_model.trainable_variables)
        fit_kwargs = dict(
            batch_size=config.batch_size,
            shuffle=True,
            validation_data=(val_x, y_test),
            verbose=1 if config.verbose else 0,
        )
        t = time.perf_counter()
        if config.checkpoint_every or resume is not None or checkpoint_path is not None:
            history = {k: [] for k in HISTORY_KEYS}
            start = 0
            if resume is not None:
                recorded = resume.meta.get("initial_weights_sha256")
                if recorded not in (None, initial_sha):
                    raise KerasCEError(
                        "The model built for the resumed run differs from the checkpointed "
                        "run's initial model (other --weights file or seed?); refusing to "
                        "resume. Start the run again with --overwrite."
                    )
                _restore(fit_model, resume)
                history = {k: list(resume.history[k]) for k in HISTORY_KEYS}
                start = resume.epoch
            if config.verbose:  # "Epoch 2/10", not "Epoch 2/2", for one-epoch fit calls
                fit_kwargs["callbacks"] = [_RunProgbar(config.epochs)]
            for epoch in range(start, config.epochs):
                keras.utils.set_random_seed(epoch_seed(config.seed, epoch))
                hist = fit_model.fit(
                    fit_x, y_train, initial_epoch=epoch, epochs=epoch + 1, **fit_kwargs
                )
                for key in HISTORY_KEYS:
                    history[key].append(float(hist.history[key][-1]))
                done = epoch + 1
                every = config.checkpoint_every
                if checkpoint_path is not None and (done % every == 0 or done == config.epochs):
                    save_checkpoint(
                        checkpoint_path,
                        fit_model,
                        epoch=done,
                        history=history,
                        meta={
                            **(checkpoint_meta or {}),
                            "seed": config.seed,
                            "initial_weights_sha256": initial_sha,
                        },
                    )
                    if config.verbose:
                        print(f"checkpoint: epoch {done} -> {checkpoint_path}", file=sys.stderr)
        else:
            keras.utils.set_random_seed(config.seed)  # the data order, on either path
            hist = fit_model.fit(fit_x, y_train, epochs=config.epochs, **fit_kwargs)
            history = _history(hist, config.epochs)
        timings["fit_s"] = time.perf_counter() - t
        assembly_diff = None
        if use_cache:
            model.compile(
                optimizer=_as_plain_adam(fit_model.optimizer, model.trainable_variables),
                loss=config.loss,
                metrics=metrics,
            )
            n = min(_ASSEMBLY_CHECK_IMAGES, len(x_test))
            full = keras.ops.convert_to_numpy(model.predict_on_batch(x_test[:n]))
            part = keras.ops.convert_to_numpy(fit_model.predict_on_batch(f_test[:n]))
            assembly_diff = float(np.max(np.abs(full - part)))
            if not assembly_diff <= 1e-4:  # pragma: no cover - would be a bug in the assembly
                raise RuntimeError(f"assembled model disagrees with the head: {assembly_diff}")
    timings["train_s"] = time.perf_counter() - t0
    return TrainResult(
        model=model,
        history=history,
        test_loss=history["val_loss"][-1],
        test_accuracy=history["val_accuracy"][-1],
        feature_cache=use_cache,
        timings=timings,
        num_train=len(x_train),
        num_test=len(x_test),
        initial_weights_sha256=initial_sha,
        features=features,
        assembly_max_abs_diff=assembly_diff,
    )


# --------------------------------------------------------------------------- #
# Artifacts
# --------------------------------------------------------------------------- #
def _png(draw: Callable[[Any], None], *, panels: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * panels, 4.0), layout="constrained")
    axes = fig.subplots(1, panels)
    draw(axes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def curves_png(history: dict[str, list[float]], title: str = "") -> bytes:
    """Loss and accuracy per epoch (train and validation) as PNG bytes."""

    def draw(axes: Any) -> None:
        epochs = range(1, len(history["loss"]) + 1)
        for ax, key in zip(axes, ("loss", "accuracy")):
            ax.plot(epochs, history[key], "o-", label=f"train {key}")
            ax.plot(epochs, history[f"val_{key}"], "s--", label=f"validation (test) {key}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(key)
            ax.set_title(f"{title} {key}".strip())
            ax.grid(alpha=0.3)
            ax.legend()

    return _png(draw, panels=2)


def _save_model(model: keras.Model, target: Path) -> None:
    with kio.atomic_path(target, suffix=".keras") as tmp:
        model.save(tmp)


def write_run(
    run_dir: str | os.PathLike,
    result: TrainResult,
    *,
    arguments: dict[str, Any],
    wall_time_s: float,
    loss_label: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes model.keras, history.json, metrics.json and curves.png; returns the metrics."""
    run_dir = Path(run_dir)
    t = time.perf_counter()
    _save_model(result.model, run_dir / "model.keras")
    save_s = time.perf_counter() - t
    kio.write_json(run_dir / "history.json", result.history)
    kio.write_bytes(run_dir / "curves.png", curves_png(result.history, title=loss_label))
    total = wall_time_s + (time.perf_counter() - t)
    metrics = {
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "validation": VALIDATION_NOTE,
        "loss": loss_label,
        "num_train": result.num_train,
        "num_test": result.num_test,
        "epochs": len(result.history["loss"]),
        "feature_cache": result.feature_cache,
        "assembled_model_max_abs_diff": result.assembly_max_abs_diff,
        "wall_time_s": total,
        "images_per_s": result.num_train * len(result.history["loss"]) / total,
        "images_per_s_note": "training images x epochs / wall time (loading, model "
        "building, feature extraction, training and saving included)",
        "timings_s": {**result.timings, "save_s": save_s},
        "initial_weights_sha256": result.initial_weights_sha256,
        "versions": versions(),
        "arguments": arguments,
        **(extra or {}),
    }
    kio.write_json(run_dir / "metrics.json", metrics)
    return metrics


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #
# Flags that define a run: a resumed run takes them from its checkpoint.
_RUN_FLAGS = (
    "data_dir",
    "limit_train",
    "limit_test",
    "weights",
    "loss",
    "epochs",
    "batch_size",
    "learning_rate",
    "seed",
    "no_feature_cache",
    "xla",
    "checkpoint_every",
    "strategy",
    "devices",
    "mixed_precision",
)


def _arguments(args: Any) -> dict[str, Any]:
    out = {}
    for key, value in sorted(vars(args).items()):
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        else:
            out[key] = str(value)
    return out


def _weights_arg(text: str | None) -> str | None:
    if text is None or text.lower() == "none":
        return None
    if text.lower() == "imagenet":
        return "imagenet"
    return text


def _config_from_args(args: Any, *, loss: Any) -> TrainConfig:
    return TrainConfig(
        weights=_weights_arg(args.weights),
        loss=loss,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        feature_cache=not args.no_feature_cache,
        xla_optimizer=getattr(args, "xla", "update") == "update",
        xla_step=getattr(args, "xla", "update") == "step",
        verbose=not args.quiet,
        checkpoint_every=getattr(args, "checkpoint_every", 0),
    )


def _prepare_out_dir(path: Path, *, overwrite: bool, expected: Sequence[str]) -> None:
    if path.exists() and not path.is_dir():
        raise KerasCEError(f"--out {path} exists and is not a directory.")
    names = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []
    if names and not overwrite:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise KerasCEError(
            f"--out {path} is not empty ({shown}); refusing to overwrite it. Choose another "
            f"directory or pass --overwrite to replace its {', '.join(expected)}."
        )
    path.mkdir(parents=True, exist_ok=True)


def _remove_temporaries(run_dir: Path, names: Sequence[str]) -> None:
    """Deletes what killed writers of ``names`` left in ``run_dir``."""
    for name in names:
        kio.clean_stale(run_dir / name)


def _resumed_args(args: Any, recorded: dict[str, Any]) -> Any:
    """``args`` with the run-defining flags of the run being resumed."""
    from keras_ce_plugin.cli import build_parser

    defaults = vars(build_parser().parse_args(["train", "--out", str(args.out)]))
    merged_args = type(args)(**vars(args))
    for key in _RUN_FLAGS:
        # A flag newer than the checkpoint's run had its default there.
        given, before = getattr(args, key, None), recorded.get(key, defaults.get(key))
        if given != defaults.get(key) and given != before:
            flag = "--" + key.replace("_", "-")
            raise KerasCEError(
                f"{flag} {given} differs from the run being resumed ({flag} {before}). A "
                "resumed run continues with the arguments it was started with; leave the "
                "flag out (or start a new run with --overwrite)."
            )
        setattr(merged_args, key, before)
    return merged_args


def _distribution(args: Any) -> Any:
    """The --strategy/--devices/--mixed-precision setup; call before any TensorFlow op."""
    name = getattr(args, "strategy", "none")
    devices = getattr(args, "devices", None)
    policy = getattr(args, "mixed_precision", None)
    if name == "none" and devices is None and policy is None:
        return None
    try:
        from keras_ce_plugin import distribute
    except ImportError:  # pragma: no cover - the module ships with the package
        raise KerasCEError(
            "--strategy, --devices and --mixed-precision are not available yet in "
            "`keras-ce train` (keras_ce_plugin.distribute is missing)."
        ) from None
    strategy = distribute.make_strategy(name, devices)
    distribute.set_mixed_precision(policy)
    return strategy


def _load_data(args: Any) -> Any:
    return load_cifar10(args.data_dir, limit_train=args.limit_train, limit_test=args.limit_test)


def _say(args: Any, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _train_into(
    run_dir: Path,
    args: Any,
    config: TrainConfig,
    data: Any,
    strategy: Any,
    checkpoint: Checkpoint | None,
) -> TrainResult:
    """:func:`train` for ``keras-ce train``, checkpointing into ``run_dir``."""
    return train(
        config,
        data,
        strategy=strategy,
        resume=checkpoint,
        checkpoint_path=run_dir / CHECKPOINT_FILE if config.checkpoint_every else None,
        checkpoint_meta={"arguments": _arguments(args)},
    )


def _writes_run_dir(args: Any) -> bool:
    """Whether this process writes ``--out``: always, except a non-chief multiworker worker."""
    if getattr(args, "strategy", "none") != "multiworker":
        return True
    from keras_ce_plugin import distribute

    return distribute.is_chief()


def _train_as_worker(
    args: Any, config: TrainConfig, strategy: Any, checkpoint: Checkpoint | None
) -> int:
    """A non-chief worker of ``--strategy multiworker``: trains in step with the chief,
    which alone writes ``--out``; this worker writes the same files to a temporary
    directory (as every worker must take part in saving) and removes it."""
    import shutil
    import tempfile

    from keras_ce_plugin import distribute

    task = distribute.parse_tf_config()["task"]
    who = f"{task['type']} {task['index']}"
    _say(args, f"{who}: not the chief; the chief writes {args.out}")
    data = _load_data(args)
    scratch = Path(tempfile.mkdtemp(prefix="keras-ce-worker-"))
    try:
        result = _train_into(scratch, args, config, data, strategy, checkpoint)
        write_run(
            scratch,
            result,
            arguments=_arguments(args),
            wall_time_s=0.0,
            loss_label=_loss_label(args.loss),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"{who}: done, test accuracy {result.test_accuracy:.4f}; wrote nothing "
        f"(the chief wrote {args.out})",
        flush=True,
    )
    return 0


def train_command(args: Any) -> int:
    """``keras-ce train``: trains and writes ``--out``; returns the exit status.

    With ``--checkpoint-every N`` it keeps ``RUN_DIR/checkpoint.npz`` (written
    atomically every N epochs, removed when the run has finished); ``--resume``
    continues from it with the arguments the run was started with. While it runs,
    ``RUN_DIR/.keras-ce.lock`` keeps a second run out.
    """
    start = time.perf_counter()
    out = Path(args.out)
    checkpoint = None
    if args.resume:
        if not out.is_dir():
            raise KerasCEError(f"--resume: --out {out} is not a directory of a run to resume.")
        checkpoint = load_checkpoint(out / CHECKPOINT_FILE)
        args = _resumed_args(args, checkpoint.meta.get("arguments", {}))
    strategy = _distribution(args)  # before TensorFlow initialises its devices
    config = _config_from_args(args, loss=args.loss)
    config.validate()
    if not _writes_run_dir(args):
        return _train_as_worker(args, config, strategy, checkpoint)
    if not args.resume:
        _prepare_out_dir(out, overwrite=args.overwrite, expected=RUN_FILES)
    with run_lock(out):
        _remove_temporaries(out, (*RUN_FILES, CHECKPOINT_FILE))
        if not args.resume:
            (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # a finished or replaced run's
        t = time.perf_counter()
        data = _load_data(args)
        load_s = time.perf_counter() - t
        if checkpoint is not None:
            _say(args, f"resuming {out} after epoch {checkpoint.epoch} of {config.epochs}")
        result = _train_into(out, args, config, data, strategy, checkpoint)
        result.timings["load_data_s"] = load_s
        metrics = write_run(
            out,
            result,
            arguments=_arguments(args),
            wall_time_s=time.perf_counter() - start,
            loss_label=_loss_label(args.loss),
            extra={"resumed_after_epoch": checkpoint.epoch if checkpoint else None},
        )
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    print(
        f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f} "
        f"({result.num_train} train / {result.num_test} test images, "
        f"{config.epochs} epochs, {metrics['wall_time_s']:.1f} s); wrote "
        f"{', '.join(RUN_FILES)} to {out}",
        flush=True,
    )
    return 0


# --------------------------------------------------------------------------- #
# compare
# --------------------------------------------------------------------------- #
COMPARE_FILES = ("compare.json", "compare.png", "report.md")
CUSTOM, BUILTIN = "custom", "builtin"


def _builtin_loss() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy()


def compare_histories(
    a: dict[str, list[float]], b: dict[str, list[float]]
) -> dict[str, list[float]]:
    """Per-epoch absolute differences of two histories.

    >>> compare_histories({"loss": [1.0, 0.5]}, {"loss": [1.0, 0.25]})
    {'loss': [0.0, 0.25]}
    """
    return {k: [abs(x - y) for x, y in zip(a[k], b[k])] for k in a if k in b}


def _compare_png(runs: dict[str, TrainResult], diffs: dict[str, list[float]]) -> bytes:
    styles = {CUSTOM: ("-", "o"), BUILTIN: ("--", "x")}

    def draw(axes: Any) -> None:
        for ax, key in zip(axes[:2], ("loss", "accuracy")):
            for name, result in runs.items():
                line, marker = styles[name]
                epochs = range(1, len(result.history[key]) + 1)
                ax.plot(epochs, result.history[key], line, marker=marker, label=f"{name} train")
                ax.plot(
                    epochs,
                    result.history[f"val_{key}"],
                    line,
                    marker=marker,
                    label=f"{name} validation (test)",
                )
            ax.set_xlabel("epoch")
            ax.set_ylabel(key)
            ax.set_title(f"{key}: custom vs built-in")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        ax = axes[2]
        for key, values in diffs.items():
            epochs = range(1, len(values) + 1)
            ax.plot(epochs, [max(v, 1e-12) for v in values], marker="o", label=key)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("|custom - built-in| (floored at 1e-12)")
        ax.set_title("absolute difference")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")

    return _png(draw, panels=3)


def _report_md(summary: dict[str, Any], runs: dict[str, TrainResult]) -> str:
    c, b = runs[CUSTOM].history, runs[BUILTIN].history
    diffs = summary["abs_diff"]
    lines = [
        "# customloss>CategoricalCE vs keras.losses.CategoricalCrossentropy()",
        "",
        "## What was measured",
        "",
        f"Two training runs of the tutorial's VGG16 + dense head ({summary['weights']} base "
        f"weights) on {summary['num_train']} CIFAR-10 training images for "
        f"{summary['epochs']} epochs (batch size {summary['batch_size']}, Adam, "
        f"learning rate {summary['learning_rate']}, seed {summary['seed']}), identical except "
        "for the loss: `customloss>CategoricalCE` (this plugin) and "
        "`keras.losses.CategoricalCrossentropy()` (Keras' built-in). Both started from the "
        "same initial weights (SHA-256 of all weights: "
        f"`{summary['initial_weights_sha256'][CUSTOM][:16]}...` and "
        f"`{summary['initial_weights_sha256'][BUILTIN][:16]}...`), used the same data order "
        "and dropout masks (same seed), and "
        + (
            "trained the head on the same cached VGG16 features."
            if summary["feature_cache"]
            else "ran plain `model.fit` on the full model."
        ),
        f"Validation data is the {summary['num_test']} test images, as in the tutorial. "
        f"Backend: {summary['versions']['keras_backend']} (Keras "
        f"{summary['versions']['keras']}, TensorFlow {summary['versions']['tensorflow']}) on "
        f"{summary['versions']['platform']}.",
        "",
        "## Per epoch",
        "",
        "| epoch | loss custom | loss built-in | abs diff | val_loss custom | val_loss "
        "built-in | abs diff | accuracy custom | accuracy built-in | abs diff | val_accuracy "
        "custom | val_accuracy built-in | abs diff |",
        "|---:" * 13 + "|",
    ]
    for i in range(summary["epochs"]):
        cells = [str(i + 1)]
        for key in HISTORY_KEYS:
            cells += [f"{c[key][i]:.7f}", f"{b[key][i]:.7f}", f"{diffs[key][i]:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    tol = summary["tolerance"]
    worst = summary["max_abs_diff_overall"]
    lines += [
        "",
        "## Test accuracy",
        "",
        f"- custom (`customloss>CategoricalCE`): {runs[CUSTOM].test_accuracy:.4f} "
        f"(test loss {runs[CUSTOM].test_loss:.6f})",
        f"- built-in (`keras.losses.CategoricalCrossentropy()`): "
        f"{runs[BUILTIN].test_accuracy:.4f} (test loss {runs[BUILTIN].test_loss:.6f})",
        "",
        "## Verdict",
        "",
        f"Largest absolute difference over all epochs and all four curves: {worst:.3e} "
        f"(loss curves: {summary['max_abs_diff_loss']:.3e}; accuracy curves: "
        f"{summary['max_abs_diff_accuracy']:.3e}); tolerance {tol:g}.",
        "",
        (
            f"**AGREE**: the curves agree within {tol:g}."
            if summary["agree"]
            else f"**DIFFER**: the curves differ by more than {tol:g}."
        ),
        "",
    ]
    return "\n".join(lines)


def compare_command(args: Any) -> int:
    """``keras-ce compare``: the same training with the custom and the built-in loss.

    Returns 0 when every per-epoch difference is within ``--tolerance``, else 1.
    """
    start = time.perf_counter()
    tolerance = args.tolerance
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise KerasCEError(f"--tolerance must be a number >= 0. Received: {tolerance!r}")
    base_config = _config_from_args(args, loss=DEFAULT_LOSS)
    base_config.validate()
    out = Path(args.out)
    _prepare_out_dir(out, overwrite=args.overwrite, expected=COMPARE_FILES)
    with run_lock(out):
        _remove_temporaries(out, COMPARE_FILES)
        return _compare(args, base_config, tolerance, out, start)


def _compare(args: Any, base_config: TrainConfig, tolerance: float, out: Path, start: float) -> int:
    data = _load_data(args)
    runs: dict[str, TrainResult] = {}
    features = None
    for name, loss in ((CUSTOM, DEFAULT_LOSS), (BUILTIN, _builtin_loss())):
        _say(args, f"[compare] training with {_loss_label(loss)}")
        config = dataclasses.replace(base_config, loss=loss)
        runs[name] = train(config, data, features=features)
        features = runs[name].features
    c, b = runs[CUSTOM], runs[BUILTIN]
    if c.initial_weights_sha256 != b.initial_weights_sha256:  # pragma: no cover
        raise RuntimeError("the two runs did not start from the same weights")
    diffs = compare_histories(c.history, b.history)
    max_diff = {k: max(v) for k, v in diffs.items()}
    worst = max(max_diff.values())
    agree = worst <= tolerance
    summary: dict[str, Any] = {
        "measured": "per-epoch loss, accuracy, val_loss and val_accuracy of two runs that "
        "differ only in the loss; abs_diff = |custom - builtin|; " + VALIDATION_NOTE,
        "losses": {CUSTOM: DEFAULT_LOSS, BUILTIN: _loss_label(_builtin_loss())},
        "weights": "none (random)" if base_config.weights is None else str(base_config.weights),
        "num_train": c.num_train,
        "num_test": c.num_test,
        "epochs": base_config.epochs,
        "batch_size": base_config.batch_size,
        "learning_rate": base_config.learning_rate,
        "seed": base_config.seed,
        "feature_cache": c.feature_cache,
        "initial_weights_sha256": {
            CUSTOM: c.initial_weights_sha256,
            BUILTIN: b.initial_weights_sha256,
        },
        "history": {CUSTOM: c.history, BUILTIN: b.history},
        "test_accuracy": {CUSTOM: c.test_accuracy, BUILTIN: b.test_accuracy},
        "test_loss": {CUSTOM: c.test_loss, BUILTIN: b.test_loss},
        "abs_diff": diffs,
        "max_abs_diff": max_diff,
        "max_abs_diff_loss": max(max_diff["loss"], max_diff["val_loss"]),
        "max_abs_diff_accuracy": max(max_diff["accuracy"], max_diff["val_accuracy"]),
        "max_abs_diff_overall": worst,
        "tolerance": tolerance,
        "agree": agree,
        "versions": versions(),
        "arguments": _arguments(args),
    }
    kio.write_bytes(out / "compare.png", _compare_png(runs, diffs))
    kio.write_bytes(out / "report.md", _report_md(summary, runs).encode())
    summary["wall_time_s"] = time.perf_counter() - start
    kio.write_json(out / "compare.json", summary)
    verdict = "AGREE" if agree else "DIFFER"
    print(
        f"{verdict}: largest per-epoch |custom - built-in| = {worst:.3e} (tolerance "
        f"{tolerance:g}); test accuracy custom {c.test_accuracy:.4f}, built-in "
        f"{b.test_accuracy:.4f}; wrote {', '.join(COMPARE_FILES)} to {out}",
        flush=True,
    )
    return 0 if agree else 1

"""The training loop: the tutorial's ``fit``, on cached features when it can.

:func:`train` trains :func:`~keras_ce_plugin.models.build_vgg16_classifier` the way
the tutorial does (Adam, batch 32, 10 epochs, one-hot labels, pixels / 255,
``validation_data`` = the test split) and returns the full model (base + head,
compiled with the loss) with its history.

With a frozen base, the base's features are computed once
(:mod:`~keras_ce_plugin.training.features`) and the head alone is fitted on them:
the same layer objects (same initial weights, same dropout seed generators), the
same optimizer settings, batch size, loss and metrics, and the same
``fit(..., shuffle=True)`` data order (the seed is reset right before ``fit`` on
both paths). Afterwards the full model is compiled with the trained optimizer
state. With a plain Adam this is bitwise the tutorial's run; the speed mechanisms
of :mod:`~keras_ce_plugin.training.speedups` apply on this path.
``feature_cache=False`` or a trainable base run the tutorial's ``model.fit`` on the
full model.

With a random base (``weights=None``) the base is He-initialised from the run's
seed and a fixed standardisation of the base's features
(:func:`~keras_ce_plugin.models.with_feature_standardization`), computed from the
training images' features, sits between base and head in the model that is
trained and saved. On the feature-cache path the cached features are standardised
by that very layer once and the head is fitted on them; on the plain ``fit`` path
a prediction pass over the training images gives the statistics first.

Validation uses the test split, as the tutorial does: ``val_loss`` and
``val_accuracy`` are test-set numbers, and the reported test loss and accuracy
are those of the last epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from typing import Any

import keras
import numpy as np

from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.models import (
    build_vgg16_classifier,
    split_base_and_head,
    with_feature_standardization,
)
from keras_ce_plugin.training import speedups
from keras_ce_plugin.training.checkpoint import Checkpoint, epoch_seed, restore, save_checkpoint
from keras_ce_plugin.training.config import (
    HISTORY_KEYS,
    TrainConfig,
    TrainResult,
    base_info,
    base_line,
)
from keras_ce_plugin.training.features import extract_features
from keras_ce_plugin.training.progress import progress_callbacks

# Images run through the full model to check the assembled model against the head.
_ASSEMBLY_CHECK_IMAGES = 64


def _weights_sha256(model: keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


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
            its scope (the speed mechanisms are then off).
        resume: A :func:`~keras_ce_plugin.training.load_checkpoint` result of this
            configuration: training continues after its epoch, from its weights,
            optimizer and dropout states.
        checkpoint_path: Where :func:`~keras_ce_plugin.training.save_checkpoint`
            writes the state every ``config.checkpoint_every`` epochs (and after the
            last), with ``checkpoint_meta`` (e.g. the command's arguments) stored beside it.

    With ``config.checkpoint_every`` > 0 (or ``resume``) the epochs run one ``fit``
    call each, the data order of epoch ``e`` seeded with
    :func:`~keras_ce_plugin.training.epoch_seed`, so a run resumed from a checkpoint
    repeats exactly what the uninterrupted run would have done. That order differs
    from a single ``fit`` over all epochs (the default and the tutorial), so such a
    run's curves differ from the default run's by the data order alone.

    With ``config.verbose`` progress goes to stdout: Keras' bars on a terminal, one
    line per epoch otherwise.
    """
    config.validate()
    if checkpoint_path is not None and not config.checkpoint_every:
        raise KerasCEError("`checkpoint_path` needs `config.checkpoint_every` >= 1.")
    x_train, y_train, x_test, y_test = _check_data(data)
    info = base_info(config)
    if config.verbose:
        print(base_line(info), file=sys.stderr, flush=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        keras.utils.set_random_seed(config.seed)
        model = build_vgg16_classifier(
            config.weights, freeze_base=config.freeze_base, seed=config.seed
        )
        base, head_layers = split_base_and_head(model)
        initial_sha = _weights_sha256(model)
        timings["build_model_s"] = time.perf_counter() - t0
        use_cache = config.feature_cache and not base.trainable
        fast_ok = use_cache and speedups.available(strategy)
        xla_step = fast_ok and config.xla_step
        optimizer = speedups.make_optimizer(
            config.lr, xla_update=fast_ok and config.xla_optimizer and not xla_step
        )
        metrics = ["accuracy"]
        if use_cache:
            t = time.perf_counter()
            if features is None:
                f_train, f_test = (
                    extract_features(
                        base,
                        x,
                        batch_size=config.extract_batch_size or config.batch_size,
                        pad_last=config.extract_batch_size is not None,
                        verbose=config.verbose,
                        desc=f"VGG16 features ({name})",
                    )
                    for name, x in (("train", x_train), ("test", x_test))
                )
                features = (f_train, f_test)
            f_train, f_test = features
            if len(f_train) != len(x_train) or len(f_test) != len(x_test):
                raise KerasCEError("`features` do not match the images: pass those of this data.")
            timings["extract_features_s"] = time.perf_counter() - t
            if info["feature_standardization"]:
                # The layer itself standardises the cache, once: the head then sees the
                # very values the assembled model computes.
                model = with_feature_standardization(model, f_train)
                f_train, f_test = (_standardized(model, f) for f in (f_train, f_test))
            last = len(f_train) % config.batch_size  # the last, partial batch's size
            batches = [config.batch_size, last] if last else [config.batch_size]
            fit_model = speedups.head_model(
                f_train.shape[1:],
                head_layers,
                xla_step=xla_step,
                fast_input_grad_batches=batches if fast_ok and config.fast_input_grad else (),
                # Bitwise runs (no XLA update) take it only where the probe shows the
                # same bits; the default run, already within rounding, everywhere.
                same_bits=not config.xla_optimizer,
            )
            fit_x, val_x = f_train, f_test
        else:
            if info["feature_standardization"]:
                t = time.perf_counter()
                f_train = extract_features(
                    base,
                    x_train,
                    batch_size=config.extract_batch_size or config.batch_size,
                    pad_last=config.extract_batch_size is not None,
                    verbose=config.verbose,
                    desc="VGG16 features (train, for the standardisation)",
                )
                model = with_feature_standardization(model, f_train)
                timings["standardization_stats_s"] = time.perf_counter() - t
            fit_model, fit_x, val_x = model, x_train, x_test
            features = None
        fit_model.compile(optimizer=optimizer, loss=config.loss, metrics=metrics)
        if xla_step:  # its variables must exist before the XLA step is traced
            optimizer.build(fit_model.trainable_variables)
        verbose, callbacks = progress_callbacks(config.verbose, epochs=config.epochs)
        fit_kwargs = dict(
            batch_size=config.batch_size,
            shuffle=True,
            validation_data=(val_x, y_test),
            verbose=verbose,
            callbacks=callbacks,
        )
        t = time.perf_counter()
        if config.checkpoint_every or resume is not None or checkpoint_path is not None:
            history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
            start = 0
            if resume is not None:
                recorded = resume.meta.get("initial_weights_sha256")
                if recorded not in (None, initial_sha):
                    raise KerasCEError(
                        "The model built for the resumed run differs from the checkpointed "
                        "run's initial model (other --weights file or seed?); refusing to "
                        "resume. Start the run again with --overwrite."
                    )
                restore(fit_model, resume)
                history = {k: list(resume.history[k]) for k in HISTORY_KEYS}
                start = resume.epoch
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
                optimizer=speedups.as_plain_adam(fit_model.optimizer, model.trainable_variables),
                loss=config.loss,
                metrics=metrics,
            )
            n = min(_ASSEMBLY_CHECK_IMAGES, len(x_test))
            full = keras.ops.convert_to_numpy(model.predict_on_batch(x_test[:n]))
            part = keras.ops.convert_to_numpy(fit_model.predict_on_batch(val_x[:n]))
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
        speedups=speedups.engaged(fit_model),
        base=info,
    )


def _standardized(model: keras.Model, features: np.ndarray) -> np.ndarray:
    """``features`` through ``model``'s feature standardisation layer."""
    layer = split_base_and_head(model)[1][0]
    return keras.ops.convert_to_numpy(layer(features))

"""keras_ce_plugin.training: the feature cache gives plain model.fit's history; config checks."""

from __future__ import annotations

import dataclasses
import io
import re

import keras
import numpy as np
import pytest

from keras_ce_plugin import CategoricalCE, KerasCEError
from keras_ce_plugin.data import load_cifar10
from keras_ce_plugin.models import (
    build_vgg16_classifier,
    feature_standardization,
    split_base_and_head,
    standardization_layer,
    with_feature_standardization,
)
from keras_ce_plugin.training import (
    HISTORY_KEYS,
    TrainConfig,
    extract_features,
    train,
)

SEED, EPOCHS = 3, 3
CONFIG = TrainConfig(weights=None, epochs=EPOCHS, seed=SEED, verbose=False)


@pytest.fixture(scope="module")
def small(cifar_dir):
    return load_cifar10(cifar_dir, limit_train=96, limit_test=32)


def random_base_model(x, seed=SEED):
    """The model ``train`` builds for a random base: He-initialised from ``seed``, with
    the standardisation of the training images' features (computed as ``train`` does)."""
    keras.utils.set_random_seed(seed)
    model = build_vgg16_classifier(None, seed=seed)
    base, _ = split_base_and_head(model)
    features = extract_features(base, x, batch_size=32, pad_last=False, verbose=False)
    return with_feature_standardization(model, features)


def tutorial_fit(data, *, seed=SEED, epochs=EPOCHS):
    """The tutorial's plain ``model.fit`` on the full model (with the random base's
    standardisation and learning rate), seeded as ``train`` seeds it."""
    (x, y), (xt, yt) = data
    model = random_base_model(x, seed)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4), loss="customloss>CategoricalCE", metrics=["accuracy"]
    )
    keras.utils.set_random_seed(seed)
    hist = model.fit(x, y, epochs=epochs, batch_size=32, validation_data=(xt, yt), verbose=0)
    return model, {k: [float(v) for v in hist.history[k]] for k in HISTORY_KEYS}


@pytest.fixture(scope="module")
def reference(small):
    return tutorial_fit(small)


@pytest.fixture(scope="module")
def default_run(small):
    return train(CONFIG, small)


@pytest.mark.parametrize(
    "overrides,atol",
    [
        # The head alone on cached features, plain Adam: bitwise the same run (with the
        # fast input gradient where the probe allows it, and without).
        ({"xla_optimizer": False}, 0.0),
        ({"xla_optimizer": False, "fast_input_grad": False}, 0.0),
        # The default: Adam's update XLA-compiled (fused multiply-adds round differently).
        ({}, 1e-5),
        # --no-feature-cache: plain fit through train().
        ({"feature_cache": False}, 0.0),
        # The whole head step XLA-compiled, the dropout noise drawn outside XLA.
        ({"xla_step": True}, 1e-5),
    ],
)
def test_same_history_as_plain_fit(small, reference, default_run, overrides, atol):
    ref_model, ref = reference
    assert ref["loss"][0] != ref["loss"][-1]  # it trained: the comparison means something
    result = train(dataclasses.replace(CONFIG, **overrides), small) if overrides else default_run
    assert result.feature_cache is overrides.get("feature_cache", True)
    for key in HISTORY_KEYS:
        np.testing.assert_allclose(result.history[key], ref[key], rtol=0, atol=atol, err_msg=key)
    x_test = small[1][0]
    np.testing.assert_allclose(
        result.model.predict(x_test, verbose=0),
        ref_model.predict(x_test, verbose=0),
        rtol=0,
        atol=atol,
    )
    assert result.test_loss == result.history["val_loss"][-1]
    assert result.test_accuracy == result.history["val_accuracy"][-1]
    # Both paths (feature cache, plain fit) give the reference's structure.
    assert [(type(la).__name__, la.name) for la in result.model.layers] == [
        (type(la).__name__, la.name) for la in ref_model.layers
    ]


def test_xla_step_draws_the_tutorials_dropout_masks(small, reference):
    """Control: compiling the same head step with Keras' own ``jit_compile=True``
    draws the dropout masks inside XLA, so the run differs; ``xla_step`` does not."""
    from keras_ce_plugin.training.speedups import head_model as _head_model

    result = train(dataclasses.replace(CONFIG, xla_step=True), small)
    (_, y), (_, yt) = small
    f_train, f_test = result.features
    norm = feature_standardization(f_train)
    f_train, f_test = (keras.ops.convert_to_numpy(norm(f)) for f in (f_train, f_test))
    keras.utils.set_random_seed(SEED)
    _, head = split_base_and_head(build_vgg16_classifier(None, seed=SEED))
    head_model = _head_model(f_train.shape[1:], head, xla_step=False)
    head_model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss="customloss>CategoricalCE",
        metrics=["accuracy"],
        jit_compile=True,
    )
    keras.utils.set_random_seed(SEED)
    hist = head_model.fit(
        f_train, y, epochs=EPOCHS, batch_size=32, validation_data=(f_test, yt), verbose=0
    )
    ref = reference[1]["loss"]
    assert max(abs(a - b) for a, b in zip(hist.history["loss"], ref)) > 1e-4
    assert max(abs(a - b) for a, b in zip(result.history["loss"], ref)) <= 1e-5
    # The XLA step was traced into training (and replaces the XLA Adam update).
    assert result.speedups["xla_step"] is True
    assert result.speedups["xla_optimizer"] is False


@pytest.mark.parametrize(
    "layer,match",
    [
        (keras.layers.Dropout(0.5, noise_shape=(1, 4096)), "noise_shape"),
        (keras.layers.GaussianNoise(0.1), "GaussianNoise"),
    ],
)
def test_xla_step_refuses_layers_it_cannot_reproduce(layer, match):
    from keras_ce_plugin.training.speedups import head_model as _head_model

    layers = [keras.layers.Dense(4096), layer, keras.layers.Dense(10, activation="softmax")]
    with pytest.raises(KerasCEError, match=match):
        _head_model((512,), layers, xla_step=True)


def test_fast_input_grad_keeps_every_bit(cifar_dir):
    """100 images: batches of 32 and a last one of 4, both probed; the run with the
    fast input gradient ends with the very weights of the run without it."""
    from keras_ce_plugin.training.speedups.fast_grad import (
        fast_input_grad_layers as _fast_input_grad_layers,
    )

    keras.utils.set_random_seed(SEED)
    _, head = split_base_and_head(build_vgg16_classifier(None))
    chosen = _fast_input_grad_layers(head, [32, 4])
    if not chosen:
        pytest.skip("this CPU's TensorFlow gives other bits for (W dy^T)^T: the fast path is off")
    ((name, sizes),) = chosen.items()
    assert head[[layer.name for layer in head].index(name)].kernel.shape == (4096, 4096)
    assert 32 in sizes
    data = load_cifar10(cifar_dir, limit_train=100, limit_test=32)
    runs = [
        train(dataclasses.replace(CONFIG, epochs=2, xla_optimizer=False, fast_input_grad=f), data)
        for f in (True, False)
    ]
    assert runs[0].history == runs[1].history
    # The fast gradient was traced into training for the probed layer, and only when on.
    assert runs[0].speedups["fast_input_grad"] == chosen
    assert runs[1].speedups == {"xla_optimizer": False, "xla_step": False, "fast_input_grad": {}}
    assert runs[0].history["loss"][0] != runs[0].history["loss"][1]
    for a, b in zip(runs[0].model.get_weights(), runs[1].model.get_weights()):
        assert np.array_equal(a, b)


def test_fast_input_grad_probe_sees_one_ulp():
    """The probe compares bits: a fast path about one ulp off is refused."""
    from keras_ce_plugin.training.speedups.fast_grad import (
        dense_fast_input_grad as _dense_fast_input_grad,
    )
    from keras_ce_plugin.training.speedups.fast_grad import (
        same_bits_as_tensorflow as _same_bits_as_tensorflow,
    )

    keras.utils.set_random_seed(SEED)
    layer = keras.layers.Dense(64, activation="relu")
    layer.build((None, 1024))

    def off_by_one_ulp(layer, x, fast_batches):
        return _dense_fast_input_grad(layer, x, fast_batches) * (1.0 + 2.0**-23)

    assert not _same_bits_as_tensorflow(layer, [8], [8], fast=off_by_one_ulp)
    # TensorFlow's own gradient at sizes not listed as fast: the same bits, always.
    assert _same_bits_as_tensorflow(layer, [8, 32], [])


def test_another_seed_gives_another_history(small, reference):
    """The equivalence above is not a coincidence of training that does nothing."""
    result = train(dataclasses.replace(CONFIG, seed=SEED + 1), small)
    diff = max(abs(a - b) for a, b in zip(result.history["loss"], reference[1]["loss"]))
    assert diff > 1e-4


def test_returned_model_is_complete(default_run):
    result = default_run
    model = result.model
    base, head = split_base_and_head(model)
    assert not base.trainable and len(head) == 7 and head[0] is standardization_layer(model)
    assert model.loss == "customloss>CategoricalCE"
    assert isinstance(keras.losses.get(model.loss), CategoricalCE)
    assert type(model.optimizer) is keras.optimizers.Adam  # saved as plain Adam
    steps = EPOCHS * -(-96 // 32)
    assert int(model.optimizer.iterations) == steps
    assert result.assembly_max_abs_diff is not None and result.assembly_max_abs_diff <= 1e-6
    # The optimizer state is the trained one: Adam's first moments are not zero.
    assert any(np.abs(keras.ops.convert_to_numpy(v)).max() > 0 for v in model.optimizer.variables)
    # The frozen base is the initial one: the same seed rebuilds the same base weights.
    keras.utils.set_random_seed(SEED)
    fresh_base, _ = split_base_and_head(build_vgg16_classifier(None, seed=SEED))
    for a, b in zip(base.get_weights(), fresh_base.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_trainable_base_falls_back_to_plain_fit(small):
    (x, y), (xt, yt) = small
    data = ((x[:32], y[:32]), (xt[:16], yt[:16]))
    config = dataclasses.replace(CONFIG, freeze_base=False, epochs=1)
    before = build_vgg16_classifier(None, seed=SEED).get_weights()[0]
    result = train(config, data)
    assert not result.feature_cache and result.features is None
    assert not np.array_equal(result.model.get_weights()[0], before)  # the base trained


def test_features_are_the_base_outputs(small):
    (x, _), _ = small
    keras.utils.set_random_seed(0)
    base, _ = split_base_and_head(build_vgg16_classifier(None))
    features = extract_features(base, x[:20], batch_size=7, verbose=False)
    assert features.shape == (20, 1, 1, 512) and features.dtype == np.float32
    np.testing.assert_allclose(features, base.predict(x[:20], verbose=0), rtol=1e-5, atol=1e-6)


def test_features_can_be_reused(small, default_run):
    first = default_run
    again = train(CONFIG, small, features=first.features)
    assert again.history == first.history
    with pytest.raises(KerasCEError, match="do not match"):
        train(CONFIG, small, features=(first.features[0][:5], first.features[1]))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": -1}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"seed": "1"}, "seed"),
        ({"loss": "customloss>NoSuchLoss"}, "Unknown loss"),
        ({"loss": 3}, "loss"),
        ({"checkpoint_every": -1}, "checkpoint_every"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(KerasCEError, match=match):
        dataclasses.replace(CONFIG, **overrides).validate()


def test_checkpoint_path_needs_checkpoint_every(small, tmp_path):
    with pytest.raises(KerasCEError, match="checkpoint_every"):
        train(CONFIG, small, checkpoint_path=tmp_path / "checkpoint.npz")


def test_data_errors(small):
    (x, y), test = small
    with pytest.raises(KerasCEError, match="as many labels as images"):
        train(CONFIG, ((x, y[:-1]), test))
    with pytest.raises(KerasCEError, match="load_cifar10 returns"):
        train(CONFIG, (x, y))


def test_default_run_engages_the_xla_adam_update(default_run, reference):
    """The default XLA-compiles Adam's update: it is traced into training, and its
    rounding leaves weights that are close to, but not bitwise, the tutorial's."""
    assert default_run.speedups["xla_optimizer"] is True
    assert default_run.speedups["xla_step"] is False
    ref_model, _ = reference
    pairs = list(zip(default_run.model.get_weights(), ref_model.get_weights()))
    assert all(np.allclose(a, b, rtol=0, atol=1e-4) for a, b in pairs)
    assert not all(np.array_equal(a, b) for a, b in pairs)


def test_default_run_takes_the_fast_input_gradient_on_any_cpu(small, reference, monkeypatch):
    """Where the bit-identity probe fails (forced here), the default run -- within
    rounding of the tutorial's anyway -- still takes the fast input gradient, so it is
    fast on that CPU too; a bitwise run (no XLA update) keeps TensorFlow's."""
    from keras_ce_plugin.training.speedups import fast_grad

    monkeypatch.setattr(fast_grad, "same_bits_as_tensorflow", lambda *args, **kwargs: False)
    default = train(CONFIG, small)
    ((name, sizes),) = default.speedups["fast_input_grad"].items()
    assert sizes == (32,)  # 96 images: full batches only
    _, ref = reference
    for key in HISTORY_KEYS:
        np.testing.assert_allclose(default.history[key], ref[key], rtol=0, atol=1e-5, err_msg=key)
    bitwise = train(dataclasses.replace(CONFIG, xla_optimizer=False, epochs=1), small)
    assert bitwise.speedups["fast_input_grad"] == {}


def test_speedups_are_off_without_the_feature_cache(small):
    (x, y), (xt, yt) = small
    data = ((x[:32], y[:32]), (xt[:16], yt[:16]))
    result = train(dataclasses.replace(CONFIG, feature_cache=False, epochs=1), data)
    assert result.speedups == {"xla_optimizer": False, "xla_step": False, "fast_input_grad": {}}


# --------------------------------------------------------------------------- #
# Output that reads well anywhere
# --------------------------------------------------------------------------- #
EPOCH_LINE = re.compile(
    r"^Epoch (\d+)/(\d+) - loss: [\d.]+ - accuracy: [\d.]+ - val_loss: [\d.]+ "
    r"- val_accuracy: [\d.]+ - [\d.]+ s$"
)


def test_not_a_terminal_gets_one_line_per_epoch(small, default_run, capsys):
    config = dataclasses.replace(CONFIG, epochs=2, verbose=True)
    train(config, small, features=default_run.features)
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "\x1b[" not in out + err
    lines = [line for line in out.splitlines() if line.startswith("Epoch")]
    assert [EPOCH_LINE.match(line).groups() for line in lines] == [("1", "2"), ("2", "2")]


def test_progress_follows_the_stream():
    from keras_ce_plugin.training.progress import EpochLines, RunProgbar, progress_callbacks

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    verbose, callbacks = progress_callbacks(True, epochs=3, stream=Terminal())
    assert verbose == 1 and [type(c) for c in callbacks] == [RunProgbar]
    log = io.StringIO()
    verbose, (lines,) = progress_callbacks(True, epochs=3, stream=log)
    assert verbose == 0 and isinstance(lines, EpochLines)
    lines.on_epoch_begin(1)
    lines.on_epoch_end(1, {"loss": 0.5, "accuracy": 0.25, "val_loss": 0.75, "val_accuracy": 1})
    assert EPOCH_LINE.match(log.getvalue().rstrip("\n")).groups() == ("2", "3")


def test_feature_extraction_logs_one_line_when_not_a_terminal(capsys):
    base = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten()])
    extract_features(base, np.ones((5, 2, 2, 1), "float32"), batch_size=2, desc="features")
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    assert err.splitlines()[-1].startswith("features: 5 images, ")


@pytest.mark.parametrize("epochs", [1, 3, 10])
def test_plots_have_integer_epoch_ticks(epochs):
    from keras_ce_plugin.training import compare_figure, curves_figure

    history = {k: [0.1 * (i + 1) for i in range(epochs)] for k in HISTORY_KEYS}
    diffs = {k: [1e-8] * epochs for k in HISTORY_KEYS}
    for fig in (
        curves_figure(history, "x"),
        compare_figure({"custom": history, "builtin": history}, diffs),
    ):
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = ax.get_xticks()
            assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks


def test_standardization_is_the_training_features_statistics(default_run):
    """The layer's mean and variance are NumPy's over the training features (float64)."""
    f_train, _ = default_run.features
    norm = standardization_layer(default_run.model)
    assert norm is not None and not norm.trainable and not norm.weights
    flat = f_train.astype("float64").reshape(len(f_train), -1)
    mean, raw = flat.mean(axis=0), flat.var(axis=0)
    # No variance below 1% of the median positive one (models.VARIANCE_FLOOR); 0 -> 1.
    floor = 0.01 * np.median(raw[raw > 0])
    var = np.where(raw > 0, np.maximum(raw, floor), 1.0)
    np.testing.assert_array_equal(norm.input_mean, mean)
    np.testing.assert_array_equal(norm.input_variance, var)
    # In the layer (float32): the same values to float32 rounding.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.mean).ravel(), mean, rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.variance).ravel(), var, rtol=1e-6)
    z = keras.ops.convert_to_numpy(norm(f_train)).reshape(len(f_train), -1)
    live = raw >= floor  # features at the floor are standardised to a smaller spread
    np.testing.assert_allclose(z.mean(axis=0)[live], 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0)[live], 1.0, rtol=1e-3)
    assert default_run.base == {
        "weights": "random (He-initialised)",
        "trainable": False,
        "feature_standardization": True,
        "learning_rate": 1e-4,
        "expectation": default_run.base["expectation"],
    }
    assert float(default_run.model.optimizer.learning_rate) == pytest.approx(1e-4)


def test_weights_file_keeps_the_tutorials_setup(small, tmp_path):
    """Pretrained (file or ImageNet) weights: no standardisation, learning rate 1e-3."""
    (x, y), (xt, yt) = small
    base, _ = split_base_and_head(build_vgg16_classifier(None, seed=1))
    path = tmp_path / "vgg16.weights.h5"
    base.save_weights(path)
    config = dataclasses.replace(CONFIG, weights=str(path), epochs=1)
    assert config.lr == 1e-3 and TrainConfig(weights="imagenet").lr == 1e-3
    for cache in (True, False):
        result = train(
            dataclasses.replace(config, feature_cache=cache), ((x[:32], y[:32]), (xt[:16], yt[:16]))
        )
        assert standardization_layer(result.model) is None
        assert len(split_base_and_head(result.model)[1]) == 6
        assert result.base["weights"] == f"file: {path}"
        assert result.base["feature_standardization"] is False
        assert result.base["learning_rate"] == 1e-3
        assert float(result.model.optimizer.learning_rate) == pytest.approx(1e-3)


def test_explicit_learning_rate_wins():
    assert TrainConfig(weights=None).lr == 1e-4
    assert TrainConfig(weights="none", learning_rate=1e-3).lr == 1e-3
    assert TrainConfig(weights="imagenet", learning_rate=5e-4).lr == 5e-4

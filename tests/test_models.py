"""keras_ce_plugin.models: the tutorial's VGG16 + head, weights from files, offline errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import h5py
import keras
import numpy as np
import pytest

from keras_ce_plugin import KerasCEError
from keras_ce_plugin.models import (
    build_vgg16_classifier,
    feature_standardization,
    split_base_and_head,
    standardization_layer,
    with_feature_standardization,
)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(7)
    return build_vgg16_classifier(None)


def test_architecture_is_the_tutorials(model):
    base, head = split_base_and_head(model)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    assert base.name == "vgg16" and not base.trainable
    assert base.output_shape == (None, 1, 1, 512)
    assert len([layer for layer in base.layers if layer.weights]) == 13  # VGG16's conv layers
    summary = [
        (type(layer).__name__, layer.get_config().get("units"), layer.get_config().get("rate"))
        for layer in head
    ]
    assert summary == [
        ("Flatten", None, None),
        ("Dense", 4096, None),
        ("Dropout", None, 0.5),
        ("Dense", 4096, None),
        ("Dropout", None, 0.5),
        ("Dense", 10, None),
    ]
    activations = [layer.activation.__name__ for layer in head if hasattr(layer, "activation")]
    assert activations == ["relu", "relu", "softmax"]
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == (512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert sum(int(np.prod(w.shape)) for w in base.weights) == 14_714_688


@pytest.mark.parametrize("num_classes,freeze", [(3, True), (10, False)])
def test_options(num_classes, freeze):
    m = build_vgg16_classifier("none", num_classes=num_classes, freeze_base=freeze)
    base, _ = split_base_and_head(m)
    assert m.output_shape == (None, num_classes)
    assert base.trainable is (not freeze)
    probs = keras.ops.convert_to_numpy(m(np.zeros((2, 32, 32, 3), "float32")))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


def test_same_seed_same_model(model):
    keras.utils.set_random_seed(7)
    again = build_vgg16_classifier(None)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    keras.utils.set_random_seed(8)
    other = build_vgg16_classifier(None)
    assert not np.array_equal(model.get_weights()[0], other.get_weights()[0])


def _write_legacy_h5(base, path) -> None:
    """The layout of Keras' vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in base.layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.1.4"
        for layer in base.layers:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, w in zip(names, layer.weights):
                group.create_dataset(name, data=keras.ops.convert_to_numpy(w))


@pytest.mark.parametrize("fmt", ["weights.h5", "legacy.h5"])
def test_weights_from_a_file(model, tmp_path, fmt):
    base, _ = split_base_and_head(model)
    path = tmp_path / f"vgg16_notop.{fmt}"
    if fmt == "weights.h5":
        base.save_weights(path)
    else:
        _write_legacy_h5(base, path)
    keras.utils.set_random_seed(99)  # a different random init, overwritten by the file
    loaded, _ = split_base_and_head(build_vgg16_classifier(path))
    for a, b in zip(base.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not loaded.trainable


def test_weights_file_errors(tmp_path):
    with pytest.raises(KerasCEError, match="does not exist") as info:
        build_vgg16_classifier(tmp_path / "missing.weights.h5")
    assert "missing.weights.h5" in str(info.value) and "imagenet, none" in str(info.value)
    with pytest.raises(KerasCEError, match="is a directory"):
        build_vgg16_classifier(tmp_path)
    wrong_suffix = tmp_path / "weights.bin"
    wrong_suffix.write_bytes(b"\0" * 16)
    with pytest.raises(KerasCEError, match=r"must end in \.weights\.h5"):
        build_vgg16_classifier(wrong_suffix)
    # Real weights of other models: another network, and the whole classifier (not its base).
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    other.save_weights(tmp_path / "other.weights.h5")
    build_vgg16_classifier(None).save_weights(tmp_path / "classifier.weights.h5")
    for name in ("other.weights.h5", "classifier.weights.h5"):
        with pytest.raises(KerasCEError, match="not the weights of VGG16") as info:
            build_vgg16_classifier(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(KerasCEError, match="damaged.h5"):
        build_vgg16_classifier(damaged)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"num_classes": 0}, ValueError),
        ({"num_classes": 2.0}, ValueError),
        ({"freeze_base": "yes"}, TypeError),
        ({"weights": 3}, TypeError),
    ],
)
def test_argument_checks(kwargs, error):
    with pytest.raises(error):
        build_vgg16_classifier(**{"weights": None, **kwargs})


def test_split_rejects_other_models():
    with pytest.raises(ValueError, match="build_vgg16_classifier"):
        split_base_and_head(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


def test_imagenet_offline_suggests_alternatives(tmp_path):
    """No network (a proxy port that refuses): a clear error, not a hang or a traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "no_proxy")}
    env.update(
        KERAS_HOME=str(tmp_path),  # an empty cache: Keras must download
        HTTPS_PROXY=f"http://127.0.0.1:{port}",
        https_proxy=f"http://127.0.0.1:{port}",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    code = textwrap.dedent(
        """
        from keras_ce_plugin import KerasCEError
        from keras_ce_plugin.models import build_vgg16_classifier
        try:
            build_vgg16_classifier("imagenet")
        except KerasCEError as exc:
            print(exc)
        else:
            raise SystemExit("no error")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--weights none" in proc.stdout and ".weights.h5" in proc.stdout
    assert "ImageNet VGG16 weights" in proc.stdout


def _convs(model):
    base, _ = split_base_and_head(model)
    return [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]


def test_random_base_is_he_initialised():
    """Each kernel's std is sqrt(2 / fan_in) within 5 standard errors of a sample std
    (relative SE 1/sqrt(2n) for n draws: 1.7% for the 1,728 weights of the first
    layer, under 0.4% for the others); mean 0 likewise; biases zero."""
    convs = _convs(build_vgg16_classifier(None, seed=0))
    assert len(convs) == 13
    for layer in convs:
        kernel, bias = layer.get_weights()
        n = kernel.size
        fan_in = int(np.prod(kernel.shape[:3]))
        expected = np.sqrt(2.0 / fan_in)
        assert abs(kernel.std() / expected - 1) <= 5 / np.sqrt(2 * n), layer.name
        assert abs(kernel.mean()) <= 5 * expected / np.sqrt(n), layer.name
        assert kernel.dtype == np.float32
        np.testing.assert_array_equal(bias, 0.0)


def test_he_init_follows_the_seed():
    a = [layer.get_weights()[0] for layer in _convs(build_vgg16_classifier(None, seed=3))]
    keras.utils.set_random_seed(99)  # Keras' seed does not matter for the base, the seed does
    b = [layer.get_weights()[0] for layer in _convs(build_vgg16_classifier(None, seed=3))]
    c = [layer.get_weights()[0] for layer in _convs(build_vgg16_classifier(None, seed=4))]
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)


def test_feature_standardization_layer(rng):
    features = rng.normal(3.0, 2.0, (50, 1, 1, 8)).astype("float32")
    features[..., 5] = 1.5  # a constant feature: variance 1, not 0
    layer = feature_standardization(features)
    flat = features.astype("float64").reshape(50, 8)
    var = flat.var(axis=0)
    var[5] = 1.0
    np.testing.assert_array_equal(layer.input_mean, flat.mean(axis=0))
    np.testing.assert_array_equal(layer.input_variance, var)
    assert layer.name == "feature_standardization" and not layer.trainable
    out = keras.ops.convert_to_numpy(layer(features)).reshape(50, 8)
    np.testing.assert_allclose(out, (flat - flat.mean(axis=0)) / np.sqrt(var), atol=1e-5)


def test_with_feature_standardization_keeps_the_layers(model, rng):
    assert standardization_layer(model) is None  # the tutorial's model has none
    features = rng.normal(size=(20, 1, 1, 512)).astype("float32")
    standardised = with_feature_standardization(model, features)
    base, head = split_base_and_head(standardised)
    old_base, old_head = split_base_and_head(model)
    assert base is old_base and head[1:] == old_head
    assert head[0] is standardization_layer(standardised)
    assert standardised.output_shape == (None, 10)
    assert len(standardised.trainable_weights) == len(model.trainable_weights)
    with pytest.raises(ValueError, match="already"):
        with_feature_standardization(standardised, features)

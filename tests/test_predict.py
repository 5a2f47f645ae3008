"""``keras-ce predict`` with every artifact kind, on real CIFAR-10 images written as
PNG/JPEG files and ``.npy`` batches, and its errors on bad inputs (no mocks)."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export import cli, make_shared_export

from keras_ce_plugin import KerasCEError
from keras_ce_plugin import export as ex
from keras_ce_plugin.cli.export import predict_command
from keras_ce_plugin.data import CIFAR10_CLASSES

ARTIFACTS = {"keras": "model.keras", "savedmodel": "saved_model", "onnx": "model.onnx"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, cifar_dir) -> dict[str, Path]:
    return make_shared_export(tmp_path_factory.getbasetemp() / "shared_export", cifar_dir)


@pytest.fixture(scope="module")
def images(shared, tmp_path_factory) -> dict[str, Path]:
    """Real test images as files: 3 PNGs (lossless, 32x32), a resized JPEG, .npy batches."""
    d = tmp_path_factory.mktemp("images")
    x = np.load(shared["x_test"])
    pixels = np.round(x * 255).astype(np.uint8)
    out = {}
    for i in range(3):
        out[f"png{i}"] = d / f"img{i}.png"
        Image.fromarray(pixels[i]).save(out[f"png{i}"])
    out["jpeg"] = d / "big.jpg"
    Image.fromarray(pixels[3]).resize((96, 64)).save(out["jpeg"], quality=90)
    out["npy_float"] = d / "batch.npy"
    np.save(out["npy_float"], x[4:9])
    out["npy_uint8"] = d / "batch_u8.npy"
    np.save(out["npy_uint8"], pixels[4:9])
    out["npy_single"] = d / "single.npy"
    np.save(out["npy_single"], x[9])
    return out


def predict_args(artifact, paths, top_k=3) -> argparse.Namespace:
    return argparse.Namespace(artifact=str(artifact), images=[str(p) for p in paths], top_k=top_k)


def parse(stdout: str) -> list[tuple[str, list[tuple[str, float]]]]:
    rows = []
    for line in stdout.strip().splitlines():
        label, _, ranked = line.partition("  ")
        pairs = [item.strip().rsplit(" ", 1) for item in ranked.strip().split(",")]
        rows.append((label.strip(), [(name, float(p)) for name, p in pairs]))
    return rows


@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_predict_matches_the_original_model(kind, shared, images, capsys):
    artifact = shared["export"] / ARTIFACTS[kind]
    ref = np.load(shared["reference"])
    paths = [
        images["png0"],
        images["png1"],
        images["png2"],
        images["npy_float"],
        images["npy_uint8"],
        images["npy_single"],
        images["jpeg"],
    ]
    assert predict_command(predict_args(artifact, paths, top_k=3)) == 0
    rows = parse(capsys.readouterr().out)
    # 3 PNGs, 5 + 5 + 1 from the .npy files, 1 JPEG, in order.
    assert [r[0] for r in rows[:3]] == [str(images[f"png{i}"]) for i in range(3)]
    assert rows[3][0] == f"{images['npy_float']}[0]" and len(rows) == 3 + 5 + 5 + 1 + 1
    expected = [0, 1, 2, 4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 9]
    for (label, ranked), i in zip(rows, expected):
        top = np.argsort(-ref[i])[:3]
        # The uint8 .npy is the rounded pixels: equal to a few 1e-4 for this model.
        tol = 1e-3 if "batch_u8" in label else 1e-4
        assert [name for name, _ in ranked] == [CIFAR10_CLASSES[j] for j in top], label
        np.testing.assert_allclose([p for _, p in ranked], ref[i, top], atol=tol, err_msg=label)
    jpeg_label, jpeg_ranked = rows[-1]
    assert jpeg_label == str(images["jpeg"]) and len(jpeg_ranked) == 3
    probs = [p for _, p in jpeg_ranked]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert all(name in CIFAR10_CLASSES for name, _ in jpeg_ranked)


def test_top_k_is_capped_at_the_number_of_classes(shared, images, capsys):
    artifact = shared["export"] / "model.onnx"
    assert predict_command(predict_args(artifact, [images["png0"]], top_k=50)) == 0
    ((_, ranked),) = parse(capsys.readouterr().out)
    assert sorted(name for name, _ in ranked) == sorted(CIFAR10_CLASSES)
    assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-3)


def test_images_smaller_than_the_input_are_upscaled_with_one_warning_each(tmp_path):
    import warnings

    tiny, thin = tmp_path / "tiny.png", tmp_path / "thin.png"
    Image.new("RGB", (1, 1), (250, 0, 0)).save(tiny)
    Image.new("RGB", (16, 40), (0, 0, 250)).save(thin)
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, labels = ex.load_images([tiny, big, thin])
    assert [str(w.message) for w in caught] == [
        f"{tiny} is 1x1 pixels; upscaled to 32x32.",
        f"{thin} is 16x40 pixels; upscaled to 32x32.",
    ]
    assert x.shape == (3, 32, 32, 3) and labels == [str(tiny), str(big), str(thin)]
    np.testing.assert_allclose(x[0], np.broadcast_to([250 / 255, 0, 0], (32, 32, 3)), atol=1e-6)


def test_predict_cli_end_to_end(shared, images):
    proc = cli(
        "predict",
        shared["export"] / "model.onnx",
        images["png0"],
        images["npy_float"],
        "--top-k",
        "2",
    )
    rows = parse(proc.stdout)
    assert len(rows) == 1 + 5 and all(len(r[1]) == 2 for r in rows)
    ref = np.load(shared["reference"])
    assert rows[0][1][0][0] == CIFAR10_CLASSES[int(ref[0].argmax())]


# --------------------------------------------------------------------------- #
# Bad inputs
# --------------------------------------------------------------------------- #
def _bad_input(kind: str, d: Path, png: Path) -> tuple[Path, str]:
    """Writes a bad input of kind ``kind``; returns its path and the expected message."""
    path = d / {"text-as-png": "a.png", "truncated-png": "t.png", "gif": "a.gif"}.get(
        kind, f"{kind}.npy"
    )
    if kind == "missing":
        return d / "nope.png", "Image file not found"
    if kind == "directory":
        return d, "is a directory"
    if kind == "text-as-png":
        path.write_text("this is not an image")
        return path, "is not an image"
    if kind == "truncated-png":
        path.write_bytes(png.read_bytes()[:60])
        return path, "could not be read as an image"
    if kind == "gif":
        Image.open(png).save(path)
        return path, "is a GIF image"
    arrays = {
        "wrong-shape": (np.zeros((2, 28, 28, 3), np.float32), "shape (N, 32, 32, 3)"),
        "channels-first": (np.zeros((2, 3, 32, 32), np.float32), "Received: shape (2, 3, 32, 32)"),
        "empty": (np.zeros((0, 32, 32, 3), np.float32), "Received: shape (0, 32, 32, 3)"),
        "int64": (np.zeros((1, 32, 32, 3), np.int64), "Received: dtype int64"),
        "bool": (np.zeros((1, 32, 32, 3), bool), "Received: dtype bool"),
        "unscaled-float": (np.full((1, 32, 32, 3), 200.0, np.float32), "values in [200, 200]"),
        "nan": (np.full((1, 32, 32, 3), np.nan, np.float32), "NaN or infinite"),
    }
    if kind in arrays:
        array, message = arrays[kind]
        np.save(path, array)
        return path, message
    if kind == "object-npy":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return path, "holds Python objects"
    if kind == "not-npy":
        path.write_bytes(pickle.dumps([1, 2, 3]))
        return path, "not a valid .npy file"
    raise AssertionError(kind)


BAD_INPUTS = [
    "missing",
    "directory",
    "text-as-png",
    "truncated-png",
    "gif",
    "wrong-shape",
    "channels-first",
    "empty",
    "int64",
    "bool",
    "unscaled-float",
    "nan",
    "object-npy",
    "not-npy",
]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_predict_rejects_bad_images(kind, shared, images, tmp_path):
    path, message = _bad_input(kind, tmp_path, images["png0"])
    with pytest.raises(KerasCEError) as info:
        predict_command(predict_args(shared["export"] / "model.onnx", [images["png0"], path]))
    text = " ".join(str(info.value).split())
    assert message in text and (str(path) in text or kind == "missing"), text


@pytest.fixture(scope="module")
def other_shape_onnx(tmp_path_factory) -> Path:
    """A real ONNX model exported from a 28x28x3 Keras model."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    return ex.export_onnx(model, tmp_path_factory.mktemp("other") / "m28.onnx")


def _bad_artifact(kind: str, d: Path, shared: dict, other_shape_onnx: Path) -> tuple[Path, str]:
    if kind == "missing":
        return d / "nope.onnx", "Artifact not found"
    if kind == "export-dir":
        return shared["export"], "is an export directory"
    if kind == "plain-dir":
        return d, "without saved_model.pb"
    if kind == "unknown-suffix":
        (d / "m.h5").write_bytes(b"x")
        return d / "m.h5", "must be a .keras file, a SavedModel directory or an .onnx file"
    if kind == "garbage-onnx":
        (d / "m.onnx").write_bytes(os.urandom(300))
        return d / "m.onnx", "Could not load the ONNX model"
    if kind == "truncated-keras":
        data = (shared["export"] / "model.keras").read_bytes()
        (d / "m.keras").write_bytes(data[: len(data) // 2])
        return d / "m.keras", "Could not load the Keras model"
    if kind == "other-input-shape":
        return other_shape_onnx, "takes inputs of shape (batch, 28, 28, 3)"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "export-dir",
        "plain-dir",
        "unknown-suffix",
        "garbage-onnx",
        "truncated-keras",
        "other-input-shape",
    ],
)
def test_predict_rejects_bad_artifacts(kind, shared, images, tmp_path, other_shape_onnx):
    artifact, message = _bad_artifact(kind, tmp_path, shared, other_shape_onnx)
    with pytest.raises(KerasCEError) as info:
        predict_command(predict_args(artifact, [images["png0"]]))
    text = " ".join(str(info.value).split())
    assert message in text and str(artifact) in text, text


def test_predict_cli_error_has_no_traceback(shared, tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_text("not an image")
    proc = subprocess.run(
        [sys.executable, "-m", "keras_ce_plugin.cli", "predict"]
        + [str(shared["export"] / "model.onnx"), str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    stderr = " ".join(proc.stderr.split())
    assert "keras-ce: error:" in stderr and "photo.png is not an image" in stderr

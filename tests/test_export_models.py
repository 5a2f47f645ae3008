"""Export, verify and predict on models that are not image classifiers (issue 19).

A user's models saved with ``model.save``: a Dense model on ``(features,)`` floats
behind a ``Normalization`` and a trained ``BatchNormalization`` (model state that
must be constants of the exported graphs), a token-id model (``int32`` ids into an
``Embedding``), a model with dict inputs and outputs, and a model with a user's layer
that ONNX export cannot express. Each goes through the ``keras-ce`` commands in fresh
processes; the expected names come from how the test builds the models.
A ``LinearCEModel`` (tied and untied head) is exported with the library and served
by the worker scripts in fresh processes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from test_export import cli

from keras_ce_plugin.export import export_onnx, export_savedmodel, generate_inputs

VOCAB, SEQ = 50, 12
#: A user's layer on an op (Erfinv) that tf2onnx has no conversion for.
ACME_LAYERS = """\
import keras


@keras.saving.register_keras_serializable(package="acme_layers")
class Probit(keras.layers.Layer):
    def call(self, x):
        return keras.ops.erfinv(keras.ops.tanh(x))
"""
#: name -> (inputs, outputs) the model was built with, in signature order.
EXPECTED = {
    "features": (["features"], ["scores"]),
    "tokens": (["token_ids"], ["logits"]),
    "dict": (["a", "b"], ["y", "z"]),
}


def _save_models(d) -> None:
    import keras

    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    x = rng.normal(3.0, 2.0, (64, 8)).astype("float32")
    inp = keras.Input((8,), name="features")
    h = keras.layers.Normalization(mean=x.mean(0), variance=x.var(0))(inp)
    h = keras.layers.BatchNormalization()(keras.layers.Dense(16, activation="relu")(h))
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="scores")(h))
    model.compile("adam", "customloss>CategoricalCE")
    model.fit(x, np.eye(3)[rng.integers(0, 3, 64)], epochs=2, verbose=0)  # BN moving stats
    model.save(d / "features.keras")

    ids = keras.Input((SEQ,), dtype="int32", name="token_ids")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCAB, 8)(ids))
    keras.Model(ids, keras.layers.Dense(4, name="logits")(h)).save(d / "tokens.keras")

    a = keras.Input((4,), name="a")
    b = keras.Input((2,), dtype="int32", name="b")
    e = keras.layers.Flatten()(keras.layers.Embedding(7, 3)(b))
    y = keras.layers.Dense(1)(a)
    z = keras.layers.Dense(2)(keras.layers.Concatenate()([a, e]))
    keras.Model({"b": b, "a": a}, {"z": z, "y": y}).save(d / "dict.keras")

    spec = importlib.util.spec_from_file_location("acme_layers", d / "acme_layers.py")
    module = importlib.util.module_from_spec(spec)
    (d / "acme_layers.py").write_text(ACME_LAYERS)
    spec.loader.exec_module(module)
    m = keras.Sequential([keras.Input((8,), name="x"), module.Probit(), keras.layers.Dense(3)])
    m.save(d / "probit.keras")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    _save_models(d)
    return d


@pytest.mark.parametrize(
    "name",
    # The token model (one input, as the composition matrix's language models) in the
    # slow tier, to keep README command 2 within its time.
    [pytest.param(n, marks=pytest.mark.slow) if n == "tokens" else n for n in sorted(EXPECTED)],
)
def test_export_keeps_the_models_own_signature_and_verify_passes(models, name):
    import onnx

    out = models / f"export_{name}"
    proc = cli("export", models / f"{name}.keras", "--out", out, "--quantize", "int8")
    manifest = json.loads((out / "manifest.json").read_text())
    inputs, outputs = EXPECTED[name]
    assert manifest["kind"] == "generic"
    assert [s["name"] for s in manifest["inputs"]] == inputs
    assert [s["name"] for s in manifest["outputs"]] == outputs
    assert manifest["formats"] == ["keras", "savedmodel", "onnx"]
    # Model state (Normalization's mean/variance, BatchNormalization's moving
    # statistics) is a constant of the graph: the ONNX inputs are the model's only.
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [i.name for i in graph.input] == inputs
    assert [o.name for o in graph.output] == outputs
    # --quantize int8 calibrates on CIFAR-10 images: skipped here, in one line.
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("int8")]
    assert "skipped" in line and "32x32 CIFAR-10 images" in line, proc.stdout
    assert manifest["skipped"] == {"onnx_int8": line.split("skipped: ", 1)[1]}

    text = cli("verify", out).stdout
    assert "generated inputs (seed 0)" in text and "OK: every artifact matches" in text, text


def test_a_format_that_cannot_express_the_model_is_skipped_in_one_line(models):
    out, layers = models / "export_probit", models / "acme_layers.py"
    proc = cli("export", models / "probit.keras", "--out", out, "--import", layers)
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.split()[:2] == ["onnx", "skipped:"]]
    assert "ONNX cannot express the model" in line and "Erfinv" in line, proc.stdout
    assert "skipped: onnx" in proc.stdout.splitlines()[-1]
    assert "Erfinv" not in proc.stderr  # said once, in the line above
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["formats"] == ["keras", "savedmodel"]
    assert list(manifest["skipped"]) == ["onnx"] and "Erfinv" in manifest["skipped"]["onnx"]
    assert not (out / "model.onnx").exists()
    text = cli("verify", out, "--import", layers).stdout
    assert "onnx        skipped at export" in text and "OK: every artifact" in text, text


@pytest.mark.parametrize("artifact", ["model.keras", "saved_model", "model.onnx"])
def test_predict_refuses_a_model_that_is_not_an_image_classifier(models, artifact):
    out = models / "export_tokens"
    if not (out / "manifest.json").is_file():
        cli("export", models / "tokens.keras", "--out", out)
    image = models / "x.npy"
    np.save(image, np.zeros((1, 32, 32, 3), np.uint8))
    proc = cli("predict", out / artifact, image, expect=2)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("keras-ce:")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert "is not an image classifier" in lines[0] and "token_ids" in lines[0]
    assert "`keras-ce export" in lines[0] and "`model.predict`" in lines[0]


def test_generated_inputs_are_seeded_and_token_ids_stay_below_the_vocabulary():
    sig = {
        "kind": "generic",
        "inputs": [
            {"name": "token_ids", "shape": [None, SEQ], "dtype": "int32", "range": [0, VOCAB]},
            {"name": "x", "shape": [None, None, 3], "dtype": "float32"},
        ],
    }
    first, again = generate_inputs(sig, 500, seed=3), generate_inputs(sig, 500, seed=3)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    ids = first["token_ids"]
    assert ids.dtype == np.int32 and ids.shape == (500, SEQ)
    assert ids.min() == 0 and ids.max() == VOCAB - 1  # the whole valid range, nothing more
    assert first["x"].shape == (500, 8, 3) and first["x"].dtype == np.float32


def _tiny_lm(head_kind: str):
    import keras

    from keras_ce_plugin.large_vocab import LinearCEModel

    keras.utils.set_random_seed(7)
    tokens = keras.Input((SEQ,), dtype="int32", name="token_ids")
    emb = keras.layers.ReversibleEmbedding(
        VOCAB, 16, tie_weights=head_kind == "tied", name="token_embedding"
    )
    x = keras.layers.Dense(16, activation="tanh", name="mix")(emb(tokens))
    backbone = keras.Model(tokens, x, name="backbone")
    model = LinearCEModel(backbone, head=emb)
    model(np.zeros((1, SEQ), np.int32))
    return model


@pytest.mark.parametrize("head_kind", ["tied", "untied"])
def test_linear_ce_model_exports_with_its_signature(tmp_path, head_kind):
    model = _tiny_lm(head_kind)
    export_savedmodel(model, tmp_path / "saved_model")
    export_onnx(model, tmp_path / "model.onnx")
    spec = {"name": "token_ids", "shape": [None, SEQ], "dtype": "int32", "range": [0, VOCAB]}
    feeds = generate_inputs({"inputs": [spec]}, 16)
    reference = np.asarray(model.predict(feeds["token_ids"], verbose=0))
    np.savez(tmp_path / "in.npz", **feeds)
    for script, artifact in [
        ("_serve_savedmodel.py", tmp_path / "saved_model"),
        ("_serve_onnx.py", tmp_path / "model.onnx"),
    ]:
        out = tmp_path / f"{script}.npz"
        subprocess.run(
            [sys.executable, str(REPO / "keras_ce_plugin" / "export" / script), str(artifact)]
            + [str(tmp_path / "in.npz"), str(out), str(tmp_path / "report.json")],
            check=True,
            capture_output=True,
            timeout=300,
        )
        with np.load(out) as served:
            assert list(served.files) == ["output"]
            # float32 logits through other kernels: rounding only (|logit| < 10).
            np.testing.assert_allclose(served["output"], reference, atol=1e-5, rtol=0)

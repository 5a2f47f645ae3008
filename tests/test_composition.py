"""Every model the project makes × every command that takes a model.

Each producer is made once (module scope) as a user makes it: ``keras-ce train`` on a
small slice of the CIFAR-10 sample, or a user's script that calls ``model.save``. Each
cell runs its consumer in a fresh subprocess on the producer's real files and either
works (exit 0) or refuses in one line by design (exit 2, one ``keras-ce: error:`` line
that says why). The README's "Every model through every command" table is this
matrix: a test parses it and holds it to :data:`MATRIX`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

# The README's names of the producers (table rows) and consumers (table columns).
PRODUCERS = {
    "main": "the main job (`train --weights none`)",
    "weights_path": "`train --weights PATH`",
    "train_user_loss": "`train --loss acme>Focal --import acme.py`",
    "user_model": "a user's model (other inputs), `acme>Focal`, `model.save`",
    "lm_tied": "`LinearCEModel`, tied head, `LinearCE`",
    "lm_untied": "`LinearCEModel`, untied head, `LinearCE`",
    "builtin": "a Keras model, built-in `categorical_crossentropy`",
}
CONSUMERS = {
    "load_model": "`load_model` (fresh process, `safe_mode=True`)",
    "loader": "the plugin's loader",
    "export": "`export` (SavedModel + ONNX)",
    "verify": "`verify`",
    "predict": "`predict` (a PNG)",
    "check_loss": "`check-loss` (the model's loss)",
    "resume": "`train --resume`",
}
# Why a cell refuses (README text) and what its one error line says.
REFUSALS = {
    "finished": ("a finished run keeps no checkpoint", "There is no checkpoint to resume from"),
    "not_a_run": ("not a `keras-ce train` run", "There is no checkpoint to resume from"),
    "not_an_image_model": ("not an image classifier: use `model.predict`", "model.predict"),
    "builtin_identifier": (
        "a Keras identifier: `check-loss` takes `P>N` or `module:Attr`",
        "categorical_crossentropy",
    ),
}
W = "works"
_TRAINED = {
    "load_model": W,
    "loader": W,
    "export": W,
    "verify": W,
    "predict": W,
    "check_loss": W,
    "resume": "finished",
}
_SAVED = {**_TRAINED, "resume": "not_a_run"}
_NOT_IMAGES = {**_SAVED, "predict": "not_an_image_model"}
MATRIX: dict[str, dict[str, str]] = {
    "main": _TRAINED,
    "weights_path": _TRAINED,
    "train_user_loss": _TRAINED,
    "user_model": _NOT_IMAGES,
    "lm_tied": _NOT_IMAGES,
    "lm_untied": _NOT_IMAGES,
    "builtin": {**_SAVED, "check_loss": "builtin_identifier"},
}

ACME = '''
"""A user's loss module: focal cross-entropy, registered as acme>Focal."""
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="acme", name="Focal")
class Focal(keras.losses.Loss):
    def __init__(self, gamma=2.0, reduction="sum_over_batch_size", name="focal", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.gamma = gamma
        self._dtype_arg = dtype

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.cast(y_true, y_pred.dtype)
        eps = keras.config.epsilon()
        p = ops.clip(y_pred / ops.maximum(ops.sum(y_pred, -1, keepdims=True), eps), eps, 1 - eps)
        return -ops.sum(y_true * ops.power(1.0 - p, self.gamma) * ops.log(p), axis=-1)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "dtype": self._dtype_arg}
'''

# The user scripts: models saved by model.save, and a VGG16 base weights file.
MAKE_SAVED = """
import os
import sys
import numpy as np
import keras
import keras_ce_plugin
from keras_ce_plugin import LinearCE, LinearCEModel
from keras_ce_plugin.data import load_cifar10
from keras_ce_plugin.models import build_vgg16_classifier, split_base_and_head

work, cifar = sys.argv[1], sys.argv[2]
for name in ("user_model", "lm_tied", "lm_untied", "builtin"):
    os.makedirs(f"{work}/{name}")
sys.path.insert(0, work)
import acme  # noqa: E402

rng = np.random.default_rng(0)
keras.utils.set_random_seed(0)
base, _ = split_base_and_head(build_vgg16_classifier(None, seed=0))
base.save_weights(f"{work}/vgg16.weights.h5")

(x, y), (xt, yt) = load_cifar10(cifar, limit_train=32, limit_test=1)
from PIL import Image  # noqa: E402
Image.fromarray((xt[0] * 255).round().astype("uint8")).save(f"{work}/test_image.png")

tab = keras.Sequential(
    [keras.Input((8,), name="features"), keras.layers.Dense(16, activation="relu"),
     keras.layers.Dense(3, activation="softmax")]
)
tab.compile("adam", loss="acme>Focal")
tab.fit(rng.normal(size=(32, 8)).astype("float32"),
        np.eye(3, dtype="float32")[rng.integers(0, 3, 32)], epochs=1, verbose=0)
tab.save(f"{work}/user_model/model.keras")

for kind in ("tied", "untied"):
    tokens = keras.Input((12,), dtype="int32")
    emb = keras.layers.ReversibleEmbedding(97, 16, tie_weights=kind == "tied",
                                           name="token_embedding")
    h = keras.layers.Dense(16, activation="tanh")(emb(tokens))
    lm = LinearCEModel(keras.Model(tokens, h, name="backbone"), head=emb)
    lm.compile("adam", loss=LinearCE())
    ids = rng.integers(0, 97, (8, 12)).astype("int32")
    lm.fit(ids, np.roll(ids, -1, 1), epochs=1, verbose=0)
    lm.save(f"{work}/lm_{kind}/model.keras")

plain = keras.Sequential(
    [keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")]
)
plain.compile("adam", loss="categorical_crossentropy", metrics=["accuracy"])
plain.fit(x, y, epochs=1, verbose=0)
plain.save(f"{work}/builtin/model.keras")
"""

# The load_model / loader consumers: load, then predict on zeros of the model's input.
LOAD = """
import sys
import numpy as np
import keras
import keras_ce_plugin
if sys.argv[2]:  # the user's module, imported as its user would
    sys.path.insert(0, sys.argv[2])
    import acme  # noqa: E402, F401
if sys.argv[3] == "loader":
    from keras_ce_plugin.files import load_keras_model
    model = load_keras_model(sys.argv[1], safe_mode=True)
else:
    model = keras.models.load_model(sys.argv[1], safe_mode=True)
try:
    spec = model.inputs[0]
except AttributeError:  # a subclassed model (LinearCEModel): its backbone's input
    spec = model.backbone.inputs[0]
shape = tuple(2 if d is None else d for d in spec.shape)
out = model.predict(np.zeros(shape, spec.dtype), verbose=0)
assert np.all(np.isfinite(out)), out
print("loaded", type(model).__name__, out.shape)
"""

TRAIN_FLAGS = ["--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--quiet"]


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _keras_ce(*args: str) -> list[str]:
    return ["-m", "keras_ce_plugin.cli", *args]


def _ok(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


class Workshop:
    """The producers' files, made once; consumers' identical commands run once."""

    def __init__(self, root: Path, cifar: Path) -> None:
        self.root, self.cifar = root, cifar
        self.acme = root / "acme.py"
        self.acme.write_text(textwrap.dedent(ACME))
        self._made: set[str] = set()
        self._failed: dict[str, str] = {}
        self._runs: dict[tuple[str, ...], subprocess.CompletedProcess] = {}
        self.seconds: dict[str, float] = {}

    def model(self, producer: str) -> Path:
        if producer in self._failed:
            pytest.fail(self._failed[producer])
        if producer not in self._made:
            start = time.perf_counter()
            try:
                self._make(producer)
            except AssertionError as exc:  # made once: a failed producer fails its cells
                self._failed[producer] = str(exc)
                raise
            self.seconds[f"make {producer}"] = time.perf_counter() - start
            self._made.add(producer)
        return self.root / producer / "model.keras"

    def _make(self, producer: str) -> None:
        out = str(self.root / producer)
        data = ["--data-dir", str(self.cifar)]
        if producer == "main":
            args = ["--weights", "none"]
        elif producer == "weights_path":
            self.model("builtin")  # the user script writes the weights file too
            args = ["--weights", str(self.root / "vgg16.weights.h5")]
        elif producer == "train_user_loss":
            args = ["--weights", "none", "--loss", "acme>Focal", "--import", str(self.acme)]
        else:
            _ok(_run(["-c", MAKE_SAVED, str(self.root), str(self.cifar)]), "the user script")
            self._made.update(("user_model", "lm_tied", "lm_untied", "builtin"))
            return
        _ok(_run(_keras_ce("train", *data, *args, *TRAIN_FLAGS, "--out", out)), producer)

    def imports(self, producer: str) -> list[str]:
        return ["--import", str(self.acme)] if "user" in producer else []

    def loss(self, producer: str) -> str:
        return {
            "main": "customloss>CategoricalCE",
            "weights_path": "customloss>CategoricalCE",
            "train_user_loss": "acme>Focal",
            "user_model": "acme>Focal",
            "lm_tied": "customloss>LinearCE",
            "lm_untied": "customloss>LinearCE",
            "builtin": "categorical_crossentropy",
        }[producer]

    def command(self, producer: str, consumer: str) -> list[str]:
        model = str(self.model(producer))
        export_dir = str(self.root / "exports" / producer)
        imports = self.imports(producer)
        if consumer in ("load_model", "loader"):
            acme_dir = str(self.root) if imports else ""
            return ["-c", LOAD, model, acme_dir, consumer]
        if consumer == "export":
            return _keras_ce("export", model, "--out", export_dir, "--overwrite", *imports)
        if consumer == "verify":
            data = ["--data-dir", str(self.cifar), "--limit-test", "8"]
            if producer in ("main", "train_user_loss"):
                # The offline models' standardisation magnifies float32 rounding: the
                # README verifies them with --atol 1e-4 (see its Export section).
                data += ["--atol", "1e-4"]
            return _keras_ce("verify", export_dir, *data, *imports)
        if consumer == "predict":
            self.model("builtin")  # the user script writes the test image too
            return _keras_ce("predict", model, str(self.root / "test_image.png"), *imports)
        if consumer == "check_loss":
            # As a user runs it: no --targets (LinearCE's integer labels are known).
            return _keras_ce("check-loss", self.loss(producer), *imports)
        if consumer == "resume":
            return _keras_ce("train", "--resume", str(self.root / producer))
        raise AssertionError(consumer)

    def run(self, producer: str, consumer: str) -> subprocess.CompletedProcess:
        if consumer == "verify":
            self.run(producer, "export")  # verify reads what export wrote
        cmd = tuple(self.command(producer, consumer))
        if cmd not in self._runs:
            start = time.perf_counter()
            self._runs[cmd] = _run(list(cmd))
            self.seconds[f"{producer} x {consumer}"] = time.perf_counter() - start
        return self._runs[cmd]


@pytest.fixture(scope="module")
def workshop(tmp_path_factory, cifar_dir):
    shop = Workshop(tmp_path_factory.mktemp("composition"), cifar_dir)
    yield shop
    if os.environ.get("KERAS_CE_MATRIX_TIMES"):  # a cost report, for the README/CHANGELOG
        for key, seconds in shop.seconds.items():
            print(f"{seconds:7.1f} s  {key}", file=sys.__stderr__)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("keras-ce: error:")]


@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_cell(workshop, producer, consumer):
    expected = MATRIX[producer][consumer]
    proc = workshop.run(producer, consumer)
    output = f"{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in output, output
    if expected == W:
        assert proc.returncode == 0, output
        assert not _error_lines(output), output
        if consumer == "export":
            assert re.search(r"^\s*savedmodel\s", proc.stdout, re.M), output
            assert re.search(r"^\s*onnx\s", proc.stdout, re.M), output
        if consumer == "predict":
            # The image's top classes, each with its probability.
            assert re.search(r"test_image\.png\s+\S+ [01]\.\d{4}", proc.stdout), output
        return
    _, says = REFUSALS[expected]
    assert proc.returncode == 2, output
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr
    assert says in errors[0], errors[0]


# --------------------------------------------------------------------------- #
# The README's table is this matrix
# --------------------------------------------------------------------------- #
README_HEADING = "## Every model through every command"


def _readme_table() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split(README_HEADING, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows


def _readme_cell(outcome: str) -> str:
    return W if outcome == W else f"refuses: {REFUSALS[outcome][0]}"


def test_readme_table_is_the_matrix():
    header, rule, *body = _readme_table()
    assert header == ["model", *CONSUMERS.values()]
    assert set(rule) == {"---"}
    assert [row[0] for row in body] == list(PRODUCERS.values())
    for producer, row in zip(PRODUCERS, body):
        expected = [_readme_cell(MATRIX[producer][c]) for c in CONSUMERS]
        assert row[1:] == expected, (producer, row)

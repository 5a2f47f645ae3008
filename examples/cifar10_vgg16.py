"""The tutorial, on keras_ce_plugin: a frozen VGG16 + dense head on CIFAR-10, custom loss by name.

The tutorial defines ``-sum(y_true * log(y_pred))`` in a script, builds VGG16 (ImageNet
weights, no top, frozen) with Flatten -> Dense(4096, relu) -> Dropout(0.5) ->
Dense(4096, relu) -> Dropout(0.5) -> Dense(10, softmax), compiles it with Adam and that
loss, and fits 10 epochs with batch 32 on pixels / 255 and one-hot labels. Here the
loss is ``"customloss>CategoricalCE"`` (a string, so the saved model reloads without
``custom_objects``) and ``train`` fits the same model with the VGG16 features computed
once (the same history as the tutorial's ``model.fit``, in less time).

Offline, with the CIFAR-10 sample beside the repository and random VGG16 weights
(He-initialised, with a fixed standardisation of the base's features before the head
and Adam's learning rate at 1e-4, so that the head learns something)::

    python examples/cifar10_vgg16.py --data-dir ../shared/data/cifar10-sample/cifar-10-batches-py \\
        --weights none

With internet, ``python examples/cifar10_vgg16.py`` downloads CIFAR-10 and the
ImageNet weights through Keras, as the tutorial does.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import keras
import numpy as np

import keras_ce_plugin  # noqa: F401  registers "customloss>CategoricalCE" for compile/load
from keras_ce_plugin.data import load_cifar10, load_class_names
from keras_ce_plugin.training import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="cifar-10-batches-py directory (default: download)")
    p.add_argument("--weights", default="imagenet", help="imagenet, none, or a .h5 path")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--limit-train", type=int, help="use the first N training images")
    p.add_argument("--limit-test", type=int, help="use the first N test images")
    p.add_argument("--save", help="where to save the model (default: a temporary directory)")
    args = p.parse_args()

    # 1. Data: float32 images / 255 and one-hot labels, as the tutorial prepares them.
    (x_train, y_train), (x_test, y_test) = load_cifar10(
        args.data_dir, limit_train=args.limit_train, limit_test=args.limit_test
    )
    print(f"{len(x_train)} training and {len(x_test)} test images")

    # 2. Model and training: the tutorial's VGG16 + head, compiled with
    #    optimizer=Adam(1e-3), loss="customloss>CategoricalCE", metrics=["accuracy"],
    #    fit(epochs, batch_size=32, validation_data=(x_test, y_test)). With random
    #    weights, a standardisation layer sits between base and head, and Adam's
    #    learning rate defaults to 1e-4 (TrainConfig.learning_rate=None).
    config = TrainConfig(
        weights=args.weights,  # "none" (any case) means random weights
        loss="customloss>CategoricalCE",
        epochs=args.epochs,
        batch_size=32,
    )
    result = train(config, ((x_train, y_train), (x_test, y_test)))
    print(f"base: {result.base['weights']}; {result.base['expectation']}")
    for epoch, (loss, acc) in enumerate(zip(result.history["loss"], result.history["accuracy"])):
        print(f"epoch {epoch + 1}: loss {loss:.4f}, accuracy {acc:.4f}")
    print(f"test loss {result.test_loss:.4f}, test accuracy {result.test_accuracy:.4f}")

    # 3. Save, and reload the way any other process would: import the plugin, load.
    path = Path(args.save or Path(tempfile.mkdtemp()) / "cifar10_vgg16.keras")
    result.model.save(path)
    model = keras.models.load_model(path)  # no custom_objects needed
    names = load_class_names(args.data_dir)
    probs = model.predict(x_test[:5], verbose=0)
    for truth, p_row in zip(y_test[:5].argmax(axis=1), probs):
        guess = int(np.argmax(p_row))
        print(f"true {names[truth]:>10}  predicted {names[guess]:>10} ({p_row[guess]:.2f})")
    print(f"saved {path}")


if __name__ == "__main__":
    main()

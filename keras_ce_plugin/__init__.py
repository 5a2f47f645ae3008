"""keras_ce_plugin: production cross-entropy losses for Keras 3.

Importing the package registers the losses under the ``customloss`` package and
enables ``model.compile(loss="customloss>CategoricalCE")`` (see
:mod:`keras_ce_plugin.naming`).

>>> import keras_ce_plugin
>>> keras_ce_plugin.get("customloss>BinaryCE").name
'binary_ce'
"""

from keras_ce_plugin._version import __version__
from keras_ce_plugin.errors import KerasCEError  # noqa: E402
from keras_ce_plugin.large_vocab import (  # noqa: E402
    LinearCE,
    LinearCEModel,
    TokenAccuracy,
    linear_ce,
    linear_token_accuracy,
)
from keras_ce_plugin.losses import (  # noqa: E402
    BinaryCE,
    CategoricalCE,
    SparseCategoricalCE,
    binary_ce,
    categorical_ce,
    sparse_categorical_ce,
)
from keras_ce_plugin.naming import LOSS_NAMES, KerasCompatibilityError, get  # noqa: E402
from keras_ce_plugin.naming import install as _install_names  # noqa: E402

_install_names()

__all__ = [
    "LOSS_NAMES",
    "BinaryCE",
    "CategoricalCE",
    "KerasCEError",
    "KerasCompatibilityError",
    "LinearCE",
    "LinearCEModel",
    "SparseCategoricalCE",
    "TokenAccuracy",
    "__version__",
    "binary_ce",
    "categorical_ce",
    "get",
    "linear_ce",
    "linear_token_accuracy",
    "sparse_categorical_ce",
]

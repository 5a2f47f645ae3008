"""Registered names in compile: ``compile(loss="customloss>CategoricalCE")``, ``"P>N"``.

Keras 3 resolves a string loss or metric identifier only against its built-in
table (``keras.losses.get``; keras-team/keras#20112), so a registered name such
as ``"customloss>CategoricalCE"`` -- or a user's own loss registered with
``keras.saving.register_keras_serializable(package="P", name="N")`` as
``"P>N"`` -- fails with "Could not interpret loss identifier". This is the
plugin's single compatibility module:

* :func:`get` is public and patches nothing: it resolves every registered
  ``"P>N"`` loss name and defers everything else to ``keras.losses.get``.
* :func:`install` (run on ``import keras_ce_plugin``) wraps ``get`` in
  ``keras.src.losses`` and ``keras.src.metrics`` -- the functions Keras' compile
  machinery (``keras.src.trainers.compile_utils``) calls at first use -- plus the
  public ``keras.losses.get``/``keras.metrics.get`` aliases. Only identifiers
  with a ``>`` (registered names) are intercepted; every other identifier goes
  to the original function unchanged. It also wraps
  ``Trainer.compile_from_config``: a saved compile config keeps the string name,
  which Keras' deserializer would turn into the bare loss *class* (usable for
  training, but the reloaded model could not be saved again); the wrapper keeps
  such names as strings, so the reloaded model is compiled exactly as the saved
  one was, and refuses a name that nothing registers at load time (rather than at
  the first ``fit``). It is idempotent, does nothing on a Keras that already
  resolves registered names, and raises :class:`KerasCompatibilityError` if the
  internals it relies on are not where it expects them. Set
  ``KERAS_CE_NO_PATCH=1`` to skip it (then pass loss instances or use :func:`get`).

>>> get("customloss>CategoricalCE").name
'categorical_ce'
>>> get("categorical_crossentropy").__name__
'categorical_crossentropy'
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras

from keras_ce_plugin import losses as _losses

PACKAGE = _losses.PACKAGE
PREFIX = PACKAGE + ">"


class _Registered(Mapping[str, Any]):
    """A live, read-only view of Keras' registry under one package.

    Keras' registry (``keras.saving.register_keras_serializable``) is the only name
    registry; this view is derived from it on every access, so it can never fall
    behind what the imported modules register.
    """

    def __init__(self, package: str) -> None:
        self._package = package

    def _names(self) -> dict[str, Any]:
        return registered_names(self._package)

    def __getitem__(self, name: str) -> Any:
        return self._names()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"LOSS_NAMES({sorted(self._names())})"


#: Every name this plugin registers (a file-format contract: never rename), read
#: from Keras' registry: the losses, and the ``large_vocab`` classes once imported
#: (``import keras_ce_plugin`` imports them).
LOSS_NAMES: Mapping[str, Any] = _Registered(PACKAGE)

_MARK = "_keras_ce_plugin_original"
# (module path, attribute) pairs patched by install().
_TARGETS = (
    ("keras.src.losses", "get", "loss"),
    ("keras.src.metrics", "get", "metric"),
    ("keras.losses", "get", "loss"),
    ("keras.metrics", "get", "metric"),
)


class KerasCompatibilityError(ImportError):
    """The Keras internals that string-name resolution relies on have changed."""


class UnknownLossError(ValueError):
    """A ``"P>N"`` identifier that no imported module registers as a loss."""


def is_registered_name(identifier: Any) -> bool:
    """Whether ``identifier`` has the ``"package>Name"`` form of a registered name."""
    return isinstance(identifier, str) and ">" in identifier


def _is_loss(obj: Any) -> bool:
    if inspect.isclass(obj):
        return issubclass(obj, keras.losses.Loss)
    return callable(obj)


def registered_names(package: str | None = None) -> dict[str, Any]:
    """Which names are registered: every ``"P>N"`` in Keras' registry, sorted.

    The one answer to that question (``LOSS_NAMES``, the loader and the error
    messages all ask here): what the imported modules registered with
    ``keras.saving.register_keras_serializable``, optionally only package ``P``.

    >>> sorted(registered_names("customloss"))[:2]
    ['customloss>BinaryCE', 'customloss>CategoricalCE']
    """
    found = {
        name: obj
        for name, obj in keras.saving.get_custom_objects().items()
        if is_registered_name(name) and (package is None or name.split(">", 1)[0] == package)
    }
    return dict(sorted(found.items()))


def registered_losses(package: str | None = None) -> list[str]:
    """The registered ``"P>N"`` names of loss classes and functions, sorted.

    >>> registered_losses("customloss")[:2]
    ['customloss>BinaryCE', 'customloss>CategoricalCE']
    """
    return [name for name, obj in registered_names(package).items() if _is_loss(obj)]


def unknown_loss_error(identifier: str, hint: str = "") -> UnknownLossError:
    """The error for an unknown ``"P>N"``: it lists what package ``P`` registers."""
    package = identifier.split(">", 1)[0]
    in_package = registered_losses(package)
    if in_package:
        known = f"The `{package}` package registers: {', '.join(in_package)}."
    else:
        everything = registered_losses()
        known = (
            f"No imported module registers a loss in the `{package}` package; the "
            f"registered losses are: {', '.join(everything) or 'none'}."
        )
    if not hint and package != _losses.PACKAGE:
        hint = (
            f" Import the module that registers it (@keras.saving.register_keras_serializable("
            f'package="{package}")) before using the name.'
        )
    return UnknownLossError(f"Unknown loss identifier: {identifier!r}. {known}{hint}")


def _lookup(identifier: str) -> Any:
    obj = keras.saving.get_registered_object(identifier)
    is_metric = inspect.isclass(obj) and issubclass(obj, keras.metrics.Metric)
    if obj is None or not (_is_loss(obj) or is_metric):
        raise unknown_loss_error(identifier)
    return obj


def _loss_as_metric(obj: Any) -> Any:
    """A per-sample mean over all samples, named after the loss."""
    if not inspect.isclass(obj):
        return keras.metrics.MeanMetricWrapper(fn=obj, name=obj.__name__)
    # A loss class (Keras is untyped: its instances are Any, not `object`).
    loss_cls: Callable[..., Any] = obj
    try:
        inst = loss_cls(reduction=None)
    except TypeError:  # A user loss whose __init__ takes no `reduction`.
        inst = loss_cls()
        return keras.metrics.MeanMetricWrapper(fn=inst.call, name=inst.name)
    return keras.metrics.MeanMetricWrapper(fn=inst, name=inst.name)


def _resolve(identifier: str, kind: str) -> Any:
    obj = _lookup(identifier)
    if inspect.isclass(obj) and issubclass(obj, keras.metrics.Metric):
        if kind == "metric":
            return obj()
        raise unknown_loss_error(identifier, f" ({identifier!r} is a metric, not a loss.)")
    if kind == "metric":
        return _loss_as_metric(obj)
    return obj() if inspect.isclass(obj) else obj


def get(identifier: Any) -> Any:
    """Resolves a loss identifier, including every registered ``"P>N"`` name.

    Works without patching Keras: a registered ``"P>N"`` string gives a new loss
    instance (for class names) or the function; anything else is passed to
    ``keras.losses.get``.

    >>> get("customloss>Nope")
    Traceback (most recent call last):
    ...
    keras_ce_plugin.naming.UnknownLossError: Unknown loss identifier: 'customloss>Nope'. The `customloss` package registers: ...
    """
    if is_registered_name(identifier):
        return _resolve(identifier, "loss")
    original = getattr(keras.losses.get, _MARK, keras.losses.get)
    return original(identifier)


def _wrap(original: Callable[[Any], Any], kind: str) -> Callable[[Any], Any]:
    @functools.wraps(original)
    def patched_get(identifier: Any) -> Any:
        if is_registered_name(identifier):
            return _resolve(identifier, kind)
        return original(identifier)

    setattr(patched_get, _MARK, original)
    return patched_get


_TRAINER = ("keras.src.trainers.trainer", "Trainer", "compile_from_config")
_COMPILE_KEYS = ("loss", "metrics", "weighted_metrics")


def registered_names_in(value: Any, found: list[str] | None = None) -> list[str]:
    """The ``"P>N"`` strings of a compile config's loss/metrics entry, in order."""
    found = [] if found is None else found
    if is_registered_name(value):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            registered_names_in(v, found)
    elif isinstance(value, dict) and "class_name" not in value:
        for v in value.values():
            registered_names_in(v, found)
    return found


def check_compile_config(config: Any, hint: str = "") -> None:
    """Raises :class:`UnknownLossError` for a ``"P>N"`` name nothing registers."""
    if not isinstance(config, dict):
        return
    for key in _COMPILE_KEYS:
        for name in registered_names_in(config.get(key)):
            try:
                _lookup(name)
            except UnknownLossError:
                raise unknown_loss_error(name, hint) from None


_LOAD_HINT = (
    " The saved model was compiled with it: import the module that registers it "
    "(or upgrade keras_ce_plugin, for a `customloss>` name) before loading, or load "
    "with compile=False for inference."
)


def _deserialize_keeping_names(value: Any) -> Any:
    """``keras.saving.deserialize_keras_object``, but registered names stay strings."""
    if is_registered_name(value):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_deserialize_keeping_names(v) for v in value)
    if isinstance(value, dict) and "class_name" not in value:
        return {k: _deserialize_keeping_names(v) for k, v in value.items()}
    return keras.saving.deserialize_keras_object(value)


def _wrap_compile_from_config(
    original: Callable[[Any, Any], Any], trainer_cls: type[Any]
) -> Callable[[Any, Any], Any]:
    @functools.wraps(original)
    def compile_from_config(self: Any, config: Any) -> Any:
        # Keras deserializes a saved "P>N" string to the bare class:
        # training works, but model.loss is then a class and the reloaded model
        # cannot be saved again. Keep the strings, exactly as first compiled
        # (same logged metric names too); they resolve through `get` as before.
        if (
            not isinstance(config, dict)
            or type(self).compile is not trainer_cls.compile
            or not any(registered_names_in(config.get(key)) for key in _COMPILE_KEYS)
        ):
            return original(self, config)
        check_compile_config(config, _LOAD_HINT)
        config = {k: _deserialize_keeping_names(v) for k, v in config.items()}
        self.compile(**config)
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)

    setattr(compile_from_config, _MARK, original)
    return compile_from_config


def _already_resolves(get_fn: Callable[[Any], Any]) -> bool:
    """True if this Keras resolves registered names by itself."""
    try:
        return get_fn(PREFIX + "CategoricalCE") is not None
    except (ValueError, TypeError, KeyError):
        return False


def install() -> list[str]:
    """Makes ``customloss>`` names work in ``compile``; returns what it patched.

    Raises:
        KerasCompatibilityError: if the Keras functions it wraps are missing or
            the compile machinery no longer calls them.
    """
    if os.environ.get("KERAS_CE_NO_PATCH", "") not in ("", "0"):
        return []
    _check_internals()
    patched = []
    for module_name, attr, kind in _TARGETS:
        module = importlib.import_module(module_name)
        current = getattr(module, attr)
        if hasattr(current, _MARK):  # Idempotent: already ours.
            continue
        if kind == "loss" and _already_resolves(current):
            continue
        setattr(module, attr, _wrap(current, kind))
        patched.append(f"{module_name}.{attr}")
    # Reloading string-compiled models: only where Keras needs our names at all.
    if hasattr(importlib.import_module("keras.src.losses").get, _MARK):
        module_name, cls_name, attr = _TRAINER
        cls = getattr(importlib.import_module(module_name), cls_name)
        current = getattr(cls, attr)
        if not hasattr(current, _MARK):
            setattr(cls, attr, _wrap_compile_from_config(current, cls))
            patched.append(f"{module_name}.{cls_name}.{attr}")
    return patched


def uninstall() -> None:
    """Restores the original Keras functions (for tests)."""
    for module_name, attr, _ in _TARGETS:
        module = importlib.import_module(module_name)
        current = getattr(module, attr)
        if hasattr(current, _MARK):
            setattr(module, attr, getattr(current, _MARK))
    module_name, cls_name, attr = _TRAINER
    cls = getattr(importlib.import_module(module_name), cls_name)
    current = cls.__dict__.get(attr)
    if hasattr(current, _MARK):
        setattr(cls, attr, getattr(current, _MARK))


def _check_internals() -> None:
    problems = []
    try:
        src_losses = importlib.import_module("keras.src.losses")
        src_metrics = importlib.import_module("keras.src.metrics")
        compile_utils = importlib.import_module("keras.src.trainers.compile_utils")
    except ImportError as exc:
        problems.append(f"cannot import {exc.name}")
    else:
        for mod in (src_losses, src_metrics):
            if not callable(getattr(mod, "get", None)):
                problems.append(f"{mod.__name__}.get is missing")
        if getattr(compile_utils, "losses_module", None) is not src_losses:
            problems.append("compile_utils.losses_module is not keras.src.losses")
        if getattr(compile_utils, "metrics_module", None) is not src_metrics:
            problems.append("compile_utils.metrics_module is not keras.src.metrics")
        module_name, cls_name, attr = _TRAINER
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            problems.append(f"{module_name}.{cls_name} is missing")
        else:
            if not callable(getattr(cls, attr, None)):
                problems.append(f"{cls_name}.{attr} is missing")
    if problems:
        raise KerasCompatibilityError(
            f"keras_ce_plugin cannot enable string names such as "
            f"'{PREFIX}CategoricalCE' on Keras {keras.__version__}: "
            + "; ".join(problems)
            + ". Pass a loss instance instead (e.g. keras_ce_plugin.CategoricalCE()), "
            "use keras_ce_plugin.get(name), or set KERAS_CE_NO_PATCH=1 to import the "
            "plugin without this patch, and report the Keras version to us."
        )

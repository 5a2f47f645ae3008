"""Finding a user's loss from the command line: ``--loss TARGET`` and ``--import MODULE``.

A TARGET is one of

* ``package.module:Attr`` -- an attribute of an importable module;
* ``path/to/file.py:Attr`` -- an attribute of a Python file (imported under its
  file name, its folder put on ``sys.path`` so that a saved model finds it again);
* ``P>N`` -- a name registered with ``keras.saving.register_keras_serializable``
  (``--import MODULE`` imports the module that registers it first);
* anything else -- a Keras identifier such as ``categorical_crossentropy``,
  passed to Keras unchanged.

Every failure is a one-line :class:`~keras_ce_plugin.errors.KerasCEError`.

>>> resolve_loss("customloss>CategoricalCE").identifier
'customloss>CategoricalCE'
>>> resolve_loss("keras_ce_plugin.losses:BinaryCE").identifier
'customloss>BinaryCE'
>>> resolve_loss("no_such_module_xyz:Loss")
Traceback (most recent call last):
...
keras_ce_plugin.errors.KerasCEError: --loss no_such_module_xyz:Loss: cannot import no_such_module_xyz (ModuleNotFoundError: No module named 'no_such_module_xyz').
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import keras

from keras_ce_plugin import naming
from keras_ce_plugin.errors import KerasCEError


@dataclasses.dataclass(frozen=True)
class LossTarget:
    """A resolved ``--loss`` TARGET.

    Attributes:
        target: the TARGET as given.
        obj: the loss: a ``keras.losses.Loss`` subclass or instance, a function, or
            (for a Keras identifier) the identifier string itself.
        identifier: what to give ``compile(loss=...)`` so that a saved model
            records a name: the registered ``"P>N"`` (or Keras identifier) when
            there is one, else ``None`` (compile with :meth:`instance`).
        module: the module that defines or registers the loss (``None`` for Keras').
    """

    target: str
    obj: Any
    identifier: str | None
    module: str | None

    def instance(self) -> Any:
        """A loss for ``compile``: the registered name, or an instance built with defaults."""
        if self.identifier is not None:
            return self.identifier
        if inspect.isclass(self.obj):
            return self.obj()
        return self.obj

    @property
    def label(self) -> str:
        """A short human-readable name."""
        return self.identifier or self.target


def _import_file(path: Path, what: str) -> ModuleType:
    if not path.is_file():
        raise KerasCEError(f"{what}: {path} is not a file.")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    if spec is None or spec.loader is None:
        raise KerasCEError(f"{what}: cannot import {path} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise KerasCEError(f"{what}: importing {path} failed ({_one_line(exc)}).") from None
    return module


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def import_module(spec: str, what: str = "--import", *, where: str | None = None) -> ModuleType:
    """Imports a module by dotted name or by ``.py`` file path; one-line errors.

    The errors begin with ``where`` (default: ``"{what} {spec}"``).
    """
    where = where or f"{what} {spec}"
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        return _import_file(Path(spec), where)
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise KerasCEError(
            f"{where}: cannot import {exc.name or spec} ({_one_line(exc)})."
        ) from None
    except Exception as exc:
        raise KerasCEError(f"{where}: importing it failed ({_one_line(exc)}).") from None


def import_modules(modules: Sequence[str]) -> list[ModuleType]:
    """Imports every ``--import MODULE`` (dotted names or ``.py`` paths), in order."""
    return [import_module(spec) for spec in modules]


def _registered_name(obj: Any) -> str | None:
    target = type(obj) if isinstance(obj, keras.losses.Loss) else obj
    name = keras.saving.get_registered_name(target)
    if naming.is_registered_name(name) and keras.saving.get_registered_object(name) is target:
        return str(name)
    return None


def resolve_loss(target: str, imports: Sequence[str] = (), *, what: str = "--loss") -> LossTarget:
    """Resolves a ``--loss`` TARGET (see the module docstring) after ``imports``."""
    import_modules(imports)
    where = f"{what} {target}"
    if naming.is_registered_name(target) and ":" not in target:
        try:
            obj = naming.get(target)
        except naming.UnknownLossError as exc:
            raise KerasCEError(f"{where}: {exc} (keras-ce: --import MODULE)") from None
        registered = keras.saving.get_registered_object(target)
        return LossTarget(target, registered, target, getattr(registered, "__module__", None))
    if ":" not in target:
        try:
            keras.losses.get(target)
        except (ValueError, TypeError) as exc:
            raise KerasCEError(
                f"{where}: not a Keras loss, a registered P>N name, module:Attr or "
                f"file.py:Attr ({_one_line(exc)})."
            ) from None
        return LossTarget(target, target, target, None)
    module_spec, _, attr = target.rpartition(":")
    if not module_spec or not attr:
        raise KerasCEError(f"{where}: expected module:Attr or path/to/file.py:Attr.")
    module = import_module(module_spec, where=where)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise KerasCEError(f"{where}: {module.__name__} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    is_loss_class = inspect.isclass(obj) and issubclass(obj, keras.losses.Loss)
    if not (is_loss_class or isinstance(obj, keras.losses.Loss) or callable(obj)):
        raise KerasCEError(
            f"{where}: {attr} is a {type(obj).__name__}, not a loss class, instance or function."
        )
    if isinstance(obj, keras.losses.Loss):
        return LossTarget(target, obj, None, module.__name__)
    return LossTarget(target, obj, _registered_name(obj), module.__name__)

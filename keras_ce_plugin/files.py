"""Files: atomic writes, the one `.keras` loader and the run lock.

Every artifact (``model.keras``, JSON, PNG, exports) is written to a temporary
sibling in the same directory and renamed into place, so an interrupted write
never leaves a half-written file where a good one was.

>>> import json, pathlib, tempfile
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_json(d / "a.json", {"x": 1})
>>> json.loads((d / "a.json").read_text())
{'x': 1}
>>> sorted(p.name for p in d.iterdir())
['a.json']
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keras_ce_plugin.errors import KerasCEError

LOCK_FILE = ".keras-ce.lock"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(path: Path) -> None:
    """Gives a temporary file/dir the mode a plain open()/mkdir() would have.

    mkstemp/mkdtemp create 0600/0700 entries, which a serving process running as
    another user could not read.
    """
    mode = (0o777 if path.is_dir() else 0o666) & ~_umask()
    os.chmod(path, mode)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    ok = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0
    return ok


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Removes temporaries of ``target`` left by writers that were killed.

    Temporaries are named ``.NAME.PID.XXXX.tmp`` (or ``.old``); those whose PID is
    no longer alive are deleted. If ``target`` itself is missing but a complete
    ``.old`` copy survived an interrupted swap, it is put back first.
    """
    target = Path(target)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for entry in sorted(target.parent.glob(f".{glob_escape(target.name)}.*")):
        parts = entry.name[len(target.name) + 2 :].split(".")  # PID, random, kind[, ext]
        if len(parts) < 3 or not parts[0].isdigit() or parts[2] not in ("tmp", "old"):
            continue
        if _pid_alive(int(parts[0])):
            continue
        if parts[2] == "old" and not target.exists():
            os.replace(entry, target)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``target``; renames it onto ``target`` on success.

    ``suffix`` keeps an extension that a writer insists on (``model.save`` wants
    ``.keras``). On error the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    fd, tmp = tempfile.mkstemp(
        prefix=_tmp_prefix(target), suffix=f".tmp{suffix}", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _publishable(tmp_path)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Atomically writes ``data`` to ``target``."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: str | os.PathLike, obj: Any) -> None:
    """Atomically writes ``obj`` as indented JSON."""
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``target`` to fill; swaps it in on success.

    An existing ``target`` is refused unless ``overwrite``; with ``overwrite`` it
    is swapped with the new one in a single atomic rename (Linux ``renameat2``), so
    at every instant ``target`` names a complete directory. Where that call is
    missing, the old directory is moved aside first and deleted only after the new
    one is in place (a kill in between leaves it as ``.NAME.PID.*.old``, which
    :func:`clean_stale` puts back). Temporaries of killed writers are removed on
    the next call.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _publishable(tmp)
        if target.exists() and _exchange(tmp, target):
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
            return
        old = None
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=_tmp_prefix(target), suffix=".old", dir=target.parent)
            )
            old.rmdir()
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Holds ``RUN_DIR/.keras-ce.lock`` while a run writes ``RUN_DIR``.

    The lock is an ``flock`` on the file, so it vanishes with its process: a run
    killed with SIGKILL leaves no stale lock. A second run on the same directory
    raises :class:`KerasCEError` naming the holder. The file is removed on exit.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with run_lock(d):
    ...     with run_lock(d):
    ...         pass
    Traceback (most recent call last):
    ...
    keras_ce_plugin.errors.KerasCEError: Another keras-ce run (pid ...) is writing ...
    >>> sorted(d.iterdir())
    []
    """
    import fcntl

    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise KerasCEError(
                f"Another keras-ce run ({holder}) is writing {run_dir}; refusing to run a "
                "second one there. Wait for it to finish, or choose another --out (with "
                "--overwrite too: it replaces a finished run, never one in progress)."
            ) from None
        try:  # The previous holder may have removed the file between our open and flock.
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()}".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _strings(obj: Any, found: set[str]) -> set[str]:
    if isinstance(obj, str):
        found.add(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _strings(value, found)
    elif isinstance(obj, list):
        for value in obj:
            _strings(value, found)
    return found


def _check_loss_names(p: Path, config: dict[str, Any], *, compile: bool) -> None:
    """Refuses names the plugin cannot resolve before Keras deserialises anything.

    Every ``customloss>`` name must be one that Keras' registry holds (importing
    the plugin registers all of them: another is from a newer plugin, a corrupt or
    a crafted file). Another package's ``"P>N"`` loss in the compile config must
    be registered (its module imported) to compile; for inference
    (``compile=False``) a one-line warning names it.
    """
    from keras_ce_plugin import naming
    from keras_ce_plugin._version import __version__

    ours = naming.registered_names(naming.PACKAGE)
    unknown = sorted(
        name
        for name in _strings(config, set())
        if name.startswith(naming.PREFIX) and name not in ours
    )
    if unknown:
        raise KerasCEError(
            f"{p} uses {', '.join(map(repr, unknown))}, which keras_ce_plugin {__version__} "
            f"does not register (it registers: {', '.join(ours)}). The "
            "file was written by a newer version of the plugin or edited: upgrade the plugin."
        )
    compile_config = config.get("compile_config") or {}
    hint = (
        " The model was compiled with it: import the module that registers it before "
        "loading (keras-ce: --import MODULE), or load with compile=False for inference."
    )
    try:
        naming.check_compile_config(compile_config, hint)
    except naming.UnknownLossError as exc:
        if compile:
            raise KerasCEError(f"{p}: {exc}") from None
        names = naming.registered_names_in(
            [compile_config.get(k) for k in ("loss", "metrics", "weighted_metrics")]
        )
        missing = sorted({n for n in names if n not in naming.registered_losses()})
        warnings.warn(
            f"{p}: loaded for inference without its loss {', '.join(missing or names)}, which "
            "no imported module registers (keras-ce: --import MODULE registers it).",
            stacklevel=3,
        )


def load_keras_model(
    path: str | os.PathLike,
    *,
    safe_mode: bool = True,
    compile: bool = True,
    custom_objects: dict | None = None,
) -> Any:
    """Loads a ``.keras`` file; every problem is a :class:`KerasCEError` naming the file.

    Before Keras deserialises anything it checks that the file is a complete zip
    (CRC of every member), that ``config.json`` parses, that every ``customloss>``
    name in it is one this plugin registers and that every other ``"P>N"`` loss of
    its compile config is registered (with ``compile=False``: a warning). Code stored in the
    file (``Lambda`` layers, lambdas) is refused unless ``safe_mode=False``.

    >>> load_keras_model("/nonexistent/model.keras")
    Traceback (most recent call last):
    ...
    keras_ce_plugin.errors.KerasCEError: /nonexistent/model.keras: no such file.
    """
    import zipfile

    import keras

    p = Path(path)
    if not p.exists():
        raise KerasCEError(f"{p}: no such file.")
    if p.is_dir():
        raise KerasCEError(
            f"{p} is a directory, not a .keras file (a SavedModel export? Load its "
            "model.keras file, or use `keras-ce predict` on the export)."
        )
    if p.suffix != ".keras":
        raise KerasCEError(f"{p}: expected a .keras file. Received a {p.suffix!r} file.")
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
            names = set(z.namelist())
            config = json.loads(z.read("config.json")) if "config.json" in names else None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise KerasCEError(
            f"{p} is not a readable .keras file: the zip archive is truncated or corrupted "
            f"({type(exc).__name__}: {exc}). Copy or write it again."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KerasCEError(
            f"{p} is corrupted: its config.json is not valid JSON ({exc})."
        ) from None
    if bad is not None:
        raise KerasCEError(f"{p} is corrupted: the member {bad!r} fails its CRC check.")
    if config is None:
        raise KerasCEError(f"{p} is not a Keras model file: it has no config.json.")
    _check_loss_names(p, config, compile=compile)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = keras.models.load_model(
                p, safe_mode=safe_mode, compile=compile, custom_objects=custom_objects
            )
    except Exception as exc:
        hint = ""
        if "safe_mode" in str(exc):
            hint = (
                " The file asks to run Python code stored in it; that is refused under "
                "safe_mode=True. Load it with safe_mode=False only if you trust its source."
            )
        raise KerasCEError(f"Cannot load {p}: {type(exc).__name__}: {exc}{hint}") from exc
    for w in caught:
        msg = str(w.message)
        if compile and "compile" in msg.lower() and "not" in msg.lower():
            raise KerasCEError(f"{p}: the model loaded but could not be compiled: {msg}")
        warnings.warn(f"{p}: {msg}", w.category, stacklevel=2)
    return model

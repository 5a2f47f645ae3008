"""Images for prediction: PNG/JPEG files and ``.npy`` batches as float32 pixels / 255."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from keras_ce_plugin.errors import KerasCEError
from keras_ce_plugin.export._common import describe
from keras_ce_plugin.export.signature import IMAGE_SIZE


def _check_npy(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != (*IMAGE_SIZE, 3) or len(array) == 0:
        raise KerasCEError(
            f"{path} must hold images of shape (N, {IMAGE_SIZE[0]}, {IMAGE_SIZE[1]}, 3) or "
            f"({IMAGE_SIZE[0]}, {IMAGE_SIZE[1]}, 3). Received: shape {array.shape}"
        )
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype not in (np.float16, np.float32, np.float64):
        raise KerasCEError(
            f"{path} must be uint8 pixels (0-255) or float pixels / 255 in [0, 1]. "
            f"Received: dtype {array.dtype}"
        )
    if not np.all(np.isfinite(array)):
        raise KerasCEError(f"{path} contains NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise KerasCEError(
            f"{path} must hold pixels / 255 in [0, 1] (or uint8 pixels). Received: values in "
            f"[{low:g}, {high:g}]"
        )
    return array.astype(np.float32)


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise KerasCEError(
            f"{path} holds Python objects or is not a valid .npy file: {describe(exc)}"
        ) from None
    except (OSError, EOFError) as exc:
        raise KerasCEError(f"{path} is not a readable .npy file: {describe(exc)}") from None
    if not isinstance(array, np.ndarray):
        raise KerasCEError(f"{path} is not a single NumPy array.")
    return _check_npy(array, path)


def _warn_upscaled(path: Path, size: tuple[int, int]) -> None:
    """One warning per image smaller than the model input: its details are invented."""
    warnings.warn(
        f"{path} is {size[0]}x{size[1]} pixels; upscaled to {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}.",
        UserWarning,
        stacklevel=4,
    )


def _load_picture(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.format not in ("PNG", "JPEG"):
                raise KerasCEError(
                    f"{path} is a {img.format} image; only PNG and JPEG files (and .npy "
                    "batches) are supported."
                )
            rgb = ImageOps.exif_transpose(img).convert("RGB")  # camera orientation
            if rgb.size != IMAGE_SIZE:
                if rgb.size[0] < IMAGE_SIZE[0] or rgb.size[1] < IMAGE_SIZE[1]:
                    _warn_upscaled(path, rgb.size)
                rgb = rgb.resize(IMAGE_SIZE, Image.Resampling.BILINEAR)
            pixels = np.asarray(rgb, dtype=np.uint8)
    except UnidentifiedImageError:
        raise KerasCEError(
            f"{path} is not an image (expected a PNG or JPEG file, or a .npy batch)."
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise KerasCEError(
            f"{path} could not be read as an image (truncated?): {describe(exc)}"
        ) from None
    return pixels[None].astype(np.float32) / 255.0


def load_images(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, list[str]]:
    """PNG/JPEG files and ``.npy`` batches -> ``(x, labels)``: float32 ``(N, 32, 32, 3)``.

    Images are turned upright (EXIF orientation), converted to RGB, resized to 32x32
    (bilinear, antialiased) and divided by 255; an image smaller than 32x32 in
    either side is upscaled with a :class:`UserWarning` naming it and its size. A ``.npy`` file holds one image
    ``(32, 32, 3)`` or a batch ``(N, 32, 32, 3)``: uint8 pixels (divided by 255 here)
    or floats already in ``[0, 1]``; it is read with ``allow_pickle=False``. The
    labels name each image: the file, or ``FILE[i]`` for the rows of a batch.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> np.save(d / "b.npy", np.zeros((2, 32, 32, 3), np.uint8))
    >>> x, labels = load_images([d / "b.npy"])
    >>> x.shape, x.dtype, [label[-6:] for label in labels]
    ((2, 32, 32, 3), dtype('float32'), ['npy[0]', 'npy[1]'])
    """
    batches: list[np.ndarray] = []
    labels: list[str] = []
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise KerasCEError(f"Image file not found: {path}")
        if path.is_dir():
            raise KerasCEError(f"{path} is a directory; expected a PNG/JPEG file or a .npy batch.")
        if path.suffix.lower() == ".npy":
            array = _load_npy(path)
            batches.append(array)
            labels.extend(f"{path}[{i}]" for i in range(len(array)))
        else:
            batches.append(_load_picture(path))
            labels.append(str(path))
    return np.concatenate(batches, axis=0), labels

"""Reading single images and writing result TIFFs without leaving half-written files."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF (any page layout) or PNG/JPEG; a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            data = tifffile.imread(path)
        else:
            from skimage import io as skio

            data = np.asarray(skio.imread(path))
    except Exception as exc:  # tifffile/zlib/imageio raise many types for damaged files
        raise ValueError(f"{path} is not a readable image (corrupt or truncated?): {exc}") from exc
    if data.size == 0:
        raise ValueError(f"{path} is not a readable image (corrupt or truncated?): it holds no pixel data")
    return data


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """Open a temporary file beside ``path`` for writing; on success fsync and rename it over
    ``path``, on any error remove it. ``path`` is either the complete new file or untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # opened by name (not os.fdopen): writers such as tifffile use the file's name
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tiff_atomic(path: str | os.PathLike, data: np.ndarray, **kwargs) -> Path:
    """Write ``data`` as a TIFF without ever leaving a half-written ``path``."""
    with atomic_file(path) as f:
        tifffile.imwrite(f, data, **kwargs)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file via a temporary file and a rename (never half-written)."""
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)

"""Reading single images and writing result TIFFs without leaving half-written files."""

from __future__ import annotations

import os
import tempfile
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


def write_tiff_atomic(path: str | os.PathLike, data: np.ndarray, **kwargs) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename, so the
    destination is either the complete new file or untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tifffile.imwrite(tmp, data, **kwargs)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file via a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

"""napari writer: a labels layer plus (optionally) an uncertainty image, as two TIFF files.

``cells.tif`` becomes ``cells_labels.tif`` and ``cells_uncertainty.tif`` beside it. Each file is
written atomically (temporary file + rename) and if the second fails the first is removed, so a
save either produces the complete pair or leaves nothing new behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .io.imageio import write_tiff_atomic

LABELS_SUFFIX = "_labels"
UNCERTAINTY_SUFFIX = "_uncertainty"


def result_paths(path: str | Path) -> tuple[Path, Path]:
    """(labels path, uncertainty path) for a requested save path ``stem.tif``."""
    path = Path(path)
    stem = path.name
    for ext in (".tiff", ".tif"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    for suffix in (LABELS_SUFFIX, UNCERTAINTY_SUFFIX):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return path.with_name(f"{stem}{LABELS_SUFFIX}.tif"), path.with_name(f"{stem}{UNCERTAINTY_SUFFIX}.tif")


def write_results(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """Write one labels layer and at most one image layer (the uncertainty map, float32 0..1).

    Returns the paths written. Raises ValueError naming the problem for other layer mixes or
    for an uncertainty map whose shape differs from the labels'.
    """
    labels = [(d, m) for d, m, t in layer_data if t == "labels"]
    images = [(d, m) for d, m, t in layer_data if t == "image"]
    if len(labels) != 1 or len(images) > 1 or len(labels) + len(images) != len(layer_data):
        kinds = ", ".join(t for _, _, t in layer_data)
        raise ValueError(f"select one labels layer and at most one uncertainty image to save (got: {kinds})")
    labels_path, unc_path = result_paths(path)
    label_data = np.asarray(labels[0][0])
    written: list[Path] = []
    try:
        written.append(write_tiff_atomic(labels_path, _label_dtype(label_data), compression="zlib"))
        if images:
            unc = np.asarray(images[0][0], dtype=np.float32)
            if unc.shape != label_data.shape:
                raise ValueError(
                    f"uncertainty map shape {unc.shape} does not match the labels shape {label_data.shape}"
                )
            written.append(write_tiff_atomic(unc_path, unc, compression="zlib"))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return [str(p) for p in written]


def _label_dtype(labels: np.ndarray) -> np.ndarray:
    """Labels as the smallest unsigned type that holds them (ImageJ/Fiji read uint16 best)."""
    top = int(labels.max()) if labels.size else 0
    if labels.min(initial=0) < 0:
        raise ValueError("labels must be non-negative integers")
    return labels.astype(np.uint16 if top < 65536 else np.uint32)

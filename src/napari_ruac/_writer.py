"""napari writer: a labels layer plus (optionally) an uncertainty image, as two TIFF files.

``cells.tif`` becomes ``cells_labels.tif`` and ``cells_uncertainty.tif`` beside it. Both are
written as one set (:class:`~napari_ruac.io.imageio.FileSet`): each under a temporary name, and
only when both are complete are they renamed into place. A save either produces the complete
pair or changes nothing: a pair saved earlier under the same name stays as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .io.calibration import PixelSize, tiff_write_kwargs, to_micrometres
from .io.imageio import FileSet, PartlyReplaced

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
    label_data = _label_dtype(np.asarray(labels[0][0]))
    files = {labels_path: label_data}
    if images:
        unc = np.asarray(images[0][0], dtype=np.float32)
        if unc.shape != label_data.shape:
            raise ValueError(
                f"uncertainty map shape {unc.shape} does not match the labels shape {label_data.shape}"
            )
        files[unc_path] = unc
    # a layer in physical units (scale + units, e.g. from a calibrated reader) keeps them in the files
    calibration = tiff_write_kwargs(layer_pixel_size(labels[0][1]))
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    new = FileSet()
    try:
        # nothing is replaced until both files are complete: a failure keeps an earlier pair whole
        for target, data in files.items():
            with new.open(target) as f:
                tifffile.imwrite(f, data, photometric="minisblack", compression="zlib", **calibration)
        new.commit()
    except PartlyReplaced as exc:
        raise OSError(exc.error.errno, f"{labels_path} was replaced but {unc_path} could not be: "
                                       f"{exc.error.strerror or exc.error}") from exc
    finally:
        new.discard()
    return [str(p) for p in files]


def layer_pixel_size(meta: dict) -> PixelSize | None:
    """Pixel size of a layer whose ``units`` are lengths (napari's default unit is the pixel):
    X and Y from the last two axes, Z from the third-last when it is a length too."""
    scale, units = meta.get("scale"), meta.get("units")
    if scale is None or units is None or len(scale) < 2:
        return None
    units = [units] * len(scale) if isinstance(units, str) or not hasattr(units, "__len__") else list(units)
    if len(units) != len(scale):
        return None
    um = [to_micrometres(s, str(u)) for s, u in zip(scale, units)]
    if um[-1] is None or um[-2] is None:
        return None
    return PixelSize(um[-1], um[-2], um[-3] if len(um) >= 3 else None)


def _label_dtype(labels: np.ndarray) -> np.ndarray:
    """Labels as the smallest unsigned type that holds them (ImageJ/Fiji read uint16 best)."""
    top = int(labels.max()) if labels.size else 0
    if labels.min(initial=0) < 0:
        raise ValueError("labels must be non-negative integers")
    # uint32 would wrap labels from 2**32 on (label 2**32 + 5 saved as 5): uint64 keeps them
    return labels.astype(np.uint16 if top < 2**16 else np.uint32 if top < 2**32 else np.uint64)

"""napari reader for our results: ``*_uncertainty.tif`` opens as a 0..1 uncertainty image, with
its sibling ``*_labels.tif`` (written by :mod:`napari_ruac._writer` and by batch segmentation)
or ``*_mask.tif`` (written by ``napari-ruac predict``), if present, as a labels layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .io.imageio import read_image

#: how uncertainty maps are shown everywhere in the plugin (0 = sure, 1 = coin flip)
UNCERTAINTY_DISPLAY = {"colormap": "magma", "contrast_limits": (0.0, 1.0), "blending": "additive", "opacity": 0.7}


def get_reader(path: str | list[str]) -> Callable | None:
    """npe2 reader hook: a reader function for ``*_uncertainty.tif`` files, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_is_uncertainty(p) for p in paths):
        return None
    return read_results


def _is_uncertainty(path) -> bool:
    name = Path(path).name.lower()
    return name.endswith("_uncertainty.tif") or name.endswith("_uncertainty.tiff")


def labels_path_for(path: str | Path) -> Path:
    """The labels beside an uncertainty map: ``<stem>_labels`` (writer, batch), else
    ``<stem>_mask`` (predict); the first name when neither exists."""
    p = Path(path)
    stem = p.name[: p.name.lower().rfind("_uncertainty")]
    candidates = [p.with_name(f"{stem}{kind}{p.suffix}") for kind in ("_labels", "_mask")]
    return next((c for c in candidates if c.is_file()), candidates[0])


def read_results(path: str | list[str]) -> list[tuple]:
    """Layer data for each uncertainty map and its labels: [(data, meta, type), ...]."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    layers = []
    for p in paths:
        stem = Path(p).name[: Path(p).name.lower().rfind("_uncertainty")]
        labels_file = labels_path_for(p)
        if labels_file.is_file():
            kind = "mask" if labels_file.stem.endswith("_mask") else "labels"
            layers.append((_label_data(labels_file), {"name": f"{stem} {kind}"}, "labels"))
        unc = np.asarray(read_image(p), dtype=np.float32)
        layers.append((unc, {"name": f"{stem} uncertainty", **UNCERTAINTY_DISPLAY}, "image"))
    return layers


def _label_data(path: Path) -> np.ndarray:
    """The labels in ``path`` as integers: napari takes no float labels, but Fiji and other tools
    often save label images as 32-bit float; whole numbers become integers, anything else is a
    ValueError naming the file."""
    data = np.asarray(read_image(path))
    if data.dtype.kind != "f":
        return data
    with np.errstate(invalid="ignore"):
        whole = bool(np.isfinite(data).all() and (data >= 0).all() and (data == np.round(data)).all())
    if not whole:
        raise ValueError(
            f"{path} is not a labels image: its {data.dtype} values are not all whole numbers >= 0 "
            "(NaN, negative or fractional), so they cannot be object labels"
        )
    top = float(data.max()) if data.size else 0.0
    return data.astype(np.uint16 if top < 2**16 else np.uint32 if top < 2**32 else np.uint64)

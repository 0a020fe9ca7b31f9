"""napari sample data: a 2D nuclei image and a 3D nuclei stack, each with its label masks.

The files live in ``napari_ruac/sample_data`` (see its README for their sources and licences).
"""

from __future__ import annotations

from pathlib import Path

import tifffile

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"


def _load(stem: str) -> list[tuple]:
    image_path = SAMPLE_DIR / f"{stem}.tif"
    labels_path = SAMPLE_DIR / f"{stem}_labels.tif"
    if not image_path.is_file():
        raise FileNotFoundError(
            f"sample image {image_path} is missing from this installation (reinstall napari-ruac)"
        )
    layers = [(tifffile.imread(image_path), {"name": stem, "colormap": "gray"}, "image")]
    if labels_path.is_file():
        # ground truth starts hidden: the point of the demo is to make masks with clicks
        layers.append((tifffile.imread(labels_path), {"name": f"{stem} ground truth", "visible": False}, "labels"))
    return layers


def nuclei2d() -> list[tuple]:
    """512x512 uint8 fluorescence nuclei (DSB2018) and their instance labels."""
    return _load("nuclei2d")


def nuclei3d() -> list[tuple]:
    """20x256x256 uint16 confocal nuclei stack and its instance labels."""
    return _load("nuclei3d")

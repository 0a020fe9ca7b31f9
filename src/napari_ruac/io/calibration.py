"""Physical pixel sizes: read from an input's metadata, written into our outputs.

A microscopist measures objects in micrometres, so label and uncertainty images must keep the
calibration of the image they were made from (Fiji shows and measures in the file's units).
Sources, in this order: OME-XML ``Pixels`` (OME-TIFF), the JSON description our own outputs
carry, ImageJ metadata (``unit``, ``spacing``) with the resolution tags, and plain resolution
tags in centimetres; OME-Zarr ``scale`` transformations with axis units. Resolution tags in
inches are ignored: a bare 72/96/300 dpi is what non-microscopy writers put by default, not a
pixel size. Everything is converted to micrometres.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass

#: micrometres per unit, for the spellings of OME, OME-NGFF and ImageJ
_MICROMETRES = {
    "pm": 1e-6, "picometer": 1e-6, "Å": 1e-4, "angstrom": 1e-4,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "m": 1e6, "meter": 1e6, "metre": 1e6,
}
_UM_PER_CM = 1e4


@dataclass(frozen=True)
class PixelSize:
    """Pixel size in micrometres along X and Y, and the plane spacing along Z (or None)."""

    x: float
    y: float
    z: float | None = None

    def __post_init__(self) -> None:
        # a zero, negative or NaN size would be written as resolution tags Fiji cannot use (or
        # fail deep in the writer with a division by zero)
        for name in ("x", "y", "z"):
            value = getattr(self, name)
            if value is None and name == "z":
                continue
            try:
                size = math.nan if isinstance(value, (str, bytes, bool)) else float(value)
            except (TypeError, ValueError):
                size = math.nan
            if not (math.isfinite(size) and size > 0):
                raise ValueError(f"pixel size {name} must be a finite number of micrometres > 0, got {value!r}")

    def as_dict(self) -> dict:
        return {**asdict(self), "unit": "µm"}

    @classmethod
    def from_dict(cls, d: dict | None) -> "PixelSize | None":
        if not isinstance(d, dict):
            return None
        return _make(d.get("x"), d.get("y"), d.get("z"), d.get("unit", "µm"))


def to_micrometres(value, unit) -> float | None:
    """``value`` in ``unit`` as micrometres; None for missing, non-positive or unknown units."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    scale = _MICROMETRES.get(str(unit).strip()) if unit is not None else None
    if scale is None and unit is not None:
        scale = _MICROMETRES.get(str(unit).strip().lower())
    if scale is None or not math.isfinite(v) or v <= 0:
        return None
    return v * scale


def _make(x, y, z=None, unit="µm") -> PixelSize | None:
    xu, yu = to_micrometres(x, unit), to_micrometres(y, unit)
    if xu is None or yu is None:
        return None
    return PixelSize(xu, yu, to_micrometres(z, unit) if z is not None else None)


def tiff_pixel_size(tf) -> PixelSize | None:
    """The pixel size of an open ``tifffile.TiffFile`` (first series), or None."""
    try:
        if tf.is_ome and tf.ome_metadata:
            found = _ome_pixel_size(tf.ome_metadata)
            if found is not None:
                return found
        if tf.is_shaped and tf.shaped_metadata:
            found = PixelSize.from_dict(tf.shaped_metadata[0].get("pixel_size"))
            if found is not None:
                return found
        page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
        xres, yres = _resolution(page, "XResolution"), _resolution(page, "YResolution")
        if tf.is_imagej and tf.imagej_metadata:
            ij = tf.imagej_metadata
            unit = ij.get("unit")
            if unit and xres and yres:
                return _make(1.0 / xres, 1.0 / yres, ij.get("spacing"), unit)
            return None
        unit_tag = page.tags.get("ResolutionUnit")
        if unit_tag is not None and int(unit_tag.value) == 3 and xres and yres:  # centimetre
            return PixelSize(_UM_PER_CM / xres, _UM_PER_CM / yres)
    except Exception:  # metadata is a courtesy: a malformed tag never stops a run
        return None
    return None


def file_pixel_size(path) -> PixelSize | None:
    """:func:`tiff_pixel_size` of a TIFF file; None for other formats or unreadable files."""
    from pathlib import Path

    import tifffile

    from .stacks import TIFF_SUFFIXES  # stacks imports this module: import at call time

    if Path(path).suffix.lower() not in TIFF_SUFFIXES:
        return None
    try:
        with tifffile.TiffFile(path) as tf:
            return tiff_pixel_size(tf)
    except Exception:
        return None


def _resolution(page, name: str) -> float | None:
    tag = page.tags.get(name)
    if tag is None:
        return None
    value = tag.value
    try:
        num, den = value if isinstance(value, tuple) else (value, 1)
        res = float(num) / float(den)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return res if math.isfinite(res) and res > 0 else None


def _ome_pixel_size(xml: str) -> PixelSize | None:
    root = ET.fromstring(xml)
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    a = pixels.attrib
    x = to_micrometres(a.get("PhysicalSizeX"), a.get("PhysicalSizeXUnit", "µm"))
    y = to_micrometres(a.get("PhysicalSizeY"), a.get("PhysicalSizeYUnit", "µm"))
    if x is None or y is None:
        return None
    return PixelSize(x, y, to_micrometres(a.get("PhysicalSizeZ"), a.get("PhysicalSizeZUnit", "µm")))


def ngff_pixel_size(multiscale: dict) -> PixelSize | None:
    """From an OME-Zarr ``multiscales`` entry: the first dataset's ``scale`` and axis units."""
    try:
        axes = multiscale.get("axes", [])
        names = [str(a["name"] if isinstance(a, dict) else a).lower() for a in axes]
        units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
        scale = next(t["scale"] for t in multiscale["datasets"][0].get("coordinateTransformations", [])
                     if t.get("type") == "scale")
        size = {n: to_micrometres(s, u) for n, s, u in zip(names, scale, units)}
    except Exception:
        return None
    if size.get("x") is None or size.get("y") is None:
        return None
    return PixelSize(size["x"], size["y"], size.get("z"))


def tiff_write_kwargs(size: PixelSize | None) -> dict:
    """``tifffile.imwrite`` arguments that store ``size``: resolution tags in pixels per
    centimetre (read by Fiji and every TIFF library) and, for our own reader, the JSON
    description's ``pixel_size`` (which also holds the Z spacing). Merge ``metadata``."""
    if size is None:
        return {"metadata": {}}
    return {
        "resolution": (_UM_PER_CM / size.x, _UM_PER_CM / size.y),
        "resolutionunit": "CENTIMETER",
        "metadata": {"pixel_size": size.as_dict()},
    }


__all__ = ["PixelSize", "file_pixel_size", "to_micrometres", "ngff_pixel_size", "tiff_pixel_size", "tiff_write_kwargs"]

"""Streaming readers for microscopy stacks: TIFF, OME-TIFF, ImageJ/multi-page TIFF and zarr.

A :class:`Stack` knows its axes (letters from ``TZCYX`` plus ``S`` for RGB samples) and hands
out one plane at a time, so a stack larger than memory is never loaded whole. Every axis that
is not Y, X or a colour axis becomes a *plane axis*: the planes are indexed in C order over them
(``plane i`` of a ``TZYX`` stack is ``(t, z) = divmod(i, Z)``).

Errors are :class:`~napari_ruac.io.normalize.ImageError` with a message naming the file and the
problem (empty, corrupt, truncated, unsupported dtype, ambiguous axes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .calibration import PixelSize, ngff_pixel_size, tiff_pixel_size
from .imageio import open_tiff
from .normalize import ImageError

SPATIAL = "YX"
PLANE_AXES = "TZQIR"  # axes iterated plane by plane (Q, I, R: tifffile's "unknown/sequence")
COLOUR_AXES = "CS"
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
ZARR_SUFFIXES = (".zarr", ".zr", ".n5")


@dataclass
class Stack:
    """A lazily read image of any supported layout.

    ``axes`` names every dimension of ``shape`` (e.g. ``"TZYX"``, ``"ZYXS"``); ``plane_axes``
    the ones iterated; ``n_planes`` their product; ``plane_shape`` the (H, W) of one plane.
    ``read_plane(i)`` returns (H, W) or (H, W, C) with C in 1..4.
    """

    path: Path
    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype
    _array: object = field(repr=False)  # anything indexable like a numpy array (zarr, memmap)
    _closer: object = field(default=None, repr=False)
    channel: int | None = None
    #: physical pixel size from the file's metadata (micrometres), None when it gives none
    pixel_size: PixelSize | None = None

    @property
    def stem(self) -> str:
        return stack_stem(self.path)

    @property
    def plane_axes(self) -> str:
        return "".join(a for a in self.axes if a not in SPATIAL + COLOUR_AXES)

    @property
    def plane_dims(self) -> tuple[int, ...]:
        return tuple(self.shape[self.axes.index(a)] for a in self.plane_axes)

    @property
    def n_planes(self) -> int:
        return int(math.prod(self.plane_dims))

    @property
    def plane_shape(self) -> tuple[int, int]:
        return (self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")])

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of the label/uncertainty outputs: plane axes then (H, W)."""
        return (*self.plane_dims, *self.plane_shape)

    @property
    def output_axes(self) -> str:
        return self.plane_axes + "YX"

    def plane_coords(self, i: int) -> dict[str, int]:
        """Index of plane ``i`` along each plane axis, e.g. ``{"T": 1, "Z": 3}``."""
        idx = np.unravel_index(i, self.plane_dims) if self.plane_dims else ()
        return {a: int(v) for a, v in zip(self.plane_axes, idx)}

    def read_plane(self, i: int) -> np.ndarray:
        """Plane ``i`` (C order over the plane axes) as (H, W) or (H, W, C)."""
        if not 0 <= i < self.n_planes:
            raise IndexError(f"plane {i} out of range for {self.n_planes} planes")
        coords = self.plane_coords(i)
        key = []
        for a in self.axes:
            if a in coords:
                key.append(coords[a])
            elif a in COLOUR_AXES and self.channel is not None:
                key.append(self.channel)
            else:
                key.append(slice(None))
        try:
            plane = np.asarray(self._array[tuple(key)])
        except Exception as exc:  # tifffile/zarr/numcodecs raise many kinds on damaged data
            raise ImageError(
                f"{self.path}: plane {i} {coords} could not be read (file corrupt or truncated?): {exc}"
            ) from exc
        # remaining axes are Y, X and maybe one colour axis, in file order: move colour last
        rest = [a for a in self.axes if a not in coords and not (a in COLOUR_AXES and self.channel is not None)]
        order = [rest.index("Y"), rest.index("X")] + [k for k, a in enumerate(rest) if a not in SPATIAL]
        return np.transpose(plane, order)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plane_name(stack: Stack, i: int) -> str:
    """``plane 7 (T=1, Z=2)`` for messages; ``the plane`` for a single plane."""
    coords = stack.plane_coords(i)
    if not coords:
        return "the plane"
    return f"plane {i} ({', '.join(f'{a}={v}' for a, v in coords.items())})"


def stack_stem(path: str | os.PathLike) -> str:
    """File name without its image suffixes (``a.ome.tif`` -> ``a``, ``b.zarr`` -> ``b``)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr") + TIFF_SUFFIXES + ZARR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def open_stack(path: str | os.PathLike, axes: str | None = None, channel: int | None = None) -> Stack:
    """Open a TIFF or zarr image for plane-by-plane reading.

    ``axes`` overrides the file's own axes (one letter per dimension from ``TZCYXS``);
    ``channel`` picks one channel when the colour axis has more than 4 entries (or always, if
    given). Raises :class:`ImageError` with the reason when the file cannot be used.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageError(f"{path} is empty (0 bytes)")
    is_zarr = path.is_dir() or path.suffix.lower() in ZARR_SUFFIXES
    if is_zarr:
        array, file_axes, closer, pixel_size = _open_zarr(path)
    elif path.suffix.lower() in TIFF_SUFFIXES:
        array, file_axes, closer, pixel_size = _open_tiff(path)
    else:
        raise ImageError(f"{path}: unsupported format {path.suffix!r}; expected TIFF/OME-TIFF or zarr")
    try:
        stack = _make_stack(path, array, file_axes, axes, channel, closer)
        stack.pixel_size = pixel_size
    except BaseException:
        if closer is not None:
            closer()
        raise
    return stack


def _make_stack(path, array, file_axes, axes, channel, closer) -> Stack:
    shape = tuple(int(s) for s in array.shape)
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biuf":
        raise ImageError(
            f"{path}: unsupported dtype {dtype}; expected integer, float or bool pixels"
        )
    if axes is not None:
        axes = axes.upper()
        if len(axes) != len(shape) or len(set(axes)) != len(axes) or set(axes) - set("TZCYXSQ"):
            raise ImageError(
                f"{path}: axes {axes!r} do not fit the image of shape {shape}: give one distinct "
                "letter from TZCYXS per dimension"
            )
    else:
        axes = _infer_axes(path, shape, file_axes)
    if "Y" not in axes or "X" not in axes:
        raise ImageError(f"{path}: axes {axes!r} have no Y and X")
    if 0 in shape:
        raise ImageError(f"{path} holds no pixels: shape {shape} has a zero-size dimension")
    colour = [a for a in axes if a in COLOUR_AXES]
    if len(colour) > 1:
        raise ImageError(f"{path}: axes {axes!r} have more than one colour axis")
    if colour:
        n = shape[axes.index(colour[0])]
        if channel is not None and not 0 <= channel < n:
            raise ImageError(f"{path}: channel {channel} does not exist (the image has {n})")
        if channel is None and n not in (1, 3, 4):
            # the model takes grey, RGB or RGBA planes; any other count needs a choice
            raise ImageError(
                f"{path}: the channel axis has {n} channels; pick one with --channel (0..{n - 1})"
            )
    elif channel is not None:
        channel = None  # nothing to pick from: a single-channel image
    return Stack(path, axes, shape, dtype, array, closer, channel)


def _infer_axes(path: Path, shape: tuple[int, ...], file_axes: str | None) -> str:
    """Axes from the file if it names them, else from the shape for up to 4-D."""
    ndim = len(shape)
    named = (file_axes or "").upper()
    # letters that repeat (zarr dims "z", "zoom") or lack Y and X (xarray's "dim_0", "dim_1")
    # name nothing: a repeated letter would read the same plane for different indices
    if (len(named) == ndim and not set(named) & set("QIR") and len(set(named)) == ndim
            and {"Y", "X"} <= set(named)):
        return named
    if ndim == 2:
        return "YX"
    known_rgb = bool(file_axes) and file_axes.endswith("S") and shape[-1] in (3, 4)
    if ndim == 3:
        return "YXS" if known_rgb else "ZYX"
    if ndim == 4:
        # planes are segmented independently, so two unnamed leading axes need no name
        return "ZYXS" if known_rgb else "QZYX"
    raise ImageError(
        f"{path}: a {ndim}-D image of shape {shape} without axis names (file axes "
        f"{file_axes or 'unknown'}); say which axis is which with --axes, e.g. --axes TZCYX"
    )


def _open_tiff(path: Path):
    import tifffile
    import zarr

    try:
        tf, series = open_tiff(path)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{path} is not a readable TIFF (corrupt or truncated?): {exc}") from exc
    try:
        axes = series.axes
        if tf.is_shaped and not (tf.shaped_metadata and tf.shaped_metadata[0].get("axes")):
            # a plain tifffile "shaped" file: its letters are guesses, keep only RGB samples
            page = series.keyframe
            rgb = getattr(page, "photometric", None) == tifffile.PHOTOMETRIC.RGB and page.planarconfig == 1
            axes = "Q" * (len(series.shape) - 1) + ("S" if rgb else "Q")
        array = zarr.open(series.aszarr(), mode="r")
        pixel_size = tiff_pixel_size(tf)
    except ImageError:
        tf.close()
        raise
    except Exception as exc:
        tf.close()
        raise ImageError(f"{path} is not a readable TIFF (corrupt or truncated?): {exc}") from exc
    return array, axes, tf.close, pixel_size


def _open_zarr(path: Path):
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise ImageError(f"{path} is not a readable zarr store: {exc}") from exc
    axes = None
    pixel_size = None
    if hasattr(node, "shape"):
        array = node
        dims = array.attrs.get("_ARRAY_DIMENSIONS")
        if dims:
            axes = "".join(str(d)[:1].upper() for d in dims)
    else:  # a group: OME-Zarr multiscales, full-resolution level
        attrs = dict(node.attrs)
        ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
        if not ms:
            arrays = sorted(name for name, _ in node.arrays())
            if len(arrays) != 1:
                raise ImageError(
                    f"{path}: a zarr group without OME multiscales metadata and {len(arrays)} arrays; "
                    "pass the array's own folder"
                )
            array = node[arrays[0]]
        else:
            try:
                level = ms[0]["datasets"][0]["path"]
                array = node[level]
                names = [a["name"] if isinstance(a, dict) else a for a in ms[0].get("axes", [])]
                pixel_size = ngff_pixel_size(ms[0])
            except Exception as exc:  # KeyError, TypeError, IndexError: whatever the metadata lacks
                raise ImageError(
                    f"{path}: its OME-Zarr multiscales metadata is malformed or names a missing array "
                    f"({type(exc).__name__}: {exc}); pass the full-resolution array's own folder"
                ) from exc
            if names:
                axes = "".join(str(n)[:1].upper() for n in names)
    return array, axes, None, pixel_size


def describe(stack: Stack) -> dict:
    """A JSON-able description (for metadata files)."""
    return {
        "path": str(stack.path),
        "axes": stack.axes,
        "shape": list(stack.shape),
        "dtype": str(stack.dtype),
        "channel": stack.channel,
        "n_planes": stack.n_planes,
        "output_axes": stack.output_axes,
        "pixel_size": stack.pixel_size.as_dict() if stack.pixel_size else None,
    }


__all__ = ["Stack", "describe", "open_stack", "stack_stem"]

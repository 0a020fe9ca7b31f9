"""Test-time views: the same prompt set decoded on moved and mirrored copies of its window.

A small native-scale model (ours) decodes masks on a 16 px token grid, so a mask follows the
grid: its edge lands where the grid puts it, not where the nucleus ends. Decoding a prompt set
again with the grid moved by half a token, and on mirrored copies of the window, and averaging
the probabilities, cancels much of that (DSB2018 box mIoU of ``micro`` 0.61 -> 0.68 with four
views), and the spread between views is uncertainty the model could not see from one view.

A :class:`View` is (grid shift in model pixels, horizontal flip, vertical flip, transpose).
The shift is applied by moving the window up and left by that many model pixels (reflecting
the plane where the window leaves it), so the window keeps its size and the encoder its cost;
the mirrors are exact and exactly undone. Test-time *scales* (:func:`resolve_scales`) decode the
same prompt set at zooms a quarter octave apart and average those too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sam import LABEL_BOX_BR, LABEL_BOX_TL

# half of the 16 px token grid of SAM2's image embedding
HALF_TOKEN = 8


@dataclass(frozen=True)
class View:
    shift: int = 0  # model pixels the token grid moves by (rows and columns)
    hflip: bool = False
    vflip: bool = False
    transpose: bool = False

    @property
    def identity(self) -> bool:
        return self == View()

    @property
    def tag(self) -> str:
        """A short name for cache keys and reports, e.g. 's8hv'."""
        if self.identity:
            return ""
        return f"s{self.shift}" + "h" * self.hflip + "v" * self.vflip + "t" * self.transpose

    def apply(self, crop: np.ndarray) -> np.ndarray:
        """(H, W[, C]) window crop -> the view's image."""
        if self.hflip:
            crop = crop[:, ::-1]
        if self.vflip:
            crop = crop[::-1]
        if self.transpose:
            crop = np.swapaxes(crop, 0, 1)
        # (a copy: ascontiguousarray keeps a mirrored axis of length 1 with its negative stride,
        # which torch cannot take, e.g. a plane one pixel high)
        return crop.copy() if self.hflip or self.vflip or self.transpose else np.ascontiguousarray(crop)

    def undo(self, maps: torch.Tensor) -> torch.Tensor:
        """(..., h, w) maps of the view's image -> maps in the window's orientation."""
        if self.transpose:
            maps = maps.transpose(-1, -2)
        dims = [d for d, on in ((-2, self.vflip), (-1, self.hflip)) if on]
        return maps.flip(dims) if dims else maps

    def prompts(self, local: np.ndarray, labels: list[int], shape: tuple[int, int]) -> np.ndarray:
        """(N, 2) (row, col) prompt coordinates in a window of ``shape`` -> in the view's image.

        A point is a pixel index (mirrored as ``n - 1 - i``); a box corner is a pixel edge
        (mirrored as ``n - x``), and a mirrored box's corners swap so that the top-left stays
        top-left: the prompts are what a user would give on the mirrored image.
        """
        pts = np.array(local, dtype=np.float64)
        h, w = shape
        is_corner = np.isin(labels, (LABEL_BOX_TL, LABEL_BOX_BR))
        if self.hflip:
            pts[:, 1] = np.where(is_corner, w - pts[:, 1], w - 1 - pts[:, 1])
        if self.vflip:
            pts[:, 0] = np.where(is_corner, h - pts[:, 0], h - 1 - pts[:, 0])
        if self.transpose:
            pts = pts[:, ::-1].copy()
        for i in range(len(labels) - 1):
            if labels[i] == LABEL_BOX_TL and labels[i + 1] == LABEL_BOX_BR:
                corners = pts[i : i + 2]
                pts[i], pts[i + 1] = corners.min(0), corners.max(0)
        return pts


# in the order they are added: the grid moved with a horizontal mirror, a vertical mirror, both
# mirrors moved, then the same four transposed
VIEWS = (
    View(),
    View(HALF_TOKEN, hflip=True),
    View(0, vflip=True),
    View(HALF_TOKEN, hflip=True, vflip=True),
    View(0, transpose=True),
    View(HALF_TOKEN, hflip=True, transpose=True),
    View(0, vflip=True, transpose=True),
    View(HALF_TOKEN, hflip=True, vflip=True, transpose=True),
)
VIEW_COUNTS = (1, 2, 4, 8)
# native-scale models (ours): four views (measured on DSB2018 with micro, 1 / 2 / 4 / 8 views:
# box mIoU 0.614 / 0.670 / 0.683 / 0.693 in the prototype); models that resize to 1024 px: one
DEFAULT_NATIVE_VIEWS = 4


def _count(config, name: str, value: int | str, counts: tuple[int, ...], native: int) -> int:
    """A test-time count option (``views``, ``scales``): 'auto' (``native`` for native-scale
    models, 1 for models that resize every image) or one of ``counts``, as a number or text."""
    given = value.strip().lower() if isinstance(value, str) else value
    if given == "auto":
        return native if config.input_scaling == "native" else 1
    try:
        count = int(given)
    except (TypeError, ValueError):
        count = None
    if count not in counts or (not isinstance(given, str) and count != given):
        raise ValueError(f"{name} must be 'auto' or one of {counts}, got {value!r}")
    return count


def resolve_views(config, views: int | str) -> tuple[View, ...]:
    """``Predictor(views=...)`` (or ``--views`` text): 'auto' or 1, 2, 4 or 8 -> the views."""
    return VIEWS[: _count(config, "views", views, VIEW_COUNTS, DEFAULT_NATIVE_VIEWS)]


SCALE_COUNTS = (1, 3, 5)
DEFAULT_NATIVE_SCALES = 3


def resolve_scales(config, scales: int | str) -> tuple[float, ...]:
    """``Predictor(scales=...)`` (or ``--scales`` text): 'auto', 1, 3 or 5 -> the zoom factors,
    quarter octaves apart around 1 (1 first)."""
    half = _count(config, "scales", scales, SCALE_COUNTS, DEFAULT_NATIVE_SCALES) // 2
    return (1.0,) + tuple(2.0 ** (k / 4) for k in range(-half, half + 1) if k)


def reflect_crop(plane: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """``plane[r0:r1, c0:c1]`` where ``r0``/``c0`` may be negative: rows and columns before the
    plane's start are its mirror image (the plane's own continuation, not a black border)."""
    r0, c0, r1, c1 = window
    crop = plane[max(r0, 0) : r1, max(c0, 0) : c1]
    pad = ((max(-r0, 0), 0), (max(-c0, 0), 0)) + ((0, 0),) * (plane.ndim - 2)
    if r0 >= 0 and c0 >= 0:
        return crop
    return np.pad(crop, pad, mode="symmetric")

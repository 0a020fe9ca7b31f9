"""Where a plane sits in the model input: scaled, then zero-padded to a multiple of 32.

Shared by the interactive predictor and the automatic segmenter, so both place pixels, and
therefore prompts and masks, identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .sam import INPUT_MULTIPLE


@dataclass(frozen=True)
class Frame:
    """A (h, w) plane scaled by ``scale`` to ``valid`` (vh, vw), padded to ``input_size``."""

    shape: tuple[int, int]
    scale: float
    valid: tuple[int, int]
    input_size: tuple[int, int]


ZOOM_LIMITS = (0.05, 8.0)  # the zooms a frame allows


def is_whole(value) -> bool:
    """Whether ``value`` is a whole number (a Python or numpy integer, not a bool): what counts
    (a cache size, a sample count, a seed, a grid side) is whole, and 2.5 or True is a mistake."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_zoom(zoom) -> float:
    """``zoom`` as a float, or a ValueError that says what is wrong with it."""
    try:
        value = float(zoom)
    except (TypeError, ValueError):
        raise ValueError(f"zoom must be a number, got {zoom!r}") from None
    if not (math.isfinite(value) and ZOOM_LIMITS[0] <= value <= ZOOM_LIMITS[1]):
        raise ValueError(f"zoom must be between {ZOOM_LIMITS[0]:g} and {ZOOM_LIMITS[1]:g} (1 = the image's own "
                         f"scale), got {zoom!r}")
    return value


def parse_zoom(zoom) -> float | str:
    """A ``zoom`` option (Predictor's, AutomaticSegmenter's): ``"auto"`` (each plane's own, see
    :mod:`~napari_ruac.model.scale`) or a number checked by :func:`check_zoom`."""
    if isinstance(zoom, str):
        if zoom.strip().lower() == "auto":
            return "auto"
        try:
            float(zoom)
        except ValueError:
            raise ValueError(f"zoom must be 'auto' or a number, got {zoom!r}") from None
    return check_zoom(zoom)


def frame_for(config: ModelConfig, shape: tuple[int, int], zoom: float = 1.0) -> Frame:
    """The frame of a plane of ``shape`` for a model.

    ``native`` models keep the pixel scale (times ``zoom``, which magnifies small crops) up to
    ``max_native_size`` and pad to at least ``image_size``; ``resize`` models scale the longest
    side to ``image_size`` as SAM does.
    """
    h, w = shape
    if config.input_scaling == "native":
        scale = min(float(zoom), config.max_native_size / max(h, w))
        vh, vw = max(1, round(h * scale)), max(1, round(w * scale))
        size = (max(config.image_size, ceil_to(vh)), max(config.image_size, ceil_to(vw)))
    else:
        scale = config.image_size / max(h, w)
        vh, vw = max(1, round(h * scale)), max(1, round(w * scale))
        size = (config.image_size, config.image_size)
    return Frame((h, w), scale, (vh, vw), size)


def to_model_input(x: torch.Tensor, frame: Frame) -> torch.Tensor:
    """(B, 3, h, w) images in [0, 1] -> (B, 3, H_in, W_in) resized and zero-padded."""
    if frame.valid != frame.shape:
        x = F.interpolate(x, size=frame.valid, mode="bilinear", align_corners=False, antialias=frame.scale < 1)
    pad_h = frame.input_size[0] - frame.valid[0]
    pad_w = frame.input_size[1] - frame.valid[1]
    return F.pad(x, (0, pad_w, 0, pad_h))


def ceil_to(n: int, multiple: int = INPUT_MULTIPLE) -> int:
    return int(math.ceil(n / multiple) * multiple)

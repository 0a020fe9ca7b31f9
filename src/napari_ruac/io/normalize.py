"""Checking and normalising microscopy planes for the model."""

from __future__ import annotations

import numpy as np


class ImageError(ValueError):
    """An image the model cannot take, with a message that names the problem."""


def validate_plane(image, name: str = "image") -> np.ndarray:
    """Return ``image`` as an ndarray of shape (H, W) or (H, W, C), C in {1, 3, 4}.

    Raises :class:`ImageError` for stacks (more than one plane), zero-size planes, non-numeric
    dtypes and NaN/inf values.
    """
    arr = np.asarray(image)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise ImageError(f"{name} has unsupported dtype {arr.dtype}; expected integers, floats or bool")
    if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4):
        raise ImageError(
            f"{name} has shape {arr.shape}: a 3-D array must be (H, W, C) with 1, 3 or 4 channels; "
            "for a z/t stack, pass one plane at a time"
        )
    if arr.ndim not in (2, 3):
        raise ImageError(
            f"{name} has {arr.ndim} dimensions {arr.shape}; expected one plane, (H, W) or (H, W, C)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name} is empty: shape {arr.shape} has a zero-size dimension")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise ImageError(
            f"{name} contains {n_bad} NaN or infinite values of {arr.size} (e.g. padding left by "
            "registration or deconvolution); replace them, e.g. with 0 or the background level, first"
        )
    return arr


def to_rgb_float(image, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """A validated plane as (H, W, 3) float32 in [0, 1].

    Grey and multi-channel microscopy is percentile-normalised (``low``/``high`` percentiles over
    all channels, so colour ratios survive); 8-bit RGB is scaled by 1/255, as it is already a
    display image. Grey becomes three equal channels; an alpha channel is dropped.
    """
    arr = validate_plane(image)
    if arr.ndim == 3:
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] == 4:
            arr = arr[..., :3]
    if arr.ndim == 3 and arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    else:
        out = percentile_normalize(arr, low, high)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=-1)
    return np.ascontiguousarray(out, dtype=np.float32)


def percentile_normalize(arr: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles to 0 and 1 and clip; constant planes give 0."""
    # float64 planes are mapped in float64: values beyond float32's range would become inf
    a = np.asarray(arr, dtype=np.float64 if np.asarray(arr).dtype == np.float64 else np.float32)
    lo, hi = np.percentile(a, [low, high])
    if hi <= lo:
        # nearly constant: fall back to the full range before giving up on contrast
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return np.zeros_like(a, dtype=np.float32)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)

"""How large the objects of a plane are, and the zoom that shows them at the size a model learned.

Our native-scale models learned nuclei of a limited size range; at other sizes their masks
fragment (large nuclei) or vanish (small ones), and automatic segmentation suffers most, since
no box tells it the size. ``zoom="auto"`` estimates the typical object diameter of a plane from
the scale of its strongest blobs (scale-normalised Laplacian of Gaussian, as in Lindeberg's
blob detection: a disc of diameter d responds most at sigma = d / (2 sqrt 2)) and chooses the
zoom that brings it to :data:`TARGET_DIAMETER` model pixels.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# the apparent diameter (model pixels) automatic segmentation with the shipped micro models
# works best at, by this estimator: on DSB2018 (estimate 26.9 px) and the confocal stack (38.1
# px) see README, Results; quarter-octave zoom steps as for boxes
TARGET_DIAMETER = 28.0
ZOOM_RANGE = (0.25, 4.0)
_STEP = 0.25  # octaves between sampled scales
_SIGMAS = 2.0 ** np.arange(0.0, 5.01, _STEP)  # 1 .. 32 px: diameters ~3 .. 90 px
# the response of a scale is this percentile of its map: the strongest blobs, robust to a few
# outliers (a single maximum follows the brightest speck, a median the background)
PERCENTILE = 99.0
# a blob response (scale-normalised, image in [0, 1]) below this is noise, not objects
MIN_RESPONSE = 0.05
# a larger plane is measured on its central part of this side: the estimate is a statistic of
# the strongest blobs, which a 768^2 part of a microscopy field holds as well as the whole, and
# the cost grows with the area (one core: 512^2 ~0.16 s, 2048^2 ~4 s whole, ~0.33 s this way)
MAX_MEASURED_SIDE = 768


def estimate_object_diameter(plane: np.ndarray) -> float | None:
    """Typical diameter in pixels of the bright (or, when most of the plane is bright, the
    dark) blobs of an (H, W) or (H, W, C) plane; None when it shows no blobs (empty, flat or
    pure noise planes). A plane larger than :data:`MAX_MEASURED_SIDE` is measured on its
    central part of that size."""
    x = np.asarray(plane)
    r0, c0 = (max(0, (n - MAX_MEASURED_SIDE) // 2) for n in x.shape[:2])
    wide = x.dtype == np.float64  # (values beyond float32's range would become inf)
    x = np.asarray(x[r0 : r0 + MAX_MEASURED_SIDE, c0 : c0 + MAX_MEASURED_SIDE], dtype=np.float64 if wide else np.float32)
    if x.ndim == 3:
        x = x.mean(-1)
    if x.ndim != 2 or min(x.shape) < 8 or not np.isfinite(x).all():
        return None
    lo, hi = np.percentile(x, (1.0, 99.5))
    if not hi > lo:
        return None
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32, copy=False)
    if np.median(x) > 0.5:  # dark objects on a bright background (brightfield)
        x = 1.0 - x
    strengths = []
    pyramid = {1: x}
    for sigma in _SIGMAS:
        if 4 * sigma > min(x.shape):  # the blob would not fit in the plane
            break
        # coarse scales on a block-averaged copy (sigma stays 2-4 px there): the normalised
        # response is scale-invariant, and a 512^2 plane takes ~50 ms instead of ~800
        f = int(2 ** max(0, math.floor(math.log2(sigma / 2.0))))
        if f not in pyramid:
            h, w = (x.shape[0] // f) * f, (x.shape[1] // f) * f
            pyramid[f] = x[:h, :w].reshape(h // f, f, w // f, f).mean((1, 3))
        s = float(sigma) / f
        response = -(s**2) * ndimage.gaussian_laplace(pyramid[f], s, mode="reflect")
        strengths.append(float(np.percentile(response, PERCENTILE)))
    if not strengths:
        return None
    i = int(np.argmax(strengths))
    # strongest at the finest scale: pixel noise (or objects too small to measure), not blobs
    if strengths[i] < MIN_RESPONSE or i == 0:
        return None
    log_sigma = float(np.log2(_SIGMAS[i]))
    if i + 1 < len(strengths):  # the peak between the sampled scales (parabola through three)
        a, b, c = strengths[i - 1], strengths[i], strengths[i + 1]
        curvature = a - 2 * b + c
        if curvature < 0:
            log_sigma += _STEP * float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5))
    return 2.0 * math.sqrt(2.0) * 2.0**log_sigma


def auto_zoom(plane: np.ndarray, target: float = TARGET_DIAMETER) -> float:
    """The zoom (quarter-octave steps in :data:`ZOOM_RANGE`) that shows the plane's typical
    object at ``target`` pixels; 1.0 when the plane shows no objects to measure."""
    if not (isinstance(target, (int, float, np.integer, np.floating)) and math.isfinite(target) and target > 0):
        raise ValueError(f"target must be a diameter in pixels > 0, got {target!r}")
    diameter = estimate_object_diameter(plane)
    if diameter is None:
        return 1.0
    octaves = round(4 * math.log2(target / diameter)) / 4
    return float(min(max(2.0**octaves, ZOOM_RANGE[0]), ZOOM_RANGE[1]))


def plane_zoom(config, plane: np.ndarray) -> float:
    """``zoom="auto"`` for a plane: :func:`auto_zoom` for native-scale models (ours); 1.0 for
    models that resize every plane to a fixed input (official SAM2.1), which ignore the zoom,
    and for 8-bit colour images (histology, colour cameras), where the strongest blobs are not
    the objects: on scikit-image's immunohistochemistry image (nuclei ~17 px) the estimate is
    the stained tissue's 90 px, and one click on a nucleus fell from 0.52 to 0.04 IoU."""
    if config.input_scaling != "native" or is_colour_image(plane):
        return 1.0
    return auto_zoom(plane)


def is_colour_image(plane: np.ndarray) -> bool:
    """An 8-bit RGB(A) plane: a display image (histology, a colour camera), not channels."""
    plane = np.asarray(plane)
    return plane.ndim == 3 and plane.shape[-1] in (3, 4) and plane.dtype == np.uint8

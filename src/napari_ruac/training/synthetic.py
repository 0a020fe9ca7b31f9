"""Synthetic microscopy: an endless source domain with exact instance masks.

Every image is a pure function of ``(seed, index)`` (a NumPy ``default_rng([seed, index])``),
so a training run can be resumed on exactly the same data without saving generator state.

Modes (weights in :class:`SynthConfig`):

* ``fluorescence``: bright nuclei on a dark background, touching and overlapping, textured
  chromatin, dome or flat intensity profiles, background gradients, blur, Poisson + Gaussian
  noise;
* ``cells``: densely packed cells (Voronoi cells grown from seeds, so neighbours share borders)
  with a dim cytoplasm, brighter membrane and a bright nucleus; the label is the cell;
* ``brightfield``: phase/brightfield-like objects (dark or bright interior, halo) on grey;
* ``histology``: H&E-like colour (Beer-Lambert mix of haematoxylin and eosin), nuclei purple on
  pink tissue; returned as 8-bit RGB, which the predictor scales by 1/255.

Outputs are raw images as a microscope would give them (float grey or uint8 RGB) and an int32
label map (0 = background); :func:`napari_ruac.io.normalize.to_rgb_float` turns an image into
the model's input exactly as the predictor does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

MODES = ("fluorescence", "cells", "brightfield", "histology")


@dataclass(frozen=True)
class SynthConfig:
    """What the generator draws from (all ranges inclusive)."""

    mode_weights: dict = field(
        default_factory=lambda: {"fluorescence": 0.55, "cells": 0.15, "brightfield": 0.15, "histology": 0.15}
    )
    diameter: tuple[float, float] = (8.0, 60.0)  # nuclei, pixels (log-uniform per image)
    cell_diameter: tuple[float, float] = (24.0, 80.0)
    coverage: tuple[float, float] = (0.08, 0.5)  # fraction of the area covered by objects
    max_objects: int = 160
    touching: tuple[float, float] = (0.0, 0.6)  # fraction of objects placed against another
    # None: centres anywhere (objects may hide most of one another, leaving crescent-shaped
    # labels no image evidence supports). A number: the centres of two objects stay at least
    # (1 - overlap) x the sum of their radii apart (0 = at most touching); an object that finds
    # no such place in a few tries is left out.
    overlap: float | None = None
    # Where an object's label ends. None: at the edge of its whole intensity profile, where a
    # dome-shaped nucleus has faded to the background, so the label is wider than the object
    # looks. A range: where the object's own (unblurred) profile has fallen to this fraction of
    # its peak (one fraction per image): annotators draw the visible edge, about half the peak
    # (on DSB2018 and the confocal stack the ground truth's edge lies between the pixels at
    # ~0.6 and ~0.4 of their nucleus's peak above the background). Fluorescence and H&E nuclei.
    edge_level: tuple[float, float] | None = None
    # None: an object's axis ratio squared (its "eccentricity") is drawn from 1 to 1.2 + 0.8 x
    # the image's irregularity (0.2-1.5), so few nuclei are long. A number: from 1 to this, for
    # every nucleus (fluorescence, brightfield and H&E); the same draws otherwise.
    elongation: float | None = None
    photons: tuple[float, float] = (15.0, 2000.0)  # peak photon count (log-uniform)
    read_noise: tuple[float, float] = (0.0, 0.04)
    blur: tuple[float, float] = (0.3, 2.0)

    @classmethod
    def from_dict(cls, data: dict | None) -> "SynthConfig":
        data = dict(data or {})
        for k, v in list(data.items()):
            if isinstance(v, list):
                data[k] = tuple(v)
        return cls(**data)


@dataclass
class SynthSample:
    """``image`` (H, W) float32 or (H, W, 3) uint8; ``labels`` (H, W) int32; ``mode``."""

    image: np.ndarray
    labels: np.ndarray
    mode: str


class SyntheticMicroscopy:
    """``gen.sample(index, size)`` -> :class:`SynthSample`, deterministic in (seed, index)."""

    def __init__(self, config: SynthConfig | None = None, seed: int = 0) -> None:
        self.config = config or SynthConfig()
        self.seed = int(seed)
        names = [m for m in MODES if self.config.mode_weights.get(m, 0) > 0]
        unknown = set(self.config.mode_weights) - set(MODES)
        if unknown or not names:
            raise ValueError(f"mode_weights must name some of {MODES}, got {self.config.mode_weights}")
        w = np.array([self.config.mode_weights[m] for m in names], dtype=float)
        self._modes, self._mode_p = names, w / w.sum()

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def sample(self, index: int, size: int | tuple[int, int] = 256, mode: str | None = None) -> SynthSample:
        h, w = (size, size) if isinstance(size, int) else size
        rng = self.rng(index)
        mode = mode or str(rng.choice(self._modes, p=self._mode_p))
        if mode not in MODES:
            raise ValueError(f"unknown synthetic mode {mode!r}; expected one of {MODES}")
        draw = {"fluorescence": _fluorescence, "cells": _cells, "brightfield": _brightfield,
                "histology": _histology}[mode]
        image, labels = draw(rng, (h, w), self.config)
        return SynthSample(image, labels, mode)


# ---------------------------------------------------------------------------------- geometry
def _log_uniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _place_centres(rng, shape, radii, touching, overlap=None):
    """Centres (n, 2) as (row, col) and the radii kept: uniform, but a fraction placed against
    an earlier object (touching or slightly overlapping), which is what makes crowded nuclei
    hard. With ``overlap`` set (see :class:`SynthConfig`), no two objects overlap by more."""
    h, w = shape
    n = len(radii)
    if overlap is None:
        centres = np.empty((n, 2))
        for i in range(n):
            if i > 0 and rng.random() < touching:
                j = rng.integers(0, i)
                ang = rng.uniform(0, 2 * math.pi)
                # 0.75..1.05 of the radius sum: from overlapping to just touching
                d = (radii[i] + radii[j]) * rng.uniform(0.75, 1.05)
                centres[i] = centres[j] + d * np.array([math.sin(ang), math.cos(ang)])
            else:
                centres[i] = rng.uniform([0, 0], [h, w])
        return centres, radii
    closest = 1.0 - overlap
    kept_c: list[np.ndarray] = []
    kept_r: list[float] = []
    for r in radii:
        for _ in range(12):
            if kept_c and rng.random() < touching:
                j = rng.integers(0, len(kept_c))
                ang = rng.uniform(0, 2 * math.pi)
                d = (r + kept_r[j]) * rng.uniform(closest, closest + 0.15)
                c = kept_c[j] + d * np.array([math.sin(ang), math.cos(ang)])
            else:
                c = rng.uniform([0, 0], [h, w])
            if kept_c:
                dist = np.hypot(*(np.asarray(kept_c) - c).T)
                if np.any(dist < closest * (r + np.asarray(kept_r)) - 1e-6):
                    continue
            kept_c.append(c)
            kept_r.append(float(r))
            break
    return np.asarray(kept_c, float).reshape(-1, 2), np.asarray(kept_r, float)


def _blob(rng, radius, irregularity, elongation=None):
    """A random star-shaped blob around (0, 0): returns a function rho(dy, dx) whose value
    is < 1 inside, plus the bounding radius. Ellipse x radial harmonics."""
    ecc = rng.uniform(1.0, elongation if elongation is not None else 1.0 + 0.8 * irregularity + 0.2)
    theta = rng.uniform(0, math.pi)
    a, b = radius * math.sqrt(ecc), radius / math.sqrt(ecc)
    ks = np.arange(2, 6)
    amps = rng.normal(0, 0.06 * irregularity, size=len(ks)) / ks * 2
    phases = rng.uniform(0, 2 * math.pi, size=len(ks))
    ct, st = math.cos(theta), math.sin(theta)

    def rho(dy, dx):
        u = (dx * ct + dy * st) / a
        v = (-dx * st + dy * ct) / b
        r = np.sqrt(u * u + v * v)
        phi = np.arctan2(v, u)
        wobble = 1.0 + sum(am * np.cos(k * phi + ph) for am, k, ph in zip(amps, ks, phases))
        return r / np.maximum(wobble, 0.5)

    return rho, max(a, b) * (1.0 + np.abs(amps).sum()) + 2


def _paint_objects(rng, shape, centres, radii, irregularity, profile_power, edge_level=None, elongation=None):
    """Paint objects in order (later ones occlude earlier ones in the label map).

    An object's intensity is ``(1 - rho**2) ** profile_power`` inside its outline (rho < 1);
    its label is the whole outline, or with ``edge_level`` only where that profile is at least
    this fraction of its peak (a flat profile is labelled to its outline either way).

    Returns the label map (H, W) int32 and the summed intensity profile (H, W) float32
    (fluorescence adds up where objects overlap).
    """
    # the profile falls to edge_level at rho_label: (1 - rho**2) ** p = level
    rho_label = 1.0
    if edge_level is not None and profile_power > 1e-3:
        rho_label = math.sqrt(max(0.0, 1.0 - edge_level ** (1.0 / profile_power)))
    h, w = shape
    labels = np.zeros(shape, np.int32)
    signal = np.zeros(shape, np.float32)
    next_label = 1
    for (cy, cx), r in zip(centres, radii):
        rho_fn, reach = _blob(rng, r, irregularity, elongation)
        r0, r1 = int(max(0, math.floor(cy - reach))), int(min(h, math.ceil(cy + reach) + 1))
        c0, c1 = int(max(0, math.floor(cx - reach))), int(min(w, math.ceil(cx + reach) + 1))
        if r1 <= r0 or c1 <= c0:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1]
        rho = rho_fn(yy + 0.5 - cy, xx + 0.5 - cx)
        inside = rho < 1.0
        labelled = inside if rho_label >= 1.0 else rho < rho_label
        if labelled.sum() < 6:  # objects cut to a sliver at the border are not worth a label
            continue
        brightness = rng.uniform(0.4, 1.0)
        prof = np.where(inside, brightness * (1.0 - np.minimum(rho, 1.0) ** 2) ** profile_power, 0.0)
        signal[r0:r1, c0:c1] += prof.astype(np.float32)
        labels[r0:r1, c0:c1][labelled] = next_label
        next_label += 1
    return _relabel(labels), signal


def _relabel(labels):
    """Drop labels that occlusion reduced to almost nothing; number the rest 1..n."""
    counts = np.bincount(labels.ravel())
    keep = counts >= 6
    keep[0] = False
    lut = np.zeros(len(counts), np.int32)
    lut[keep] = np.arange(1, keep.sum() + 1, dtype=np.int32)
    out = lut[labels]
    if out.max() == 0:
        return out
    return out


def _ensure_object(rng, shape, labels, signal):
    """An image must hold at least one object; add a centred nucleus if all were culled."""
    if labels.max() > 0:
        return labels, signal
    h, w = shape
    r = min(h, w) / 8
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < r * r
    labels = inside.astype(np.int32)
    signal = signal + 0.8 * inside.astype(np.float32)
    return labels, signal


def _smooth_noise(rng, shape, sigma):
    """Zero-mean, unit-std smooth random field (textures, background blobs)."""
    # draw at a coarse grid and blur there: much cheaper than blurring a full-size field
    f = max(1, int(sigma // 2))
    small = rng.standard_normal((shape[0] // f + 2, shape[1] // f + 2)).astype(np.float32)
    small = ndi.gaussian_filter(small, sigma / f, mode="wrap")
    field_ = ndi.zoom(small, f, order=1)[: shape[0], : shape[1]] if f > 1 else small[: shape[0], : shape[1]]
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def _background(rng, shape, level, gradient, blobs):
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gy, gx = rng.normal(0, gradient, size=2)
    bg = level + gy * (yy / h - 0.5) + gx * (xx / w - 0.5)
    if blobs > 0:
        bg = bg + blobs * _smooth_noise(rng, shape, rng.uniform(10, 30))
    return bg.astype(np.float32)


def _acquire(rng, clean, cfg: SynthConfig):
    """Blur, Poisson shot noise and Gaussian read noise of a camera; ``clean`` is >= 0."""
    img = ndi.gaussian_filter(clean, rng.uniform(*cfg.blur))
    photons = _log_uniform(rng, *cfg.photons)
    img = rng.poisson(np.clip(img, 0, None) * photons).astype(np.float32) / photons
    img += rng.normal(0, rng.uniform(*cfg.read_noise), size=img.shape).astype(np.float32)
    # a camera offset and gain, so absolute values carry no information
    return (img * rng.uniform(50, 3000) + rng.uniform(0, 500)).astype(np.float32)


def _object_set(rng, shape, cfg, diameter_range):
    h, w = shape
    d_mean = _log_uniform(rng, *diameter_range)
    coverage = rng.uniform(*cfg.coverage)
    n = int(np.clip(round(coverage * h * w / (math.pi * d_mean ** 2 / 4)), 1, cfg.max_objects))
    radii = d_mean / 2 * np.exp(rng.normal(0, 0.2, size=n))
    radii = np.clip(radii, diameter_range[0] / 2 * 0.8, diameter_range[1] / 2 * 1.2)
    return _place_centres(rng, shape, radii, rng.uniform(*cfg.touching), cfg.overlap)


# ---------------------------------------------------------------------------------- modes
def _edge_level(rng, cfg):
    """This image's annotation level (None: labels to the profile's edge); draws from ``rng``
    only when the config sets a range, so older recipes see the same images."""
    return None if cfg.edge_level is None else float(rng.uniform(*cfg.edge_level))


def _fluorescence(rng, shape, cfg):
    centres, radii = _object_set(rng, shape, cfg, cfg.diameter)
    level = _edge_level(rng, cfg)
    labels, signal = _paint_objects(rng, shape, centres, radii, rng.uniform(0.2, 1.5), rng.uniform(0.0, 0.8), level,
                                    cfg.elongation)
    labels, signal = _ensure_object(rng, shape, labels, signal)
    texture = _smooth_noise(rng, shape, rng.uniform(0.8, 3.0))
    signal = signal * (1.0 + rng.uniform(0.05, 0.4) * texture)
    bg = _background(rng, shape, rng.uniform(0.0, 0.25), rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.05))
    clean = np.clip(signal, 0, None) + np.clip(bg, 0, None)
    return _acquire(rng, clean, cfg), labels


def _cells(rng, shape, cfg):
    """Cells as seed-grown Voronoi regions limited to a radius: neighbours share borders."""
    h, w = shape
    centres, radii = _object_set(rng, shape, cfg, cfg.cell_diameter)
    seeds = np.zeros(shape, np.int32)
    rc = np.clip(np.round(centres).astype(int), 0, [h - 1, w - 1])
    seeds[rc[:, 0], rc[:, 1]] = np.arange(1, len(rc) + 1)
    dist, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix]
    # each cell reaches its own radius, roughened by a smooth field
    rough = 1.0 + 0.15 * _smooth_noise(rng, shape, 6.0)
    radius_map = np.concatenate([[0.0], radii])[owner]
    labels = np.where(dist < radius_map * rough, owner, 0).astype(np.int32)
    labels = _relabel(labels)
    if labels.max() == 0:
        return _fluorescence(rng, shape, cfg)
    boundary = labels != ndi.grey_erosion(labels, size=3)
    cyto = (labels > 0) * rng.uniform(0.15, 0.45)
    texture = _smooth_noise(rng, shape, rng.uniform(1.0, 3.0))
    signal = cyto * (1.0 + 0.3 * texture) + boundary * (labels > 0) * rng.uniform(0.0, 0.5)
    # a nucleus inside each cell, near its seed
    n_rad = radii * rng.uniform(0.25, 0.45)
    yy, xx = np.mgrid[0:h, 0:w]
    nuc_d2 = (yy - rc[owner - 1, 0]) ** 2 + (xx - rc[owner - 1, 1]) ** 2
    nuclei = (owner > 0) & (labels > 0) & (nuc_d2 < (np.concatenate([[0.0], n_rad])[owner]) ** 2)
    signal = signal + nuclei * rng.uniform(0.3, 1.0)
    bg = _background(rng, shape, rng.uniform(0.0, 0.15), rng.uniform(0.0, 0.15), rng.uniform(0.0, 0.03))
    clean = np.clip(signal.astype(np.float32), 0, None) + np.clip(bg, 0, None)
    return _acquire(rng, clean, cfg), labels


def _brightfield(rng, shape, cfg):
    """Phase-contrast/brightfield look: grey background, objects darker (or brighter) with a
    halo of opposite sign (difference of Gaussians of the object mask)."""
    diam = cfg.diameter if rng.random() < 0.6 else cfg.cell_diameter
    centres, radii = _object_set(rng, shape, cfg, diam)
    labels, signal = _paint_objects(rng, shape, centres, radii, rng.uniform(0.3, 1.5), rng.uniform(0.0, 0.5),
                                    elongation=cfg.elongation)
    labels, signal = _ensure_object(rng, shape, labels, signal)
    fg = (labels > 0).astype(np.float32)
    s = rng.uniform(1.0, 3.0)
    halo = ndi.gaussian_filter(fg, s) - ndi.gaussian_filter(fg, 2.5 * s)
    texture = _smooth_noise(rng, shape, rng.uniform(0.8, 2.5))
    polarity = -1.0 if rng.random() < 0.7 else 1.0
    contrast = rng.uniform(0.2, 0.6)
    obj = np.minimum(signal, 1.0) * (1.0 + 0.3 * texture)
    bg = _background(rng, shape, 0.5, rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.04))
    clean = bg + polarity * contrast * obj - polarity * rng.uniform(0.0, 1.2) * contrast * halo
    return _acquire(rng, np.clip(clean, 0.01, None), cfg), labels


_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)  # optical density per unit stain, RGB
_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)


def _histology(rng, shape, cfg):
    """H&E-like colour by Beer-Lambert: RGB = exp(-(c_H * OD_H + c_E * OD_E))."""
    centres, radii = _object_set(rng, shape, cfg, cfg.diameter)
    level = _edge_level(rng, cfg)
    labels, signal = _paint_objects(rng, shape, centres, radii, rng.uniform(0.3, 1.5), rng.uniform(0.0, 0.4), level,
                                    cfg.elongation)
    labels, signal = _ensure_object(rng, shape, labels, signal)
    fine = _smooth_noise(rng, shape, rng.uniform(0.8, 2.0))
    coarse = _smooth_noise(rng, shape, rng.uniform(8.0, 25.0))
    hema = np.minimum(signal, 1.2) * rng.uniform(0.6, 1.6) * (1.0 + 0.35 * fine)
    hema = ndi.gaussian_filter(hema, rng.uniform(0.3, 1.2)) + 0.05
    eosin = rng.uniform(0.1, 0.6) * (1.0 + 0.5 * coarse) * (labels == 0) + 0.05 * (labels > 0)
    eosin = np.clip(eosin + 0.1 * fine, 0, None)
    jitter_h = _HEMATOXYLIN * rng.uniform(0.8, 1.2, size=3)
    jitter_e = _EOSIN * rng.uniform(0.8, 1.2, size=3)
    od = hema[..., None] * jitter_h + eosin[..., None] * jitter_e
    rgb = np.exp(-od)
    rgb += rng.normal(0, rng.uniform(0.005, 0.03), size=rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8), labels


def generator_images_per_second(n: int = 40, size: int = 256, seed: int = 0) -> float:
    """Measured throughput of the generator plus normalisation on this process's core."""
    import time

    from ..io.normalize import to_rgb_float

    gen = SyntheticMicroscopy(seed=seed)
    t0 = time.perf_counter()
    for i in range(n):
        s = gen.sample(i, size)
        to_rgb_float(s.image)
    return n / (time.perf_counter() - t0)

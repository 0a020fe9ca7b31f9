"""Carry one object through a z-stack or a time series, plane by plane.

The object's mask on one plane becomes the prompts for the next plane (its bounding box plus
positive points at its most interior pixels), in both directions from the start plane, until the
object ends: an empty or tiny mask, a sudden collapse in area, a mask that no longer overlaps
the previous one (the prompts landed on a neighbour), or a mask over pixels that no longer
stand out from their surroundings (past the object's end a box prompt still gets a mask: the
model sees each plane percentile-normalised, so a plane of background noise looks like one
with objects, and a confocal nucleus was carried through all the empty planes above it).
Every plane records its mean uncertainty so the user can see where the result drifts and jump
to the worst plane.

Pure numpy/torch: no Qt, no napari. The model enters through a ``segment(index, prompt)``
callable, so the same loop serves the napari widget, scripts and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
from scipy import ndimage as ndi

from .frame import is_whole
from .predictor import Prediction, Predictor, Prompt

#: ``segment(plane_index, prompt) -> Prediction`` at that plane's size.
Segmenter = Callable[[int, Prompt], Prediction]


@dataclass(frozen=True)
class StopRule:
    """When propagation decides the object has ended.

    ``min_area``: fewer pixels than this means the object is gone. ``min_area_ratio``: a mask
    shrinking below this fraction of the previous plane's is a collapse, not the object tapering
    (nuclei taper over several planes). ``min_overlap``: the fraction of the new mask that must
    overlap the previous one (dilated by ``overlap_margin`` px to allow motion/drift); below it
    the prompts have latched onto something else. ``min_contrast_ratio`` (when the planes are
    given): the object's contrast in the image (:meth:`contrast`) must stay at least this
    fraction of the strongest contrast it had so far, with the same sign; below it the mask
    covers background (the sample confocal stack: 0.11-0.2 of it in the empty planes past a
    nucleus, 0.35-0.5 in its last, tapering planes).
    """

    min_area: int = 4
    min_area_ratio: float = 0.2
    min_overlap: float = 0.3
    overlap_margin: int = 2
    min_contrast_ratio: float | None = 0.25
    contrast_ring: tuple[int, int] = (2, 6)

    def contrast(self, plane: np.ndarray, mask: np.ndarray) -> float:
        """How much the object stands out in the (H, W) or (H, W, C) ``plane``: the median of the
        pixels under ``mask`` minus that of a ring around it (``contrast_ring`` px out); NaN when
        there is no ring (the mask fills the plane) or no mask."""
        if not mask.any():
            return float("nan")
        inner, outer = self.contrast_ring
        rows, cols = np.nonzero(mask)
        r0, c0 = max(0, rows.min() - outer - 1), max(0, cols.min() - outer - 1)
        r1, c1 = rows.max() + outer + 2, cols.max() + outer + 2
        # the object's neighbourhood only
        m, img = mask[r0:r1, c0:c1], np.asarray(np.asarray(plane)[r0:r1, c0:c1], dtype=np.float32)
        if img.ndim == 3:
            img = img.mean(-1)
        ring = ndi.binary_dilation(m, iterations=outer) & ~ndi.binary_dilation(m, iterations=inner)
        if not ring.any():
            return float("nan")
        return float(np.median(img[m]) - np.median(img[ring]))

    def faded(self, contrast: float, strongest: float) -> str | None:
        """A reason to stop when ``contrast`` is below ``min_contrast_ratio`` of ``strongest``
        (the contrast of largest magnitude so far; its sign says bright or dark objects)."""
        if self.min_contrast_ratio is None or not np.isfinite(contrast) or not np.isfinite(strongest) or strongest == 0:
            return None
        ratio = contrast / strongest
        if ratio < self.min_contrast_ratio:
            return (f"the object faded into its surroundings (contrast {ratio:.2f} of its strongest "
                    f"< {self.min_contrast_ratio})")
        return None

    def why_stop(self, mask: np.ndarray, previous: np.ndarray) -> str | None:
        """A reason to stop before ``mask`` (bool (H, W)) following ``previous``, or None."""
        area = int(mask.sum())
        if area < self.min_area:
            return f"object ended (area {area} px < {self.min_area})"
        prev_area = int(previous.sum())
        if prev_area and area < self.min_area_ratio * prev_area:
            return f"area collapsed from {prev_area} to {area} px"
        grown = ndi.binary_dilation(previous, iterations=self.overlap_margin) if self.overlap_margin else previous
        overlap = float((mask & grown).sum()) / area
        if overlap < self.min_overlap:
            return f"mask left the previous object (overlap {overlap:.2f} < {self.min_overlap})"
        return None


@dataclass
class PlaneResult:
    """One plane's share of a propagated object. ``mask`` bool (H, W)."""

    index: int
    mask: np.ndarray
    mean_uncertainty: float
    iou_score: float
    uncertainty: np.ndarray | None = None

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class PropagationResult:
    """All planes the object reached, keyed by plane index, and why each direction stopped."""

    start: int
    planes: dict[int, PlaneResult] = field(default_factory=dict)
    stop_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def indices(self) -> list[int]:
        return sorted(self.planes)

    def mean_uncertainty(self) -> dict[int, float]:
        """Plane index -> mean uncertainty inside the mask (the drift curve)."""
        return {i: self.planes[i].mean_uncertainty for i in self.indices}

    def worst_plane(self) -> int | None:
        """The plane whose mask is least certain (None when no plane has a recorded value)."""
        known = {i: p.mean_uncertainty for i, p in self.planes.items() if np.isfinite(p.mean_uncertainty)}
        if not known:
            return None
        return max(known, key=known.get)

    def to_volume(self, n_planes: int, shape: tuple[int, int]) -> np.ndarray:
        """A bool (n_planes, H, W) volume of the object."""
        vol = np.zeros((n_planes, *shape), dtype=bool)
        for i, plane in self.planes.items():
            vol[i] = plane.mask
        return vol


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool (H, W) mask (prompts for one object only)."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def prompt_from_mask(mask: np.ndarray, n_points: int = 1, box_margin: float = 2.0) -> Prompt:
    """Prompts for the next plane from this plane's bool (H, W) mask.

    A box around the largest component (grown by ``box_margin`` px so a growing object is not
    clipped) and ``n_points`` positive points at the most interior pixels: the maximum of the
    distance transform stays inside the object even when it moves a little between planes,
    whereas the centroid of a curved object can fall outside it.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be one plane's (H, W) mask, got shape {mask.shape}")
    mask = largest_component(mask)
    if not mask.any():
        raise ValueError("cannot make prompts from an empty mask")
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    box = (
        max(0.0, rows.min() - box_margin),
        max(0.0, cols.min() - box_margin),
        min(float(h), rows.max() + 1 + box_margin),
        min(float(w), cols.max() + 1 + box_margin),
    )
    dist = ndi.distance_transform_edt(mask)
    points = []
    for _ in range(max(0, n_points)):
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        if dist[r, c] <= 0:
            break
        points.append((float(r), float(c)))
        # keep later points away from the first so they add information
        rr, cc = np.ogrid[:h, :w]
        dist[(rr - r) ** 2 + (cc - c) ** 2 <= max(4.0, dist[r, c] ** 2)] = 0
    return Prompt(points=points or None, labels=[1] * len(points) or None, box=box)


def iter_propagate(
    segment: Segmenter,
    n_planes: int,
    start: int,
    start_mask: np.ndarray,
    directions: Sequence[int] = (1, -1),
    rule: StopRule = StopRule(),
    n_points: int = 1,
    keep_uncertainty: bool = False,
    get_plane: Callable[[int], np.ndarray] | None = None,
    plane_errors: tuple[type[BaseException], ...] = (ValueError,),
) -> Iterator[tuple[int, PlaneResult | None, str | None]]:
    """Propagate from ``start`` (whose bool (H, W) mask is given) through planes
    ``0..n_planes-1``; yields ``(direction, plane_result, stop_reason)`` once per plane tried, so
    a caller can show progress and stop early (a generator is simply not resumed).

    The start plane's own mask is kept as given. A plane that fails the stop rule is yielded with
    ``plane_result=None`` and the reason, and that direction ends. ``get_plane(index)`` (the
    stack's planes, as the segmenter sees them) lets the rule check that the object still stands
    out from its surroundings (``StopRule.min_contrast_ratio``); without it that check is off.

    A plane the segmenter fails on with one of ``plane_errors`` (``ValueError``: the image and
    prompt checks, e.g. an all-NaN plane) ends that direction like the stop rule does, with the
    reason ``"stopped at plane <i>: <message>"``; the other direction still runs. Any other
    error (out of memory, a bug) ends the whole run.
    """
    if not is_whole(start):
        raise TypeError(f"start must be a whole plane index, got {start!r}")
    if not isinstance(n_planes, (int, np.integer, float)) or not float(n_planes).is_integer():
        raise TypeError(f"n_planes must be a whole number of planes, got {n_planes!r}")
    if not 0 <= start < n_planes:
        raise IndexError(f"start plane {start} is outside the stack of {n_planes} planes")
    try:
        directions = tuple(directions)
    except TypeError:
        directions = (directions,)
    if not all(isinstance(d, (int, np.integer)) and d in (1, -1) for d in directions):
        # a step of 0 would segment the start's neighbour forever, 2 would skip planes
        raise ValueError(f"directions must hold 1 (forward) and/or -1 (backward), got {directions!r}")
    start_mask = np.asarray(start_mask, dtype=bool)
    if start_mask.ndim != 2:
        raise ValueError(f"start_mask must be the start plane's (H, W) mask, got shape {start_mask.shape}")
    if start_mask.sum() < rule.min_area:
        raise ValueError(
            f"the object on plane {start} has {int(start_mask.sum())} px: nothing to propagate"
        )
    check_contrast = get_plane is not None and rule.min_contrast_ratio is not None
    start_contrast = float("nan")
    if check_contrast:
        start_plane = np.asarray(get_plane(start))
        if start_plane.shape[:2] != start_mask.shape:
            raise ValueError(f"start_mask has shape {start_mask.shape} but plane {start} of the stack has "
                             f"{start_plane.shape}: the mask must cover the plane's (H, W)")
        start_contrast = rule.contrast(start_plane, start_mask)
    for direction in directions:
        previous = start_mask
        strongest = start_contrast
        index = start + direction
        while 0 <= index < n_planes:
            prompt = prompt_from_mask(previous, n_points=n_points)
            try:
                pred = segment(index, prompt)
            except plane_errors as exc:
                yield direction, None, f"stopped at plane {index}: {str(exc) or type(exc).__name__}"
                break
            if pred.mask.shape != start_mask.shape:
                raise ValueError(f"start_mask has shape {start_mask.shape} but the mask of plane {index} has "
                                 f"{pred.mask.shape}: the start mask must cover the stack's planes")
            mask = largest_component(pred.mask)
            reason = rule.why_stop(mask, previous)
            if reason is None and check_contrast:
                contrast = rule.contrast(get_plane(index), mask)
                reason = rule.faded(contrast, strongest)
                # a kept plane has the sign of the strongest, so only magnitudes compare (NaN:
                # none measured yet)
                if reason is None and np.isfinite(contrast) and not abs(strongest) >= abs(contrast):
                    strongest = contrast
            if reason is not None:
                yield direction, None, f"plane {index}: {reason}"
                break
            unc = pred.uncertainty
            result = PlaneResult(
                index=index,
                mask=mask,
                mean_uncertainty=float(unc[mask].mean()),
                iou_score=float(pred.iou_score),
                uncertainty=unc if keep_uncertainty else None,
            )
            yield direction, result, None
            previous = mask
            index += direction


def propagate(
    segment: Segmenter,
    n_planes: int,
    start: int,
    start_mask: np.ndarray,
    start_uncertainty: np.ndarray | None = None,
    start_iou: float = float("nan"),
    **kwargs,
) -> PropagationResult:
    """Run :func:`iter_propagate` to the end in both directions and collect the planes.

    ``start_uncertainty`` (float (H, W)) gives the start plane's mean uncertainty in the record.
    """
    start_mask = np.asarray(start_mask, dtype=bool)
    if start_uncertainty is not None and np.shape(start_uncertainty) != start_mask.shape:
        raise ValueError(f"start_uncertainty has shape {np.shape(start_uncertainty)} but start_mask has "
                         f"{start_mask.shape}: give the start plane's (H, W) uncertainty map")
    mean_u = float(start_uncertainty[start_mask].mean()) if start_uncertainty is not None and start_mask.any() else float("nan")
    result = PropagationResult(start=start)
    result.planes[start] = PlaneResult(start, start_mask, mean_u, start_iou)
    for direction, plane, reason in iter_propagate(segment, n_planes, start, start_mask, **kwargs):
        key = "forward" if direction > 0 else "backward"
        if plane is not None:
            result.planes[plane.index] = plane
        if reason is not None:
            result.stop_reasons[key] = reason
    for key, direction in (("forward", 1), ("backward", -1)):
        edge = max(result.planes) if direction > 0 else min(result.planes)
        result.stop_reasons.setdefault(key, f"reached the end of the stack at plane {edge}")
    return result


def predictor_segmenter(
    predictor: Predictor,
    get_plane: Callable[[int], np.ndarray],
    mode: str | None = None,
) -> Segmenter:
    """A :data:`Segmenter` from a :class:`Predictor` and ``get_plane(index) -> (H, W[, C])``
    array (the stack may be lazy, e.g. dask: one plane is read at a time). The predictor's
    embedding cache makes revisiting planes cheap."""

    def segment(index: int, prompt: Prompt) -> Prediction:
        predictor.set_image(np.asarray(get_plane(index)))
        return predictor.predict(points=prompt.points, labels=prompt.labels, box=prompt.box, mode=mode)

    return segment

"""How well one click plus propagation segments whole objects through a stack.

Two measures of what the annotator's *Propagate* gives, beside the per-plane metrics of
:mod:`napari_ruac.evaluate`:

- :func:`propagation_ious`: a 3D label stack; every object clicked once at the innermost pixel of
  its largest section and carried through the stack in both directions; its 3D IoU with the
  object (``scripts/evaluate_propagation.py`` on the real 3D targets).
- :func:`follow_tracks`: a time-lapse without masks but with tracks of object centres; every
  track clicked at its point in its first frame and carried through the later frames; a frame is
  **followed** when the mask holds the track's point and no other track's
  (``scripts/evaluate_tracking.py`` on the real time-lapse).

Pure numpy/torch, no Qt: the same propagation loop the widget runs
(:mod:`napari_ruac.model.propagation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .evaluate import auroc
from .model.predictor import Predictor
from .model.propagation import StopRule, predictor_segmenter, propagate

Point = tuple[int, int]


def objects_3d(labels: np.ndarray) -> list[tuple[int, int, Point]]:
    """(id, plane of its largest section, innermost pixel there) for every object of a
    (Z, H, W) label stack, in id order."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"need a (planes, rows, columns) label stack, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"the label stack is empty: shape {labels.shape}")
    if labels.dtype.kind not in "biuf" or (labels.dtype.kind == "f" and not (np.isfinite(labels).all()
                                                                           and (labels == np.round(labels)).all())):
        raise ValueError(f"labels must hold whole-number object ids (0 = background), got dtype {labels.dtype}"
                         + (" with fractional or NaN values" if labels.dtype.kind == "f" else ""))
    out = []
    found = ndi.find_objects(labels.astype(np.int64, copy=False))
    for i, where in enumerate(found, start=1):
        if where is None:
            continue
        obj = labels[where] == i
        z = int(np.argmax(obj.sum((1, 2))))
        # background around the crop, but not past the image's own edge (as on the whole plane)
        pad = tuple((int(s.start > 0), int(s.stop < n)) for s, n in zip(where[1:], labels.shape[1:]))
        dist = ndi.distance_transform_edt(np.pad(obj[z], pad))
        dist = dist[pad[0][0]:pad[0][0] + obj.shape[1], pad[1][0]:pad[1][0] + obj.shape[2]]
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        out.append((i, where[0].start + z, (where[1].start + int(r), where[2].start + int(c))))
    return out


def propagation_ious(model, image: np.ndarray, labels: np.ndarray, objects=None, *, zoom=1.0,
                     rule: StopRule | None = None) -> list[float]:
    """3D IoU of one click plus propagation with each object (``objects`` from
    :func:`objects_3d` by default): the click on the object's largest section, the result
    carried both ways with ``rule`` (the annotator's default), each plane seen at ``zoom``.
    An object whose first mask is smaller than ``rule.min_area`` scores 0."""
    image, labels = np.asarray(image), np.asarray(labels)
    if image.shape[:3] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in their planes, rows or columns")
    rule = rule or StopRule()
    objects = objects_3d(labels) if objects is None else objects
    for i, z, point in objects:
        if not (isinstance(z, (int, np.integer)) and 0 <= z < len(image)):
            raise ValueError(f"object {i}: plane {z!r} is outside the stack of {len(image)} planes")
    predictor = Predictor(model, zoom=zoom, cache_size=2 * len(image))
    segment = predictor_segmenter(predictor, lambda k: image[k])
    ious = []
    for i, z, point in objects:
        predictor.set_image(image[z])
        mask = predictor.predict(points=[point]).mask
        truth = labels == i
        if mask.sum() < rule.min_area:
            ious.append(0.0)
            continue
        result = propagate(segment, len(image), z, mask, rule=rule, get_plane=lambda k: image[k])
        vol = result.to_volume(len(image), labels.shape[1:])
        ious.append(float((vol & truth).sum() / (vol | truth).sum()))
    return ious


def points_by_frame(tracks: np.ndarray) -> dict[int, dict[int, Point]]:
    """frame -> {track id: (row, col)} from an (N, 4) array of (track id, frame, row, col)."""
    tracks = np.asarray(tracks)
    if tracks.ndim != 2 or tracks.shape[1] != 4:
        raise ValueError(f"tracks must be an (N, 4) array of track id, frame, row, column; got shape {tracks.shape}")
    if tracks.dtype.kind not in "biuf":
        raise ValueError(f"tracks must hold numbers (track id, frame, row, column), got dtype {tracks.dtype}")
    if not np.isfinite(tracks).all():
        raise ValueError("tracks hold NaN or infinite values")
    if len(tracks) == 0:
        raise ValueError("tracks is empty: give at least one (track id, frame, row, column) row")
    if not (tracks[:, :2] == np.round(tracks[:, :2])).all():
        raise ValueError("tracks' track ids and frames must be whole numbers (rows and columns may be fractional)")
    out: dict[int, dict[int, Point]] = {}
    for tid, t, r, c in tracks:
        out.setdefault(int(t), {})[int(tid)] = (int(round(r)), int(round(c)))
    return out


def followed(mask: np.ndarray | None, tid: int, points: dict[int, Point]) -> bool:
    """Whether ``mask`` holds track ``tid``'s point and no other track's (a mask that swallowed
    a neighbour does not follow its own nucleus)."""
    if mask is None:
        return False
    h, w = mask.shape

    def holds(p: Point) -> bool:
        return 0 <= p[0] < h and 0 <= p[1] < w and bool(mask[p])

    return holds(points[tid]) and not any(holds(p) for other, p in points.items() if other != tid)


@dataclass
class TrackingReport:
    """What :func:`follow_tracks` measured (fractions are of the frames after each click)."""

    tracks: int  # tracks with at least one frame after their first
    frames: int  # frames after the click, over all tracks
    followed: float  # fraction followed by propagation
    held_still: float  # fraction followed by the first frame's mask, not moved
    whole: int  # tracks followed in every frame
    first_area: float  # median mask area in the clicked frame (px)
    area: float  # median mask area in the later frames with a mask (px)
    lost_with_mask: int  # later frames with a mask that are not followed
    auroc: float  # of a frame's mean uncertainty for that frame being lost (NaN without both kinds)


def follow_tracks(model, frames: np.ndarray, tracks: np.ndarray, *, zoom="auto",
                  rule: StopRule | None = None) -> TrackingReport:
    """One click per track at its first frame, propagated through the later frames of the
    (T, H, W) ``frames``, scored against the (N, 4) ``tracks`` (track id, frame, row, col)."""
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"need a (frames, rows, columns) time-lapse, got shape {frames.shape}")
    by_frame = points_by_frame(tracks)
    tracks = np.asarray(tracks)
    if min(by_frame) < 0 or max(by_frame) >= len(frames):
        raise ValueError(f"tracks name frames {min(by_frame)}..{max(by_frame)}; the time-lapse has {len(frames)}")
    rule = rule or StopRule()
    predictor = Predictor(model, zoom=zoom, cache_size=2 * len(frames))
    segment = predictor_segmenter(predictor, lambda k: frames[k])
    n_frames = scored = hits = still_hits = whole = 0
    first_areas, areas, frame_unc, frame_lost = [], [], [], []
    for tid in (int(v) for v in np.unique(tracks[:, 0])):
        own = sorted({int(t) for t in tracks[tracks[:, 0] == tid, 1]})
        start = own[0]
        predictor.set_image(frames[start])
        first = predictor.predict(points=[by_frame[start][tid]]).mask
        masks, unc = {}, {}
        if first.sum() >= rule.min_area:
            result = propagate(segment, len(frames), start, first, rule=rule, get_plane=lambda k: frames[k])
            masks = {k: p.mask for k, p in result.planes.items()}
            unc = {k: p.mean_uncertainty for k, p in result.planes.items()}
        later = own[1:]  # the click's own frame says nothing about following
        first_areas.append(int(first.sum()))
        areas += [int(masks[t].sum()) for t in later if t in masks]
        got = [followed(masks.get(t), tid, by_frame[t]) for t in later]
        for t, ok in zip(later, got):
            if t in unc and np.isfinite(unc[t]):
                frame_unc.append(unc[t])
                frame_lost.append(not ok)
        n_frames += len(later)
        hits += sum(got)
        still_hits += sum(followed(first, tid, by_frame[t]) for t in later)
        whole += bool(later) and all(got)
        scored += bool(later)
    return TrackingReport(
        tracks=scored, frames=n_frames, followed=hits / max(n_frames, 1), held_still=still_hits / max(n_frames, 1),
        whole=whole, first_area=float(np.median(first_areas)) if first_areas else 0.0,
        area=float(np.median(areas)) if areas else 0.0, lost_with_mask=int(sum(frame_lost)),
        auroc=auroc(np.array(frame_unc, float), np.array(frame_lost, bool)))

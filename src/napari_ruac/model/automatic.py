"""Automatic instance segmentation with per-pixel uncertainty ("segment everything").

A grid of single-point prompts is decoded in batches (one encoder pass per crop, one decoder
pass per ``points_per_batch`` points, fewer on a CPU when that keeps a pass in the caches), the
candidate masks are filtered by predicted IoU, stability and mean uncertainty, de-duplicated by
box NMS and resolved into one label image.

Two steps SAM2's generator does not take, on by default because they are what made a grid
work with our small models (the tests' 5-disc image: 3 -> 5 found): a click's mask must hold the
click (``point_in_mask``; a click on the
background between nuclei otherwise returns a neighbour, or a piece of one), and every surviving
mask is clicked again at its centroid (``refine_rounds``), so the fragments that clicks near an
object's edge give converge on the whole object. Models trained from scratch by our stage-1
recipes never trained their multimask tokens and IoU head (:func:`trained_heads`): for them
the segmenter decodes one mask per click, leaves the IoU filter off, ranks candidates by their
own confidence, ``stability x (1 - mean uncertainty)``, and asks for a stability of 0.5 rather
than SAM's 0.8 (their logits are softer: whole nuclei score 0.5-0.8). Their masks for clicks
off an object's centre are pieces of it around the click, so candidates that overlap by half of
the smaller are merged into one object before resolution (:func:`merge_fragments`; on DSB2018
nuclei F1 at IoU 0.5 0.10 -> 0.32, held-out synthetic 0.47 -> 0.54). Last, for those models, every
object of the resolved label image is clicked once more at its innermost pixel and decoded as
an interactive click is (``reclick``: :class:`~napari_ruac.model.Predictor`'s context window and
test-time views), and the label image is resolved again from those masks (DSB2018 F1 0.32 ->
0.55).

Resolution rule (what "the uncertainty of the decision" means): every kept candidate ``k`` gives
a foreground probability ``p_k(x)``. A pixel belongs to ``argmax_k p_k(x)`` if that maximum
exceeds 0.5, else to the background; its uncertainty is the binary entropy (bits) of that
maximum, i.e. of the probability behind the label it received. Where no candidate reaches the
pixel, ``p = 0`` and the uncertainty is 0.

Why it is faster than SAM2's ``SAM2AutomaticMaskGenerator`` on the same grid: the IoU and
stability filters run on the decoder's 1/4-resolution logits, and only the survivors are
brought to full resolution, inside a window around each mask (SAM2 upsamples every candidate to
the full image and run-length encodes it).

Planes larger than the model's input are split into overlapping tiles (:mod:`.tiling`); each
tile runs the crop pyramid below and the tiles' candidates are stitched before resolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io.normalize import to_rgb_float, validate_plane
from .frame import Frame, frame_for, is_whole, parse_zoom, to_model_input
from .sam import LABEL_POS, RuacSam
from .views import resolve_scales, resolve_views
from .weibull import binary_entropy

Box = tuple[int, int, int, int]  # (row0, col0, row1, col1), end-exclusive, plane pixels


# ---------------------------------------------------------------------------- results
@dataclass
class ObjectInfo:
    """One instance of a label image: ``area`` in pixels, ``mean_uncertainty`` over its pixels
    (bits, 0..1), ``iou_score`` the decoder's predicted IoU of the mask it came from."""

    label: int
    area: int
    mean_uncertainty: float
    iou_score: float
    stability: float = 1.0
    bbox: Box = (0, 0, 0, 0)


@dataclass
class AutoStats:
    """What the segmenter did (counts, for tests, logs and benchmarks)."""

    n_crops: int = 0
    n_points: int = 0
    n_encoder_calls: int = 0
    n_decoder_calls: int = 0
    n_masks_decoded: int = 0
    n_after_filters: int = 0
    n_after_nms: int = 0
    n_objects: int = 0

    def add(self, other: "AutoStats") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class AutoResult:
    """``labels`` int32 (H, W), 0 = background; ``uncertainty`` float32 (H, W) in [0, 1];
    ``objects`` one :class:`ObjectInfo` per label, in label order."""

    labels: np.ndarray
    uncertainty: np.ndarray
    objects: list[ObjectInfo]
    stats: AutoStats = field(default_factory=AutoStats)
    zoom: float = 1.0  # the zoom the plane was seen at (its own estimate with zoom="auto")


@dataclass
class MaskCandidate:
    """A candidate mask, stored as full-resolution logits inside a window around it.

    ``window`` (r0, c0, r1, c1) in plane pixels; ``logits`` float32 (r1-r0, c1-c0), the mask is
    ``logits > 0`` and outside the window the candidate's probability is taken as 0.
    ``box`` is the mask's tight bounding box; ``source`` the crop or tile it was decoded in
    (its edges that are not plane edges make a mask suspect: it may be cut off there).
    """

    window: Box
    logits: np.ndarray
    box: Box
    area: int
    iou_score: float
    stability: float
    mean_uncertainty: float
    source: Box
    layer: int = 0
    # what NMS ranks by when set (see AutomaticSegmenter's rank_by); else the predicted IoU
    quality: float | None = None

    def rank(self) -> float:
        return self.iou_score if self.quality is None else self.quality

    def shifted(self, dr: int, dc: int) -> "MaskCandidate":
        """The same candidate in a frame whose origin lies at (-dr, -dc)."""
        return replace(
            self,
            window=_shift(self.window, dr, dc),
            box=_shift(self.box, dr, dc),
            source=_shift(self.source, dr, dc),
        )


def _shift(box: Box, dr: int, dc: int) -> Box:
    return (box[0] + dr, box[1] + dc, box[2] + dr, box[3] + dc)


def _check_options(**options) -> None:
    """AutomaticSegmenter's numeric options, or a ValueError naming the first that cannot be used
    (a NaN threshold, for one, silently dropped every mask)."""
    wholes = {"crop_n_layers": 0, "crop_n_points_downscale_factor": 1, "window_margin": 0, "samples": 1,
              "min_area": None, "seed": None}
    for name, low in wholes.items():
        value = options[name]
        if not is_whole(value) or (low is not None and value < low):
            more = "" if low is None else f" >= {low}"
            raise ValueError(f"{name} must be a whole number{more}, got {value!r}")
    fractions = {"crop_overlap_ratio": (0.0, 1.0, False), "box_nms_thresh": (0.0, 1.0, True),
                 "crop_nms_thresh": (0.0, 1.0, True)}
    for name, value in options.items():
        if name in wholes or (value is None and name in ("pred_iou_thresh", "stability_score_thresh")):
            continue
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        ok = ok and math.isfinite(value)
        if ok and name in fractions:
            low, high, closed = fractions[name]
            ok = low <= value <= high if closed else low <= value < high
        if not ok:
            low_high = fractions.get(name)
            what = "a finite number" if low_high is None else (
                f"a fraction in [{low_high[0]:g}, {low_high[1]:g}{']' if low_high[2] else ')'}")
            raise ValueError(f"{name} must be {what}, got {value!r}")


# ---------------------------------------------------------------------------- geometry
def point_grid(n_per_side: int) -> np.ndarray:
    """(n², 2) points (row, col) as fractions of the crop size, at cell centres."""
    if not is_whole(n_per_side) or n_per_side < 1:
        raise ValueError(f"points_per_side must be a whole number >= 1, got {n_per_side!r}")
    offsets = (np.arange(n_per_side) + 0.5) / n_per_side
    rows, cols = np.meshgrid(offsets, offsets, indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1)


def crop_boxes(shape: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[tuple[Box, int]]:
    """Crops of the zoom pyramid: layer 0 is the whole plane, layer i has 2^i x 2^i crops
    overlapping by ``overlap_ratio`` of the shorter side (as in SAM)."""
    h, w = shape
    boxes: list[tuple[Box, int]] = [((0, 0, h, w), 0)]
    short = min(h, w)
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * short * (2 / n))
        ch = int(math.ceil((overlap * (n - 1) + h) / n))
        cw = int(math.ceil((overlap * (n - 1) + w) / n))
        for i in range(n):
            for j in range(n):
                r0, c0 = (ch - overlap) * i, (cw - overlap) * j
                boxes.append(((r0, c0, min(r0 + ch, h), min(c0 + cw, w)), layer))
    return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes (N, 4) and (M, 4), end-exclusive (r0, c0, r1, c1) -> (N, M)."""
    a = a.astype(np.float64)[:, None]
    b = b.astype(np.float64)[None]
    ih = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iw = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ih * iw
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def box_nms(
    candidates: Sequence[MaskCandidate],
    iou_thresh: float,
    score: Callable[[MaskCandidate], float] = lambda c: c.rank(),
) -> list[MaskCandidate]:
    """Greedy NMS on mask bounding boxes: best score first; ties keep the earlier candidate.

    Returns the survivors in descending score order.
    """
    if not candidates:
        return []
    scores = np.array([score(c) for c in candidates], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    boxes = np.array([candidates[i].box for i in order])
    iou = box_iou(boxes, boxes)
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for rank in range(len(order)):
        if suppressed[rank]:
            continue
        keep.append(candidates[order[rank]])
        suppressed |= iou[rank] > iou_thresh
    return keep


def drop_cut_candidates(
    candidates: Sequence[MaskCandidate], plane_shape: tuple[int, int], tolerance: int = 2
) -> list[MaskCandidate]:
    """Drop masks that touch an edge of their crop/tile that is not an edge of the plane: they
    are probably cut off there, and a neighbouring crop or tile holds the whole object."""
    h, w = plane_shape
    kept = []
    for c in candidates:
        s, b = c.source, c.box
        cut = (
            (s[0] > 0 and b[0] <= s[0] + tolerance)
            or (s[1] > 0 and b[1] <= s[1] + tolerance)
            or (s[2] < h and b[2] >= s[2] - tolerance)
            or (s[3] < w and b[3] >= s[3] - tolerance)
        )
        if not cut:
            kept.append(c)
    return kept


# ---------------------------------------------------------------------------- merging
# the logit a merged candidate takes where a member's window does not reach (probability ~0)
_OUTSIDE_LOGIT = -30.0


def merge_fragments(candidates: Sequence[MaskCandidate], overlap: float) -> list[MaskCandidate]:
    """Merge candidates whose masks overlap by at least ``overlap`` of the smaller one (0: off).

    Clicks spread over one object by the grid can each return a piece of it around the click;
    box NMS keeps such pieces (their boxes differ) and resolution would then cut the object into
    cells along the lines where the pieces' probabilities cross. Pieces of one object overlap
    much more than masks of two touching objects do, so overlapping candidates are joined
    (transitively: union-find over the pairs whose boxes intersect) into one candidate whose logit
    is the maximum of its members' and whose scores are the best member's. Returns candidates
    that were not merged unchanged, merged ones in the position of their best member.
    """
    n = len(candidates)
    if n < 2 or overlap <= 0:
        return list(candidates)
    boxes = np.array([c.box for c in candidates])
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # a sweep over the boxes sorted by first row: each pair whose boxes intersect is tested
    # once, without an n x n matrix (a large plane has thousands of candidates)
    order = np.argsort(boxes[:, 0], kind="stable")
    for pos, i in enumerate(order):
        for j in order[pos + 1 :]:
            if boxes[j, 0] >= boxes[i, 2]:
                break
            if boxes[j, 1] >= boxes[i, 3] or boxes[i, 1] >= boxes[j, 3]:
                continue
            a, b = candidates[int(i)], candidates[int(j)]
            inter = _mask_intersection(a, b)
            if inter and inter >= overlap * min(a.area, b.area):
                ri, rj = find(int(i)), find(int(j))
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)  # the earlier (better) candidate leads
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [candidates[g[0]] if len(g) == 1 else _merged([candidates[i] for i in g]) for g in groups.values()]


def _mask_intersection(a: MaskCandidate, b: MaskCandidate) -> int:
    """Pixels inside both masks (``logits > 0``), computed on the overlap of their windows."""
    r0, c0 = max(a.window[0], b.window[0]), max(a.window[1], b.window[1])
    r1, c1 = min(a.window[2], b.window[2]), min(a.window[3], b.window[3])
    if r1 <= r0 or c1 <= c0:
        return 0
    ma = a.logits[r0 - a.window[0] : r1 - a.window[0], c0 - a.window[1] : c1 - a.window[1]] > 0
    mb = b.logits[r0 - b.window[0] : r1 - b.window[0], c0 - b.window[1] : c1 - b.window[1]] > 0
    return int(np.count_nonzero(ma & mb))


def _merged(members: list[MaskCandidate]) -> MaskCandidate:
    """One candidate from ``members`` (best first): maximum logit over the union window."""
    wins = np.array([c.window for c in members])
    window = (int(wins[:, 0].min()), int(wins[:, 1].min()), int(wins[:, 2].max()), int(wins[:, 3].max()))
    logits = np.full((window[2] - window[0], window[3] - window[1]), _OUTSIDE_LOGIT, dtype=np.float32)
    for c in members:
        r0, c0 = c.window[0] - window[0], c.window[1] - window[1]
        view = logits[r0 : r0 + c.logits.shape[0], c0 : c0 + c.logits.shape[1]]
        np.maximum(view, c.logits, out=view)
    mask = logits > 0
    rr, cc = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    best = members[0]
    return replace(
        best,
        window=window,
        logits=logits,
        box=(window[0] + int(rr[0]), window[1] + int(cc[0]), window[0] + int(rr[-1]) + 1, window[1] + int(cc[-1]) + 1),
        area=int(mask.sum()),
        iou_score=max(c.iou_score for c in members),
        stability=max(c.stability for c in members),
        mean_uncertainty=min(c.mean_uncertainty for c in members),
    )


# ---------------------------------------------------------------------------- resolution
def resolve_labels(
    candidates: Sequence[MaskCandidate], shape: tuple[int, int], min_area: int = 0,
    min_kept: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, list[ObjectInfo]]:
    """Label image, per-pixel decision uncertainty and per-object statistics.

    Each pixel takes the candidate of highest probability if it exceeds 0.5 (ties: the earlier
    candidate); its uncertainty is the binary entropy of that probability. Instances smaller
    than ``min_area`` pixels after resolution, or keeping less than ``min_kept`` of their own
    mask (the rest went to more probable candidates: a duplicate or a fragment), are returned to
    the background. Labels are
    numbered 1..N in raster order of each instance's first pixel, so the numbering does not
    depend on the order the candidates were found in.

    Returns ``labels`` int32 (H, W), ``uncertainty`` float32 (H, W), ``objects``.
    """
    h, w = shape
    best_p = np.zeros((h, w), dtype=np.float32)
    owner = np.zeros((h, w), dtype=np.int32)  # index + 1 into candidates
    for k, cand in enumerate(candidates):
        r0, c0, r1, c1 = cand.window
        p = _sigmoid(cand.logits)
        view_p = best_p[r0:r1, c0:c1]
        better = p > view_p
        view_p[better] = p[better]
        owner[r0:r1, c0:c1][better] = k + 1
    # "+ 0.0" turns the -0.0 that the entropy gives at p = 0 into +0.0 (clean TIFF bytes)
    uncertainty = np.clip(binary_entropy(torch.from_numpy(best_p)).numpy(), 0.0, 1.0).astype(np.float32) + 0.0
    owner[best_p <= 0.5] = 0
    areas = np.bincount(owner.ravel(), minlength=len(candidates) + 1)
    small = np.flatnonzero(areas < max(min_area, 1))
    if min_kept > 0:
        # a candidate that kept less than min_kept of its own mask is mostly another object's
        own = np.array([0] + [c.area for c in candidates], dtype=np.float64)
        small = np.union1d(small, np.flatnonzero(areas < min_kept * own))
    if small.size:
        owner[np.isin(owner, small)] = 0
    labels, order = canonical_relabel(owner)
    n = len(order)
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=n + 1)
    unc_sums = np.bincount(flat, weights=uncertainty.ravel().astype(np.float64), minlength=n + 1)
    objects = []
    for lab, idx in enumerate(order, start=1):
        cand = candidates[idx - 1]
        rows, cols = _label_bbox(labels, lab, cand.window)
        objects.append(
            ObjectInfo(
                label=lab,
                area=int(areas[lab]),
                mean_uncertainty=float(unc_sums[lab] / max(areas[lab], 1)),
                iou_score=float(cand.iou_score),
                stability=float(cand.stability),
                bbox=(rows[0], cols[0], rows[1], cols[1]),
            )
        )
    return labels, uncertainty, objects


def interior_points(labels: np.ndarray, ids: Sequence[int]) -> list[tuple[int, int]]:
    """For each label in ``ids``, its pixel farthest from the label's border (its own border:
    touching labels count as background), where a click is least ambiguous."""
    from scipy import ndimage as ndi

    inner = labels.copy()
    # a pixel next to another label, or to the background, is a border pixel
    for axis in (0, 1):
        for shift in (1, -1):
            moved = np.roll(labels, shift, axis=axis)
            edge = [slice(None)] * 2
            edge[axis] = 0 if shift == 1 else -1
            moved[tuple(edge)] = 0
            inner[moved != labels] = 0
    dist = ndi.distance_transform_edt(inner > 0)
    dist[labels > 0] += 0.5  # a label too thin for an interior keeps its own pixels
    positions = ndi.maximum_position(dist, labels, index=list(ids))
    return [(int(r), int(c)) for r, c in positions]


def _region_candidate(pred, obj: "ObjectInfo", rank_by: str) -> MaskCandidate | None:
    """A re-clicked object's prediction (maps of ``pred.region``) -> a candidate whose window
    is the part of the region where the logit reaches above ``-SUPPORT_LOGIT``."""
    mask = pred.mask
    if not mask.any():
        return None
    eps = 1e-6
    prob = np.clip(pred.probability, eps, 1 - eps)
    support = prob > _sigmoid(np.float32(-SUPPORT_LOGIT))
    rr, cc = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
    mr, mc = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    r0, c0 = pred.region[:2]
    sub = (slice(rr[0], rr[-1] + 1), slice(cc[0], cc[-1] + 1))
    p = prob[sub]
    confidence = obj.stability * (1.0 - pred.mean_uncertainty)
    return MaskCandidate(
        window=(r0 + int(rr[0]), c0 + int(cc[0]), r0 + int(rr[-1]) + 1, c0 + int(cc[-1]) + 1),
        logits=np.log(p / (1 - p)).astype(np.float32),
        box=(r0 + int(mr[0]), c0 + int(mc[0]), r0 + int(mr[-1]) + 1, c0 + int(mc[-1]) + 1),
        area=int(mask.sum()),
        iou_score=pred.iou_score,
        stability=obj.stability,
        mean_uncertainty=pred.mean_uncertainty,
        source=pred.region,
        quality=confidence if rank_by == "confidence" else None,
    )


def canonical_relabel(ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Renumber the non-zero ids of ``ids`` 1..N in raster order of first appearance.

    Returns the new int32 label image and, for each new label, the old id.
    """
    flat = ids.ravel()
    uniq, first = np.unique(flat, return_index=True)
    keep = uniq != 0
    uniq, first = uniq[keep], first[keep]
    old_in_order = uniq[np.argsort(first, kind="stable")]
    lut = np.zeros(int(flat.max(initial=0)) + 1, dtype=np.int32)
    lut[old_in_order] = np.arange(1, len(old_in_order) + 1, dtype=np.int32)
    return lut[ids].astype(np.int32), [int(v) for v in old_in_order]


def _label_bbox(labels: np.ndarray, lab: int, window: Box) -> tuple[tuple[int, int], tuple[int, int]]:
    """Bounding box of ``lab``: it lies inside the candidate's window, so only that is searched."""
    r0, c0, r1, c1 = window
    rr, cc = np.nonzero(labels[r0:r1, c0:c1] == lab)
    return (r0 + int(rr.min()), r0 + int(rr.max()) + 1), (c0 + int(cc.min()), c0 + int(cc.max()) + 1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float32)))).astype(np.float32)


# ---------------------------------------------------------------------------- segmenter
# how candidates are ranked for NMS: the decoder's predicted IoU (SAM), or the mask's own
# confidence, stability x (1 - mean uncertainty), for models whose IoU head says little
# image tokens (bytes) one CPU decoder pass of a click grid carries: more clicks per pass fall
# out of the caches. For micro at 256 px (64 kB of tokens per click) 64 clicks took 43-48 ms in
# passes of 64, 42-43 in 32s, 39-40 in 16s and 44 in 8s (one AVX-512 core, three runs; with
# malloc tuned to keep freed memory 39 / 37 / 38 / 44 ms). SAM2's generator passes all 64.
# (see ImageEmbedding.prompt_sets_per_pass; the predictor's budget for a few objects on a large
# plane is CPU_DECODER_BYTES)
AUTO_DECODER_BYTES = 2**20


RANKINGS = ("iou", "confidence")
# masks overlapping by this much of the smaller are pieces of one object (see merge_fragments)
MERGE_OVERLAP = 0.5


def trained_heads(model: RuacSam) -> bool:
    """Whether ``model``'s multimask outputs and IoU head were trained as SAM2 trains them, so
    that a grid click may use the three masks and trust the predicted IoU.

    SAM2's were (official weights, and ours fine-tuned from them). A model of ours trained from
    scratch without SAM2's multimask loss (``train.multimask`` in its recipe, off in stage 1)
    has only its first mask token trained, its other three masks are noise, and its IoU head
    predicts about the mean IoU whatever the mask.

    A model trained further from one of ours (a later stage, or a user's fine-tuning of
    ``micro``) inherits its source's heads: the trainer records the answer for the whole
    lineage in the exported file's metadata (``trained_heads``), read first. Files without it
    fall back on their own recipe: from scratch, trained iff it used the multimask loss;
    otherwise (official weights, a file without our recipe) SAM2's.
    """
    info = getattr(model, "info", None) or {}
    if info.get("weights_missing"):  # random weights in place of a missing file: nothing trained
        return False
    recorded = (info.get("metadata") or {}).get("trained_heads")
    if recorded is not None:
        return bool(recorded)
    recipe = info.get("recipe") or {}
    if recipe.get("model", {}).get("init") != "scratch":
        return True
    return bool(recipe.get("train", {}).get("multimask", False))


def reported_iou(model: RuacSam, iou_score: float) -> float:
    """A decoder's predicted IoU as shown to users (messages, object tables, CSV files): NaN when
    ``model``'s IoU head was never trained (see :func:`trained_heads`: our ``micro`` models),
    whose number sits near the mean IoU of its training data whatever the mask and would read as
    a verdict on it."""
    return float(iou_score) if trained_heads(model) else float("nan")


class AutomaticSegmenter:
    """Segment every object of a plane, with per-pixel and per-object uncertainty.

    >>> seg = AutomaticSegmenter(load_model("micro"), points_per_side=16)
    >>> result = seg.segment(plane)        # (H, W) or (H, W, C), any size
    >>> result.labels, result.uncertainty, result.objects

    Parameters mirror SAM's generator where they mean the same thing. ``max_mean_uncertainty``
    drops masks whose mean uncertainty (bits, inside the mask) is above it. ``crop_n_layers``
    adds zoomed crops for small objects (layer i: 2^i x 2^i crops, magnified up to 2^i for
    native-scale models). ``tile_size``/``tile_overlap`` control planes larger than the
    model's input (default: the model's input size, the crops ours learned from, and a quarter
    of it). ``point_in_mask``, ``refine_rounds`` and ``rank_by`` are described in the module
    docstring; ``multimask="auto"``, ``pred_iou_thresh=None``, ``stability_score_thresh=None``
    and ``rank_by="auto"`` follow :func:`trained_heads` (SAM's choices for SAM2's weights).
    ``point_in_mask=False, refine_rounds=0, multimask=True, rank_by="iou"`` is SAM2's algorithm.
    """

    def __init__(
        self,
        model: RuacSam,
        points_per_side: int = 16,
        points_per_batch: int = 64,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float | None = None,
        stability_score_offset: float = 1.0,
        max_mean_uncertainty: float = 0.6,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        crop_nms_thresh: float = 0.7,
        min_area: int = 0,
        min_kept: float = 0.0,
        merge_overlap: float | None = None,
        multimask: bool | str = "auto",
        rank_by: str = "auto",
        object_score_thresh: float = 0.0,
        mode: str | None = None,
        samples: int = 8,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        window_margin: int = 12,
        seed: int = 0,
        zoom: float | str = 1.0,
        point_in_mask: bool = True,
        refine_rounds: int = 1,
        reclick: bool | str = "auto",
        views: int | str = "auto",
        scales: int | str = 1,
    ) -> None:
        if not is_whole(points_per_batch) or points_per_batch < 1:
            raise ValueError(f"points_per_batch must be a whole number >= 1, got {points_per_batch!r}")
        if not is_whole(refine_rounds) or refine_rounds < 0:
            raise ValueError(f"refine_rounds must be 0 or more, got {refine_rounds}")
        point_grid(points_per_side)  # validates
        _check_options(crop_n_layers=crop_n_layers, crop_overlap_ratio=crop_overlap_ratio,
                       crop_n_points_downscale_factor=crop_n_points_downscale_factor, window_margin=window_margin,
                       seed=seed, samples=samples, box_nms_thresh=box_nms_thresh, crop_nms_thresh=crop_nms_thresh,
                       max_mean_uncertainty=max_mean_uncertainty, pred_iou_thresh=pred_iou_thresh,
                       stability_score_thresh=stability_score_thresh, stability_score_offset=stability_score_offset,
                       object_score_thresh=object_score_thresh, min_area=min_area)
        self.model = model.eval()
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        heads = trained_heads(model)
        # SAM's default where the IoU head was trained (SAM2's weights); off for ours, whose
        # IoU head learned to predict about the mean IoU (r = 0.0 with the true IoU of grid masks)
        self.pred_iou_thresh = (0.7 if heads else -1.0) if pred_iou_thresh is None else float(pred_iou_thresh)
        if rank_by == "auto":
            rank_by = "iou" if heads else "confidence"
        if rank_by not in RANKINGS:
            raise ValueError(f"rank_by must be 'auto' or one of {RANKINGS}, got {rank_by!r}")
        self.rank_by = rank_by
        # SAM's 0.8 for SAM2's weights; our models' logits are softer (whole nuclei whose
        # border logits sit near 0 score 0.5-0.8), and 0.5 found more of the objects of held-out
        # synthetic images (F1 at IoU 0.5: 0.42 at 0.8, 0.47 at 0.5; 5-disc image: 3 -> 5 found)
        self.stability_score_thresh = (
            (0.8 if heads else 0.5) if stability_score_thresh is None else float(stability_score_thresh)
        )
        self.stability_score_offset = stability_score_offset
        self.max_mean_uncertainty = max_mean_uncertainty
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.crop_nms_thresh = crop_nms_thresh
        self.min_area = min_area
        if not 0.0 <= min_kept <= 1.0:
            raise ValueError(f"min_kept must be a fraction in [0, 1], got {min_kept}")
        self.min_kept = float(min_kept)
        # merging pieces of one object: for ours, whose grid clicks return pieces around the
        # click (see merge_fragments); SAM2's weights return whole objects, nothing to merge
        if merge_overlap is None:
            merge_overlap = 0.0 if heads else MERGE_OVERLAP
        if not 0.0 <= merge_overlap <= 1.0:
            raise ValueError(f"merge_overlap must be a fraction in [0, 1] (0: off), got {merge_overlap}")
        self.merge_overlap = float(merge_overlap)
        self.multimask = heads if multimask == "auto" else bool(multimask)
        self.object_score_thresh = object_score_thresh
        self.mode = mode or model.default_mode
        self.samples = samples
        self.tile_size = tile_size or self.max_tile_size
        self.tile_overlap = self.tile_size // 4 if tile_overlap is None else tile_overlap
        self.window_margin = window_margin
        self.seed = seed
        # as Predictor's zoom: objects look to the model as large as the ones it learned;
        # "auto": each plane's own, from the size of its objects (see model/scale.py)
        self.zoom = parse_zoom(zoom)
        self.point_in_mask = point_in_mask
        self.refine_rounds = refine_rounds
        # clicking every object again as a user would (see _reclick): for ours, whose grid masks
        # are coarse; SAM2's weights keep SAM's algorithm
        if reclick == "auto":
            reclick = not heads
        if not isinstance(reclick, bool):
            raise ValueError(f"reclick must be 'auto', True or False, got {reclick!r}")
        self.reclick = reclick
        self.views = len(resolve_views(model.config, views))
        self.scales = len(resolve_scales(model.config, scales))

    # ------------------------------------------------------------------ options
    @property
    def max_tile_size(self) -> int:
        """The default tile side: what the model learned to see at once. Native-scale models
        (ours) learned from crops of ``image_size`` and see each tile as such a crop, as the
        predictor's context windows do (whole 512-1024 px planes made their masks spill into
        touching neighbours); models that resize every image see the whole plane."""
        return self.model.config.image_size

    def options(self) -> dict:
        """The parameters that change results (for metadata and resume fingerprints)."""
        keys = (
            "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
            "stability_score_offset", "max_mean_uncertainty", "box_nms_thresh", "crop_n_layers",
            "crop_overlap_ratio", "crop_n_points_downscale_factor", "crop_nms_thresh", "min_area", "min_kept",
            "merge_overlap",
            "multimask", "object_score_thresh", "mode", "samples", "tile_size", "tile_overlap",
            "window_margin", "seed", "zoom", "point_in_mask", "refine_rounds", "rank_by", "reclick", "views",
            "scales",
        )
        return {k: getattr(self, k) for k in keys}

    # ------------------------------------------------------------------ public
    def segment(self, plane, name: str = "plane") -> AutoResult:
        """(H, W) or (H, W, C) plane, any dtype and size -> :class:`AutoResult`; ``name`` is
        what an error about the plane calls it (e.g. ``plane 5 (T=1, Z=2)`` of a stack)."""
        arr = validate_plane(plane, name)
        rgb = to_rgb_float(arr)
        h, w = rgb.shape[:2]
        stats = AutoStats()
        zoom = self.plane_zoom(arr)
        if max(h, w) <= self.tile_size:
            cands = self.candidates(rgb, stats, zoom)
        else:
            from .tiling import tiled_candidates

            cands = tiled_candidates(
                lambda tile: self.candidates(tile, stats, zoom),
                rgb,
                self.tile_size,
                self.tile_overlap,
                nms_thresh=self.crop_nms_thresh,
            )
        cands = merge_fragments(cands, self.merge_overlap)
        labels, unc, objects = resolve_labels(cands, (h, w), self.min_area, self.min_kept)
        if self.reclick and objects:
            cands = self._reclick(arr, labels, objects, zoom)
            cands = merge_fragments(box_nms(cands, self.box_nms_thresh), self.merge_overlap)
            labels, unc, objects = resolve_labels(cands, (h, w), self.min_area, self.min_kept)
        stats.n_objects = len(objects)
        return AutoResult(labels, unc, objects, stats, zoom)

    def _reclick(self, plane: np.ndarray, labels: np.ndarray, objects: list["ObjectInfo"],
                 zoom: float) -> list[MaskCandidate]:
        """Each object clicked again at its innermost pixel, as a user would click it: decoded
        by the interactive :class:`~napari_ruac.model.Predictor` in a context window around the
        click (normalised on its own), in its test-time views and scales, at the plane's zoom
        (three scales: DSB2018 F1 at IoU 0.5 with ``micro`` 0.728 -> 0.749, AUROC of the
        uncertainty for error 0.757 -> 0.782, for ~1.6x the time of a 512² plane).

        The grid's masks come from tiles seen once, on the decoder's 16 px token grid, and are
        merged from fragments; a click at an object's centre decoded in several views gives a
        mask that follows the object (DSB2018 F1 at IoU 0.5 with ``micro`` 0.32 -> 0.56).
        Returns the new candidates, ranked as the grid's were; an object whose click gives an
        empty mask is dropped.
        """
        from .predictor import Predictor

        predictor = Predictor(self.model, zoom=zoom, views=self.views, box_size=None, window_step=0.5,
                              recentre=False, scales=self.scales)  # the click is at the centre already
        predictor.set_image(plane)
        points = interior_points(labels, [o.label for o in objects])
        cands = []
        for i, pred in predictor.predict_regions([{"points": [pt]} for pt in points], mode=self.mode,
                                                 samples=self.samples, seed=self.seed):
            cand = _region_candidate(pred, objects[i], self.rank_by)
            if cand is not None:
                cands.append(cand)
        cands.sort(key=lambda c: -c.rank())
        return cands

    def plane_zoom(self, plane: np.ndarray) -> float:
        """The zoom a plane is seen at: ``zoom``, or with ``zoom="auto"`` the one that shows the
        plane's typical object at the size the model learned (1.0 if it shows none)."""
        if self.zoom != "auto":
            return self.zoom
        from .scale import plane_zoom

        return plane_zoom(self.model.config, plane)

    def candidates(self, rgb: np.ndarray, stats: AutoStats | None = None,
                   zoom: float | None = None) -> list[MaskCandidate]:
        """Filtered, de-duplicated candidates of an (H, W, 3) float image in [0, 1] that fits the
        model (max side <= ``tile_size``), best first; ``zoom`` default: :meth:`plane_zoom`."""
        stats = stats if stats is not None else AutoStats()
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or min(rgb.shape[:2]) < 1:
            from ..io.normalize import ImageError

            raise ImageError(f"candidates takes a normalised (H, W, 3) image (to_rgb_float), got shape {rgb.shape}; "
                             "segment() takes any plane")
        zoom = self.plane_zoom(rgb) if zoom is None else zoom
        h, w = rgb.shape[:2]
        image = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)
        per_crop: list[MaskCandidate] = []
        boxes = crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
        for box, layer in boxes:
            n_side = max(1, self.points_per_side // (self.crop_n_points_downscale_factor**layer))
            per_crop.extend(self._crop_candidates(image, box, layer, n_side, stats, zoom))
        stats.n_crops += len(boxes)
        if len(boxes) > 1:
            per_crop = drop_cut_candidates(per_crop, (h, w))
            # prefer masks from smaller (more magnified) crops, as SAM does
            per_crop = box_nms(per_crop, self.crop_nms_thresh, score=lambda c: c.layer + c.rank())
        stats.n_after_nms += len(per_crop)
        return per_crop

    # ------------------------------------------------------------------ internals
    def _frame(self, shape: tuple[int, int], layer: int, zoom: float) -> Frame:
        # zoomed crops are magnified (up to 2^layer) so small objects cover more tokens
        return frame_for(self.model.config, shape, zoom=zoom * 2**layer)

    @torch.inference_mode()
    def _crop_candidates(
        self, image: torch.Tensor, box: Box, layer: int, n_side: int, stats: AutoStats, zoom: float
    ) -> list[MaskCandidate]:
        """Decode the point grid of one crop; filter and de-duplicate at decoder resolution,
        then bring the survivors to full resolution. ``image`` (3, H, W) float in [0, 1]."""
        r0, c0, r1, c1 = box
        crop = image[:, r0:r1, c0:c1]
        frame = self._frame((r1 - r0, c1 - c0), layer, zoom)
        embedding = self.model.encode(_model_input(crop, frame).to(self.model.device))
        stats.n_encoder_calls += 1
        points = point_grid(n_side) * np.array(frame.shape, dtype=np.float64)  # (P, 2) row, col
        stats.n_points += len(points)
        # model coordinates are (x, y); grid positions are passed as SAM's generators pass them
        # (embed_prompts then adds half a pixel), so the same grid means the same prompts
        xy = torch.from_numpy(points[:, ::-1] * frame.scale).float()
        found = self._decode_points(embedding, xy, frame, stats, seed=self.seed)
        for round_ in range(self.refine_rounds):
            # a click near an object's edge gives a fragment of it; clicking again at the centre
            # of what it gave moves towards the object's middle, where masks are whole, so the
            # fragments of one object converge on one mask that NMS then keeps once
            found = box_nms(found, self.box_nms_thresh)
            if not found:
                break
            xy = torch.tensor([lr.centroid_xy for lr in found], dtype=torch.float32)
            refined = self._decode_points(embedding, xy, frame, stats, seed=self.seed + (round_ + 1) * 7919)
            # a mask whose re-click gives nothing that passes the filters stays as it was
            by_prompt: dict[int, list[_LowRes]] = {}
            for lr in refined:
                by_prompt.setdefault(lr.prompt, []).append(lr)
            found = [new for i, lr in enumerate(found) for new in by_prompt.get(i, [lr])]
        stats.n_after_filters += len(found)
        survivors = box_nms(found, self.box_nms_thresh)
        cands = [self._full_resolution(lr, frame, box, layer) for lr in survivors]
        return [c for c in cands if c is not None]

    def _decode_points(self, embedding, xy: torch.Tensor, frame: Frame, stats: AutoStats,
                       seed: int) -> list["_LowRes"]:
        """Single-click prompts ``xy`` (P, 2) in model coordinates -> filtered low-res masks."""
        found: list[_LowRes] = []
        step = min(self.points_per_batch, embedding.prompt_sets_per_pass(AUTO_DECODER_BYTES))
        for start in range(0, len(xy), step):
            coords = xy[start : start + step].unsqueeze(1).to(self.model.device)
            labels = torch.full(coords.shape[:2], LABEL_POS, dtype=torch.long, device=coords.device)
            generator = torch.Generator(device=self.model.device).manual_seed(seed + start)
            out = self.model.decode(
                embedding, coords, labels, multimask_output=self.multimask, mode=self.mode,
                samples=self.samples, generator=generator,
            )
            stats.n_decoder_calls += 1
            stats.n_masks_decoded += out.logits.shape[0] * out.logits.shape[1]
            for lr in self._filter_batch(out, frame, coords[:, 0].cpu()):
                lr.prompt += start
                found.append(lr)
        return found

    def _filter_batch(self, out, frame: Frame, xy: torch.Tensor) -> list["_LowRes"]:
        """IoU, object-score, stability, point and mean-uncertainty filters, all on the
        decoder's 1/4-resolution logits and vectorised over the batch; ``xy`` (B, 2) are the
        clicks (model coordinates) that gave the masks."""
        logits = out.logits.float()  # (B, M, h4, w4)
        b, m, h4, w4 = logits.shape
        down = frame.input_size[0] / h4  # model pixels per low-res pixel
        # only the low-res pixels that cover the image, not the padding
        vh4 = int(math.ceil(frame.valid[0] / down))
        vw4 = int(math.ceil(frame.valid[1] / down))
        logits = logits.reshape(b * m, h4, w4)[:, :vh4, :vw4]
        iou = out.iou_pred.float().reshape(b * m)
        obj = out.object_score_logits.float()[:, 0].repeat_interleave(m)
        off = self.stability_score_offset
        mask = logits > 0
        area = _count(mask)
        stability = _count(logits > off).float() / _count(logits > -off).float().clamp_min(1)
        keep = (iou > self.pred_iou_thresh) & (obj > self.object_score_thresh) & (area > 0)
        keep &= stability >= self.stability_score_thresh
        if self.point_in_mask:
            # a click's mask must hold the click: a mask elsewhere answers no question asked
            # (typically a neighbour reached from a click on the background between objects)
            col = (xy[:, 0] / down).long().clamp(0, vw4 - 1).repeat_interleave(m)
            row = (xy[:, 1] / down).long().clamp(0, vh4 - 1).repeat_interleave(m)
            keep &= mask[torch.arange(b * m), row, col]
        idx = torch.nonzero(keep).flatten()
        if idx.numel() == 0:
            return []
        # the uncertainty filter last: the entropy maps are computed for these masks only
        entropy = out.uncertainty_of(idx).float()[:, :vh4, :vw4]
        mean_unc = torch.zeros_like(stability)
        mean_unc[idx] = (entropy * mask[idx]).flatten(1).sum(1) / area[idx].clamp_min(1)
        idx = idx[mean_unc[idx] <= self.max_mean_uncertainty]
        if idx.numel() == 0:
            return []
        kept = mask[idx]
        rows_any = kept.any(2)  # (K, vh4)
        cols_any = kept.any(1)  # (K, vw4)
        # centroids in model coordinates, as clicks are given (see _crop_candidates)
        weight = kept.float()
        n_px = weight.flatten(1).sum(1)
        cy = (weight.sum(2) * torch.arange(vh4, dtype=torch.float32)).sum(1) / n_px
        cx = (weight.sum(1) * torch.arange(vw4, dtype=torch.float32)).sum(1) / n_px
        centroid_x = ((cx + 0.5) * down - 0.5).tolist()
        centroid_y = ((cy + 0.5) * down - 0.5).tolist()
        px = down / frame.scale  # crop pixels per low-res pixel
        margin = int(math.ceil(self.window_margin / px)) + 2
        result = []
        for j, k in enumerate(idx.tolist()):
            rows = torch.nonzero(rows_any[j]).flatten()
            cols = torch.nonzero(cols_any[j]).flatten()
            i0, i1 = int(rows[0]), int(rows[-1]) + 1
            j0, j1 = int(cols[0]), int(cols[-1]) + 1
            a0, b0, a1, b1 = _support_window(logits[k], (i0, j0, i1, j1), margin, 4 * margin)
            result.append(_LowRes(
                logits=logits[k, a0:a1, b0:b1].clone(),
                origin=(a0, b0),
                full_shape=(vh4, vw4),
                box=(i0 * px, j0 * px, i1 * px, j1 * px),
                iou_score=float(iou[k]),
                stability=float(stability[k]),
                mean_uncertainty=float(mean_unc[k]),
                px=px,
                centroid_xy=(centroid_x[j], centroid_y[j]),
                prompt=k // m,
                quality=float(iou[k]) if self.rank_by == "iou" else float(stability[k] * (1.0 - mean_unc[k])),
            ))
        return result

    def _full_resolution(self, lr: "_LowRes", frame: Frame, box: Box, layer: int) -> MaskCandidate | None:
        """Full-resolution logits of a low-res mask inside the part of its low-res window where
        bilinear interpolation needs nothing from outside the window."""
        h, w = frame.shape
        (a0, b0), (lh, lw) = lr.origin, lr.logits.shape
        full_h, full_w = lr.full_shape
        px = lr.px
        wr0 = 0 if a0 == 0 else int(math.ceil((a0 + 0.5) * px - 0.5))
        wc0 = 0 if b0 == 0 else int(math.ceil((b0 + 0.5) * px - 0.5))
        wr1 = h if a0 + lh == full_h else int(math.floor((a0 + lh - 0.5) * px - 0.5)) + 1
        wc1 = w if b0 + lw == full_w else int(math.floor((b0 + lw - 0.5) * px - 0.5)) + 1
        wr1, wc1 = min(wr1, h), min(wc1, w)
        if wr1 <= wr0 or wc1 <= wc0:
            return None
        window_logits = _sample_window(lr.logits, (wr0, wc0, wr1, wc1), 1.0 / px, origin=lr.origin)
        mask = window_logits > 0
        if not mask.any():
            return None
        rr = np.flatnonzero(mask.any(1))
        cc = np.flatnonzero(mask.any(0))
        r0, c0 = box[0], box[1]
        return MaskCandidate(
            window=(r0 + wr0, c0 + wc0, r0 + wr1, c0 + wc1),
            logits=window_logits,
            box=(r0 + wr0 + int(rr[0]), c0 + wc0 + int(cc[0]), r0 + wr0 + int(rr[-1]) + 1, c0 + wc0 + int(cc[-1]) + 1),
            area=int(mask.sum()),
            iou_score=lr.iou_score,
            stability=lr.stability,
            mean_uncertainty=lr.mean_uncertainty,
            source=box,
            layer=layer,
            quality=lr.quality,
        )


@dataclass
class _LowRes:
    """A candidate that passed the filters, still at decoder resolution: ``logits`` a window
    of the low-res map starting at low-res pixel ``origin``; ``box`` its bounding box in crop
    pixels (for NMS); ``px`` crop pixels per low-res pixel."""

    logits: torch.Tensor
    origin: tuple[int, int]
    full_shape: tuple[int, int]
    box: tuple[float, float, float, float]
    iou_score: float
    stability: float
    mean_uncertainty: float
    px: float
    centroid_xy: tuple[float, float] = (0.0, 0.0)  # model coordinates (x, y)
    prompt: int = 0  # which of the decoded clicks gave it
    quality: float = 0.0  # what NMS ranks by

    def rank(self) -> float:
        return self.quality


def _count(mask: torch.Tensor) -> torch.Tensor:
    """True pixels of each (h, w) map of a (N, h, w) boolean stack, as int32 (N,).

    Row sums in int16 first (a row is at most a few hundred pixels), as SAM2's stability score
    counts: on CPU a third faster than one int64 sum over the flattened maps.
    """
    return mask.sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)


# outside its window a candidate's probability counts as 0: windows reach where the logit is
# below -SUPPORT_LOGIT (p < 0.25 %, entropy < 0.03 bits), so the uncertainty map shows no step
# at a window's edge
SUPPORT_LOGIT = 6.0


def _support_window(logits: torch.Tensor, box: tuple[int, int, int, int], margin: int,
                    max_margin: int) -> tuple[int, int, int, int]:
    """A low-res window around ``box`` (i0, j0, i1, j1) grown from ``margin`` until the logits
    on its border are all below ``-SUPPORT_LOGIT`` (or ``max_margin`` or the map's edge)."""
    h, w = logits.shape
    i0, j0, i1, j1 = box
    grow = margin
    while True:
        a0, b0, a1, b1 = max(0, i0 - grow), max(0, j0 - grow), min(h, i1 + grow), min(w, j1 + grow)
        win = logits[a0:a1, b0:b1]
        border = torch.cat([win[0], win[-1], win[:, 0], win[:, -1]])
        if grow >= max_margin or bool((border < -SUPPORT_LOGIT).all()) or (a0, b0, a1, b1) == (0, 0, h, w):
            return a0, b0, a1, b1
        grow = min(max_margin, grow * 2)


def _sample_window(low: torch.Tensor, window: Box, lowres_per_px: float,
                   origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Bilinear logits at the pixel centres of ``window`` (crop pixels) from a low-res map.

    ``low`` (h, w) is the part of the low-res map that starts at low-res pixel ``origin``.
    Crop pixel centre ``r + 0.5`` sits at ``(r + 0.5) * lowres_per_px`` in low-res units — the
    same mapping as upsampling the whole map with ``align_corners=False``.
    """
    r0, c0, r1, c1 = window
    h4, w4 = low.shape
    ys = (torch.arange(r0, r1, dtype=torch.float64) + 0.5) * lowres_per_px - origin[0]
    xs = (torch.arange(c0, c1, dtype=torch.float64) + 0.5) * lowres_per_px - origin[1]
    gy = (ys / h4 * 2 - 1).float()
    gx = (xs / w4 * 2 - 1).float()
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).unsqueeze(0).to(low.device)
    out = F.grid_sample(low[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, 0].cpu().numpy().astype(np.float32)


def _model_input(crop: torch.Tensor, frame: Frame) -> torch.Tensor:
    """(3, h, w) crop -> (1, 3, H_in, W_in) resized and zero-padded model input."""
    return to_model_input(crop.unsqueeze(0), frame)



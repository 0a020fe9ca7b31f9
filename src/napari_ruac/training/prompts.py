"""Prompts drawn from ground-truth instance masks, as SAM2 is trained.

Per object: one positive point (uniform inside the object), several points (1-3 positive
inside, 0-2 negative in a ring around it), or a jittered tight box. During training
:func:`correction_clicks` adds SAM2-style clicks drawn from the current prediction's error.

Coordinates follow the model: (x, y) = (col, row) in model-input pixels, labels
-1 padding, 0 negative, 1 positive, 2/3 box corners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..model.sam import LABEL_BOX_BR, LABEL_BOX_TL, LABEL_NEG, LABEL_PAD, LABEL_POS

KIND_POINT, KIND_POINTS, KIND_BOX = 0, 1, 2
KIND_BACKGROUND = 3  # one positive click on background: the answer to learn is "no object"


@dataclass(frozen=True)
class PromptConfig:
    objects_per_image: int = 8
    p_point: float = 0.4
    p_points: float = 0.3
    p_box: float = 0.3
    max_positive: int = 3
    max_negative: int = 2
    box_jitter: float = 0.1  # of the box side, per corner, at most
    box_jitter_px: float = 5.0
    # how far a corner may move into the object, as a fraction of the outward range: 1 jitters
    # both ways (SAM2's noise), 0 only grows the box (a box drawn around an object contains it,
    # so the mask learns to end at the box's edge rather than spill over it)
    box_jitter_inward: float = 1.0
    min_area: int = 12  # pixels; smaller objects are not prompted
    # extra single clicks on background per image (object id 0, empty target): without them the
    # object-score head only ever sees "yes" and cannot reject the background points of an
    # automatic segmentation grid
    background_per_image: int = 0
    # probability that a several-points prompt gets one more negative click, at the centre of the
    # nearest other object within ``neighbour_distance`` pixels of it: the correction a user makes
    # when a mask runs into the next nucleus, which a negative in a ring around the object (where
    # there is mostly background) rarely teaches
    p_neighbour_negative: float = 0.0
    neighbour_distance: float = 6.0

    @classmethod
    def from_dict(cls, data: dict | None) -> "PromptConfig":
        return cls(**(data or {}))


@dataclass
class PromptSet:
    """Prompts for P objects of a batch (numpy; converted to tensors by the data loader).

    ``image_index`` (P,) which image; ``object_id`` (P,) its label value; ``coords``
    (P, N, 2) float32 (x, y); ``labels`` (P, N) int64; ``kind`` (P,) int64.
    """

    image_index: np.ndarray
    object_id: np.ndarray
    coords: np.ndarray
    labels: np.ndarray
    kind: np.ndarray


def sample_prompts(rng: np.random.Generator, label_maps: np.ndarray, cfg: PromptConfig) -> PromptSet:
    """Prompts for up to ``cfg.objects_per_image`` objects of each (H, W) label map."""
    rows = []
    for b, labels in enumerate(label_maps):
        ids, counts = np.unique(labels, return_counts=True)
        keep = (ids > 0) & (counts >= cfg.min_area)
        ids = ids[keep]
        if len(ids) == 0:
            continue
        chosen = rng.choice(ids, size=min(cfg.objects_per_image, len(ids)), replace=False)
        for obj in chosen:
            rows.append((b, int(obj), *object_prompt(rng, labels == obj, cfg, labels)))
        if cfg.background_per_image > 0:
            rows += [(b, 0, *bg) for bg in background_prompts(rng, labels, cfg.background_per_image)]
    if not rows:
        raise ValueError("no object large enough to prompt in this batch")
    n = max(len(r[2]) for r in rows)
    p = len(rows)
    coords = np.zeros((p, n, 2), np.float32)
    labs = np.full((p, n), LABEL_PAD, np.int64)
    for i, (_, _, pts, lab, _) in enumerate(rows):
        coords[i, : len(pts)] = pts
        labs[i, : len(lab)] = lab
    return PromptSet(
        image_index=np.array([r[0] for r in rows], np.int64),
        object_id=np.array([r[1] for r in rows], np.int64),
        coords=coords,
        labels=labs,
        kind=np.array([r[4] for r in rows], np.int64),
    )


def background_prompts(rng: np.random.Generator, labels: np.ndarray, n: int) -> list:
    """Up to ``n`` single positive clicks on background pixels (not on or touching an object)."""
    free = labels == 0
    free[1:] &= labels[:-1] == 0
    free[:-1] &= labels[1:] == 0
    free[:, 1:] &= labels[:, :-1] == 0
    free[:, :-1] &= labels[:, 1:] == 0
    rr, cc = np.nonzero(free)
    if len(rr) == 0:
        return []
    pick = rng.integers(0, len(rr), size=n)
    return [(np.array([(cc[i] + rng.uniform(-0.5, 0.5), rr[i] + rng.uniform(-0.5, 0.5))], np.float32),
             np.array([LABEL_POS], np.int64), KIND_BACKGROUND) for i in pick]


def object_prompt(rng: np.random.Generator, mask: np.ndarray, cfg: PromptConfig,
                  labels: np.ndarray | None = None):
    """One object's prompt: (points (N, 2) as (x, y), labels (N,), kind). ``labels``, the image's
    label map, is needed for ``cfg.p_neighbour_negative``."""
    p = np.array([cfg.p_point, cfg.p_points, cfg.p_box], float)
    kind = int(rng.choice(3, p=p / p.sum()))
    rr, cc = np.nonzero(mask)
    if kind == KIND_BOX:
        return _box(rng, rr, cc, mask.shape, cfg) + (kind,)
    n_pos = 1 if kind == KIND_POINT else int(rng.integers(1, cfg.max_positive + 1))
    pick = rng.integers(0, len(rr), size=n_pos)
    # a pixel index is the pixel's centre in the model's coordinates (Predictor convention)
    pts = [(cc[i] + rng.uniform(-0.5, 0.5), rr[i] + rng.uniform(-0.5, 0.5)) for i in pick]
    lab = [LABEL_POS] * n_pos
    if kind == KIND_POINTS:
        for _ in range(int(rng.integers(0, cfg.max_negative + 1))):
            neg = _negative_point(rng, mask, rr, cc)
            if neg is not None:
                pts.append(neg)
                lab.append(LABEL_NEG)
        if labels is not None and cfg.p_neighbour_negative > 0 and rng.random() < cfg.p_neighbour_negative:
            neg = neighbour_point(mask, labels, cfg.neighbour_distance)
            if neg is not None:
                pts.append(neg)
                lab.append(LABEL_NEG)
    return np.array(pts, np.float32), np.array(lab, np.int64), kind


def neighbour_point(mask: np.ndarray, labels: np.ndarray, distance: float):
    """(x, y) of the interior centre (the pixel farthest from its edge) of the other object
    nearest to ``mask``, if one lies within ``distance`` pixels of it; else None."""
    rr, cc = np.nonzero(mask)
    pad = int(np.ceil(distance)) + 1
    h, w = mask.shape
    win = (slice(max(0, rr.min() - pad), min(h, rr.max() + 1 + pad)),
           slice(max(0, cc.min() - pad), min(w, cc.max() + 1 + pad)))
    m, lab = mask[win], labels[win]
    gap = ndimage.distance_transform_edt(~m)
    near = (lab > 0) & ~m & (gap <= distance)
    if not near.any():
        return None
    other = int(lab[near][np.argmin(gap[near])])
    # the whole neighbour, not only its part inside the window
    orr, occ = np.nonzero(labels == other)
    r0, c0 = orr.min(), occ.min()
    full = labels[r0:orr.max() + 1, c0:occ.max() + 1] == other
    depth = ndimage.distance_transform_edt(np.pad(full, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return (float(c0 + c), float(r0 + r))


def _box(rng, rr, cc, shape, cfg):
    h, w = shape
    r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
    jh = min(cfg.box_jitter * (r1 - r0), cfg.box_jitter_px)
    jw = min(cfg.box_jitter * (c1 - c0), cfg.box_jitter_px)
    k = cfg.box_jitter_inward
    r0, r1 = r0 + rng.uniform(-jh, k * jh), r1 + rng.uniform(-k * jh, jh)
    c0, c1 = c0 + rng.uniform(-jw, k * jw), c1 + rng.uniform(-k * jw, jw)
    r0, r1 = np.clip(sorted((r0, r1)), 0, h)
    c0, c1 = np.clip(sorted((c0, c1)), 0, w)
    # box corners: pixel edges, so the far corner is one past the last pixel's index
    return np.array([(c0, r0), (c1, r1)], np.float32), np.array([LABEL_BOX_TL, LABEL_BOX_BR], np.int64)


def _negative_point(rng, mask, rr, cc):
    """A background point in a ring around the object (where negatives are informative)."""
    h, w = mask.shape
    r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
    mr, mc = max(3, (r1 - r0) // 2), max(3, (c1 - c0) // 2)
    for _ in range(10):
        r = int(rng.integers(max(0, r0 - mr), min(h, r1 + mr)))
        c = int(rng.integers(max(0, c0 - mc), min(w, c1 + mc)))
        if not mask[r, c]:
            return (c + rng.uniform(-0.5, 0.5), r + rng.uniform(-0.5, 0.5))
    return None


def correction_clicks(
    pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SAM2-style correction click per object from the current error.

    ``pred``, ``target`` (P, H, W) bool. Where misses outnumber false positives a positive
    click is drawn uniformly from the missed pixels, else a negative click from the false
    positives. Returns coords (P, 1, 2) float (x, y) at pixel centres and labels (P, 1);
    objects without error get a padding label.
    """
    fn = target & ~pred
    fp = pred & ~target
    n_fn = fn.flatten(1).sum(1)
    n_fp = fp.flatten(1).sum(1)
    positive = n_fn >= n_fp
    region = torch.where(positive.view(-1, 1, 1), fn, fp).flatten(1).float()
    has_error = region.sum(1) > 0
    # multinomial needs a non-zero row; rows without error get a dummy weight and a pad label
    region[~has_error, 0] = 1.0
    idx = torch.multinomial(region, 1, generator=generator).squeeze(1)
    w = pred.shape[-1]
    coords = torch.stack([(idx % w).float(), (idx // w).float()], dim=-1).unsqueeze(1)
    labels = torch.where(positive, LABEL_POS, LABEL_NEG).long()
    labels = torch.where(has_error, labels, torch.full_like(labels, LABEL_PAD)).unsqueeze(1)
    return coords, labels

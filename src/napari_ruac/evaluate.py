"""Evaluation: accuracy and uncertainty quality of a model on image/mask folders.

Prompts come from the ground truth with a fixed seed (DESIGN.md): ``point1`` one point uniform
inside the object; ``point3`` that point, then two correction clicks, each at the centre of the
largest error region (positive on a miss, negative on a false positive); ``box`` the tight box;
``point2`` (on request) the point and the first of those corrections.

Per object: IoU (J), boundary F-measure (F), J&F, and inside the object's dilated region
(ground truth union prediction, dilated by ``REGION_DILATION`` px) the Pearson correlation of
uncertainty with error (PCC). Pooled over the regions of all objects: AUROC of uncertainty as an
error detector, PAvPU at ``PAVPU_THRESHOLD`` bits, ECE (15 bins) and NLL of the probability.
Trivial baselines (ellipse in the box, Otsu in the box, Otsu region under the point) are
reported beside the model so every table shows what the model adds.

``automatic`` (not a prompt; opt-in, it is slower) runs automatic segmentation on each plane
(:class:`~napari_ruac.model.automatic.AutomaticSegmenter`, its defaults) and matches its labels
to the ground truth at IoU > 0.5 (such matches are unique): precision, recall and F1 of the
instances; mIoU and J&F of every true object with its best-overlapping label (0 if none); and,
inside the dilated union of true and found objects, how the segmenter's per-pixel uncertainty
(that of the decision at each pixel) detects the pixels it got wrong (PCC per plane, AUROC and
PAvPU pooled). A pixel is wrong when it is foreground in one and background in the other, or
when its label's best-matching true object is not the one it belongs to (merged or split nuclei).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from ._cli_options import (BOX_MARGIN_HELP, BOX_SIZE_HELP, RECENTRE_HELP, SCALES_HELP, VIEWS_HELP, WINDOW_HELP,
                           window_step_value, zoom_value)
from .io.stacks import stack_stem

PROMPT_MODES = ("point1", "point3", "box")  # the default set
CORRECTIONS = {"point1": 0, "point2": 1, "point3": 2}  # correction clicks after the first point
AUTOMATIC = "automatic"
MATCH_IOU = 0.5
REGION_DILATION = 5
PAVPU_THRESHOLD = 0.5
ECE_BINS = 15
MIN_OBJECT_AREA = 10
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


# ---------------------------------------------------------------------------- metrics
def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerance: float | None = None) -> float:
    """DAVIS-style boundary F-measure; boundary pixels match within ``tolerance`` px
    (default 0.008 of the image diagonal, at least 1 px)."""
    if tolerance is None:
        tolerance = _tolerance(gt.shape)
    bp, bg = _boundary(pred.astype(bool)), _boundary(gt.astype(bool))
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    dist_to_gt = ndimage.distance_transform_edt(~bg)
    dist_to_pred = ndimage.distance_transform_edt(~bp)
    precision = float((dist_to_gt[bp] <= tolerance).mean())
    recall = float((dist_to_pred[bg] <= tolerance).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; NaN when either input is constant (undefined, left out of means)."""
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``positives`` (Mann-Whitney, ties halved)."""
    scores = np.asarray(scores, np.float64).ravel()
    positives = np.asarray(positives, bool).ravel()
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pavpu(uncertainty: np.ndarray, error: np.ndarray, threshold: float = PAVPU_THRESHOLD) -> float:
    """(accurate & certain + inaccurate & uncertain) / all pixels."""
    uncertain = np.asarray(uncertainty) > threshold
    error = np.asarray(error, bool)
    return float(((~error & ~uncertain).sum() + (error & uncertain).sum()) / max(error.size, 1))


def ece(prob: np.ndarray, target: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of foreground probabilities (equal-width bins)."""
    prob = np.asarray(prob, np.float64).ravel()
    target = np.asarray(target, np.float64).ravel()
    if prob.size == 0:
        return float("nan")
    idx = np.minimum((prob * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins)
    conf = np.bincount(idx, weights=prob, minlength=bins)
    acc = np.bincount(idx, weights=target, minlength=bins)
    nonzero = count > 0
    return float(np.abs(conf[nonzero] - acc[nonzero]).sum() / prob.size)


def nll(prob: np.ndarray, target: np.ndarray, eps: float = 1e-6) -> float:
    p = np.clip(np.asarray(prob, np.float64), eps, 1 - eps)
    t = np.asarray(target, bool)
    return float(-np.mean(np.where(t, np.log(p), np.log1p(-p)))) if p.size else float("nan")


# ---------------------------------------------------------------------------- prompts
def random_point_inside(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    i = rng.integers(len(rows))
    return int(rows[i]), int(cols[i])


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def correction_click(pred: np.ndarray, gt: np.ndarray) -> tuple[tuple[int, int], int] | None:
    """The centre (farthest from its border) of the largest error region, and its label:
    1 if the region is a miss, 0 if it is a false positive. None when there is no error."""
    best = None
    for region, label in ((gt & ~pred, 1), (pred & ~gt, 0)):
        lab, n = ndimage.label(region)
        if n == 0:
            continue
        sizes = ndimage.sum(region, lab, range(1, n + 1))
        k = int(np.argmax(sizes)) + 1
        if best is None or sizes[k - 1] > best[0]:
            best = (sizes[k - 1], lab == k, label)
    if best is None:
        return None
    _, region, label = best
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (int(r), int(c)), label


# ---------------------------------------------------------------------------- baselines
def ellipse_in_box(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    r0, c0, r1, c1 = box
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2
    ry, rx = max((r1 - r0) / 2, 0.5), max((c1 - c0) / 2, 0.5)
    return ((rr - cy) / ry) ** 2 + ((cc - cx) / rx) ** 2 <= 1.0


def _otsu_foreground(values: np.ndarray, image: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    if values.size == 0 or values.min() == values.max():
        return np.zeros(image.shape, bool)
    return image > threshold_otsu(values)


def otsu_in_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    r0, c0, r1, c1 = box
    out = np.zeros(image.shape, bool)
    crop = image[r0:r1, c0:c1]
    out[r0:r1, c0:c1] = _otsu_foreground(crop.ravel(), crop)
    return out


def otsu_region_under_point(image: np.ndarray, point: tuple[int, int]) -> np.ndarray:
    return _component_at(_otsu_foreground(image.ravel(), image), point)


def _component_at(foreground: np.ndarray, point: tuple[int, int]) -> np.ndarray:
    """The connected region of the Otsu class the point falls in."""
    lab, _ = ndimage.label(foreground if foreground[point] else ~foreground)
    return lab == lab[point]


def _window(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Bounding box of ``mask`` grown by ``margin`` px, clipped to the image."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return (slice(max(rows.min() - margin, 0), rows.max() + margin + 1),
            slice(max(cols.min() - margin, 0), cols.max() + margin + 1))


def _tolerance(shape: tuple[int, int]) -> float:
    return max(1.0, 0.008 * math.hypot(*shape))


# ---------------------------------------------------------------------------- the loop
@dataclass
class ObjectRow:
    image: str
    plane: int
    label: int
    prompt: str
    method: str
    area: int
    iou: float
    boundary_f: float
    jf: float
    pcc: float
    mean_uncertainty: float
    iou_score: float


@dataclass
class _Pooled:
    unc: list = field(default_factory=list)
    err: list = field(default_factory=list)
    prob: list = field(default_factory=list)
    gt: list = field(default_factory=list)

    def add(self, unc, err, prob, gt):
        self.unc.append(unc.astype(np.float32))
        self.err.append(err)
        self.prob.append(prob.astype(np.float32))
        self.gt.append(gt)

    def metrics(self) -> dict:
        if not self.unc:
            return {k: float("nan") for k in ("auroc", "pavpu", "ece", "nll")}
        unc, err = np.concatenate(self.unc), np.concatenate(self.err)
        prob, gt = np.concatenate(self.prob), np.concatenate(self.gt)
        return {"auroc": auroc(unc, err), "pavpu": pavpu(unc, err), "ece": ece(prob, gt), "nll": nll(prob, gt)}


def _nanmean(values: Iterable[float]) -> float:
    arr = np.asarray(list(values), np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


@dataclass
class EvaluationReport:
    model: str
    n_images: int
    results: dict
    baselines: dict
    rows: list[ObjectRow]
    zoom: float | str = 1.0
    window: int | None = None
    box_size: float | None = None
    views: int = 1
    recentre: bool = False
    box_margin: float | None = None
    scales: int = 1
    window_step: float = 0.5

    def to_json(self) -> dict:
        return {"model": self.model, "n_images": self.n_images, "results": self.results, "baselines": self.baselines,
                "zoom": self.zoom, "window": self.window, "box_size": self.box_size, "views": self.views,
                "recentre": self.recentre, "box_margin": self.box_margin, "scales": self.scales,
                "window_step": self.window_step}


def pair_problem(image: np.ndarray, mask: np.ndarray) -> str | None:
    """Why an image and its instance mask cannot be evaluated together, or None.

    The mask must have the image's planes and pixels (an RGB image's colour axis aside) and
    hold integer object ids: a probability map or a colour-coded label image is not one."""
    colour = image.ndim == mask.ndim + 1 and image.shape[-1] in (3, 4)
    spatial = image.shape[:-1] if colour else image.shape
    if mask.ndim not in (2, 3) or spatial != mask.shape:
        return (f"image of shape {image.shape} and mask of shape {mask.shape} do not match "
                "(the mask needs the image's planes and pixels)")
    if mask.dtype.kind == "f":
        if not np.isfinite(mask).all() or not np.array_equal(mask, np.round(mask)):
            return f"mask holds non-integer values ({mask.dtype}); expected integer object ids, 0 = background"
    elif mask.dtype.kind not in "biu":
        return f"mask has unsupported dtype {mask.dtype}; expected integer object ids, 0 = background"
    if mask.min() < 0:
        return "mask holds negative values; expected object ids >= 1 and 0 = background"
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        bad = ~np.isfinite(image)
        where = ""
        if mask.ndim == 3:
            planes = np.flatnonzero(bad.reshape(len(bad), -1).any(1))
            where = f" in plane(s) {', '.join(str(int(z)) for z in planes[:5])}{', ...' if len(planes) > 5 else ''}"
        return (f"image holds {int(bad.sum())} NaN or infinite values{where}; replace them (e.g. with 0 or the "
                "background level) first")
    return None


def iter_planes(image: np.ndarray, mask: np.ndarray, name: str = "image"):
    """(plane index, image plane, label plane) for 2D images or 3D stacks."""
    problem = pair_problem(image, mask)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")
    if mask.ndim == 2:
        yield 0, image, mask
        return
    for z in range(mask.shape[0]):
        yield z, image[z], mask[z]


def evaluate_model(
    model,
    samples: Sequence[tuple[str, np.ndarray, np.ndarray]],
    prompt_modes: Sequence[str] = PROMPT_MODES,
    mode: str | None = None,
    mc_samples: int = 20,
    seed: int = 0,
    baselines: bool = True,
    model_name: str = "model",
    progress=None,
    zoom: float | str = 1.0,
    window: int | str | None = "auto",
    box_size: float | str | None = "auto",
    views: int | str = "auto",
    recentre: bool | str = "auto",
    box_margin: float | str | None = "auto",
    scales: int | str = 1,
    window_step: float = 0.5,
) -> EvaluationReport:
    """Evaluate ``model`` on ``(name, image, instance_labels)`` samples (2D or 3D); ``zoom`` and
    ``window`` as in :class:`~napari_ruac.model.Predictor` (prompts and metrics stay at the
    images' scale), as are ``box_size``, ``views``, ``recentre``, ``box_margin``, ``scales`` and
    ``window_step`` (``zoom``, ``views`` and ``scales`` apply to automatic segmentation as well)."""
    from .model import Predictor

    for p in prompt_modes:
        if p not in (*CORRECTIONS, "box", AUTOMATIC):
            raise ValueError(f"unknown prompt mode {p!r}; expected some of {(*CORRECTIONS, 'box', AUTOMATIC)}")
    automatic = AUTOMATIC in prompt_modes
    prompt_modes = [p for p in prompt_modes if p != AUTOMATIC]
    predictor = Predictor(model, zoom=zoom, window=window, box_size=box_size,
                          views=views, recentre=recentre, box_margin=box_margin, scales=scales,
                          window_step=window_step)
    segmenter = None
    if automatic:
        from .model.automatic import AutomaticSegmenter

        segmenter = AutomaticSegmenter(model, zoom=zoom, mode=mode, samples=mc_samples, seed=seed, views=views,
                                       scales=scales)
    auto = _AutomaticTally()
    rows: list[ObjectRow] = []
    pooled = {p: _Pooled() for p in prompt_modes}
    structure = ndimage.generate_binary_structure(2, 1)
    for name, image, labels in samples:
        for z, plane, lab in iter_planes(np.asarray(image), np.asarray(labels), name):
            ids = [int(i) for i in np.unique(lab) if i != 0]
            if not ids:
                continue
            if segmenter is not None:
                auto.add(name, z, segmenter.segment(plane), lab, rows)
            if not prompt_modes:
                if progress is not None:
                    progress(name, z)
                continue
            predictor.set_image(plane)
            grey = plane if plane.ndim == 2 else plane.mean(-1)
            plane_fg = _otsu_foreground(grey.ravel(), grey) if baselines else None
            # one generator per plane, so results do not depend on the order of planes
            rng = np.random.default_rng([seed, z, len(name)])
            for obj in ids:
                gt = lab == obj
                area = int(gt.sum())
                if area < MIN_OBJECT_AREA:
                    continue
                point = random_point_inside(gt, rng)
                box = tight_box(gt)
                for prompt in prompt_modes:
                    pred = _predict(predictor, prompt, gt, point, box, mode, mc_samples)
                    # metrics on a window around the object: whole-image morphology per object
                    # would dominate the run time
                    win = _window(gt | pred.mask, REGION_DILATION + 3)
                    g, m = gt[win], pred.mask[win]
                    region = ndimage.binary_dilation(g | m, structure, iterations=REGION_DILATION)
                    err = m[region] != g[region]
                    unc, prob = pred.uncertainty[win][region], pred.probability[win][region]
                    pooled[prompt].add(unc, err, prob, g[region])
                    j, f = iou(m, g), boundary_f(m, g, tolerance=_tolerance(gt.shape))
                    rows.append(ObjectRow(name, z, obj, prompt, "model", area, j, f, (j + f) / 2,
                                          pearson(unc, err), pred.mean_uncertainty, pred.iou_score))
                if baselines:
                    under_point = _component_at(plane_fg, point)
                    for method, m in (("ellipse_in_box", ellipse_in_box(gt.shape, box)),
                                      ("otsu_in_box", otsu_in_box(grey, box)),
                                      ("otsu_under_point", under_point)):
                        prompt = "point1" if method == "otsu_under_point" else "box"
                        win = _window(gt | m, 3)
                        j, f = iou(m[win], gt[win]), boundary_f(m[win], gt[win], tolerance=_tolerance(gt.shape))
                        rows.append(ObjectRow(name, z, obj, prompt, method, area, j, f, (j + f) / 2,
                                              float("nan"), float("nan"), float("nan")))
            if progress is not None:
                progress(name, z)
    results = {}
    for prompt in prompt_modes:
        mine = [r for r in rows if r.prompt == prompt and r.method == "model"]
        results[prompt] = {
            "n_objects": len(mine),
            "miou": _nanmean(r.iou for r in mine),
            "jf": _nanmean(r.jf for r in mine),
            "pcc": _nanmean(r.pcc for r in mine),
            **pooled[prompt].metrics(),
        }
    if automatic:
        mine = [r for r in rows if r.prompt == AUTOMATIC]
        results[AUTOMATIC] = {"miou": _nanmean(r.iou for r in mine), "jf": _nanmean(r.jf for r in mine),
                              **auto.metrics()}
    base = {}
    for method in ("ellipse_in_box", "otsu_in_box", "otsu_under_point"):
        theirs = [r for r in rows if r.method == method]
        if theirs:
            base[method] = {"prompt": theirs[0].prompt, "n_objects": len(theirs),
                            "miou": _nanmean(r.iou for r in theirs), "jf": _nanmean(r.jf for r in theirs)}
    return EvaluationReport(model_name, len(samples), results, base, rows,
                            "auto" if zoom == "auto" else predictor.zoom, predictor.window,
                            predictor.box_size, len(predictor.views), predictor.recentre, predictor.box_margin,
                            len(predictor.scales), predictor.window_step)


class _AutomaticTally:
    """Instance matching and uncertainty-vs-error statistics of automatic segmentation."""

    def __init__(self) -> None:
        self.n_true = self.n_found = self.n_matched = 0
        self.pcc: list[float] = []
        self.pooled = _Pooled()
        self.structure = ndimage.generate_binary_structure(2, 1)

    def add(self, name: str, z: int, result, truth: np.ndarray, rows: list) -> None:
        found = result.labels
        small = [i for i, a in zip(*np.unique(truth, return_counts=True)) if i and a < MIN_OBJECT_AREA]
        truth = np.where(np.isin(truth, small), 0, truth) if small else truth
        t_ids, t_inv = np.unique(truth, return_inverse=True)
        f_ids, f_inv = np.unique(found, return_inverse=True)
        # contingency table of true x found labels (index 0 = background when present)
        table = np.bincount(t_inv.ravel() * len(f_ids) + f_inv.ravel(), minlength=len(t_ids) * len(f_ids))
        table = table.reshape(len(t_ids), len(f_ids)).astype(np.float64)
        t_fg, f_fg = t_ids != 0, f_ids != 0
        inter = table[np.ix_(t_fg, f_fg)]
        union = table[t_fg].sum(1)[:, None] + table[:, f_fg].sum(0)[None, :] - inter
        ious = inter / np.maximum(union, 1)
        self.n_true += int(t_fg.sum())
        self.n_found += int(f_fg.sum())
        self.n_matched += int((ious > MATCH_IOU).sum())
        best = ious.argmax(1) if ious.shape[1] else np.zeros(ious.shape[0], int)
        f_labels = f_ids[f_fg]
        for i, lab in enumerate(t_ids[t_fg]):
            gt = truth == lab
            j = float(ious[i, best[i]]) if ious.shape[1] else 0.0
            m = found == f_labels[best[i]] if ious.shape[1] and j > 0 else np.zeros_like(gt)
            win = _window(gt | m, 3)
            f = boundary_f(m[win], gt[win], tolerance=_tolerance(gt.shape))
            rows.append(ObjectRow(name, z, int(lab), AUTOMATIC, "model", int(gt.sum()), j, f, (j + f) / 2,
                                  float("nan"), float("nan"), float("nan")))
        # which true object each found label stands for (its best overlap), to spot merges
        owner = np.zeros(int(found.max(initial=0)) + 1, dtype=truth.dtype)
        if ious.shape[0] and ious.shape[1]:
            owner[f_labels] = t_ids[t_fg][ious.argmax(0)]
        wrong = (found > 0) != (truth > 0)
        wrong |= (found > 0) & (truth > 0) & (owner[found] != truth)
        region = ndimage.binary_dilation((truth > 0) | (found > 0), self.structure, iterations=REGION_DILATION)
        unc, err = result.uncertainty[region], wrong[region]
        self.pcc.append(pearson(unc, err))
        self.pooled.unc.append(unc.astype(np.float32))
        self.pooled.err.append(err)

    def metrics(self) -> dict:
        precision = self.n_matched / self.n_found if self.n_found else float("nan")
        recall = self.n_matched / self.n_true if self.n_true else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        unc = np.concatenate(self.pooled.unc) if self.pooled.unc else np.zeros(0)
        err = np.concatenate(self.pooled.err) if self.pooled.err else np.zeros(0, bool)
        return {"n_objects": self.n_true, "n_found": self.n_found, "precision": precision, "recall": recall,
                "f1": f1, "pcc": _nanmean(self.pcc), "auroc": auroc(unc, err), "pavpu": pavpu(unc, err),
                "ece": float("nan"), "nll": float("nan")}


def _predict(predictor, prompt, gt, point, box, mode, mc_samples):
    kw = dict(mode=mode, samples=mc_samples)
    if prompt == "box":
        return predictor.predict(box=box, **kw)
    points, labels = [point], [1]
    pred = predictor.predict(points=points, labels=labels, **kw)
    for _ in range(CORRECTIONS[prompt]):
        click = correction_click(pred.mask, gt)
        if click is None:
            break
        points.append(click[0])
        labels.append(click[1])
        pred = predictor.predict(points=points, labels=labels, **kw)
    return pred


# ---------------------------------------------------------------------------- folders + CLI
def match_folders(images: Path, masks: Path) -> list[tuple[str, Path, Path]]:
    """Pair images with masks by file name (a mask may end in _mask/_masks/_labels/_label)."""
    images, masks = Path(images), Path(masks)
    for folder in (images, masks):
        if not folder.is_dir():
            raise FileNotFoundError(f"folder not found: {folder}")
    mask_files = {}
    for p in sorted(masks.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            stem = stack_stem(p)
            for tag in ("_masks", "_mask", "_labels", "_label"):
                if stem.endswith(tag):
                    stem = stem[: -len(tag)]
                    break
            mask_files[stem] = p
    pairs = []
    for p in sorted(images.iterdir()):
        stem = stack_stem(p)
        if p.suffix.lower() in IMAGE_SUFFIXES and stem in mask_files:
            if images == masks and p == mask_files[stem]:
                continue
            pairs.append((stem, p, mask_files[stem]))
    if not pairs:
        raise ValueError(f"no image in {images} has a mask with the same name in {masks}")
    return pairs


def unmatched_images(images: Path, pairs: list[tuple[str, Path, Path]]) -> list[Path]:
    """Image files in ``images`` that no pair uses (they have no mask)."""
    used = {img for _, img, _ in pairs} | {msk for _, _, msk in pairs}
    return [p for p in sorted(Path(images).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p not in used]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of images (TIFF/PNG, 2D or 3D)")
    parser.add_argument("--masks", required=True, help="folder of instance label masks, same file names")
    parser.add_argument("--model", default="micro", help="model name or checkpoint path")
    parser.add_argument("--checkpoint", default=None, help="weights file for an official SAM2.1 model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", default="point1,point3,box",
                        help="comma list of point1, point2, point3, box and automatic (automatic segmentation of "
                             "every plane, matched to the ground truth; slower)")
    parser.add_argument("--mode", choices=["analytic", "mc"], default=None, help="uncertainty mode")
    parser.add_argument("--samples", type=int, default=20, help="MC samples (--mode mc)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=zoom_value, default=1.0,
                        help="resize images by this factor before the model sees them (0.5: objects twice the "
                             "size the model was trained on); prompts and metrics stay at the images' scale. "
                             "'auto': each plane at the zoom that shows its typical object at the size the model "
                             "learned (from the size of its blobs), for prompts and automatic segmentation alike")
    parser.add_argument("--window", default="auto", help=WINDOW_HELP)
    parser.add_argument("--box-size", default="auto", help=BOX_SIZE_HELP)
    parser.add_argument("--box-margin", default="auto", help=BOX_MARGIN_HELP)
    parser.add_argument("--views", default="auto", help=VIEWS_HELP)
    parser.add_argument("--scales", default="1", help=SCALES_HELP)
    parser.add_argument("--window-step", type=window_step_value, default=0.5,
                        help="prompts' windows start on a grid of this fraction of the window, in (0, 0.5] "
                             "(default 0.5; 0.125 was the default until 2026-12-07)")
    parser.add_argument("--recentre", action=argparse.BooleanOptionalAction, default=None, help=RECENTRE_HELP)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--json", default=None, help="write results JSON here (per-object CSV beside it)")


def run(args: argparse.Namespace) -> int:
    from .io.imageio import read_image
    from .model import load_model

    pairs = match_folders(Path(args.images), Path(args.masks))
    unmatched = unmatched_images(Path(args.images), pairs)
    if unmatched:
        shown = ", ".join(p.name for p in unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
        print(f"skipping {len(unmatched)} image(s) without a mask in {args.masks}: {shown}")
    samples, problems = [], []
    for name, img, msk in pairs:  # every pair checked before minutes of evaluation start
        try:
            image, mask = read_image(img), read_image(msk)
        except (ValueError, OSError) as exc:  # an unreadable file is one problem among the others
            problems.append(f"  {img.name} / {msk.name}: {exc}")
            continue
        problem = pair_problem(image, mask)
        if problem is not None:
            problems.append(f"  {img.name} / {msk.name}: {problem}")
        samples.append((name, image, mask))
    if problems:
        raise ValueError(f"{len(problems)} of {len(pairs)} image/mask pairs cannot be evaluated:\n" + "\n".join(problems))
    if args.json:  # and where the results go is writable, before the run rather than after it
        folder = Path(args.json).resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the folder for --json {args.json}: {exc.strerror or exc}") from exc
        if not os.access(folder, os.W_OK):
            raise ValueError(f"cannot write --json {args.json}: folder {folder} is not writable")
    model = load_model(args.model, device=args.device, checkpoint=args.checkpoint)
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    report = evaluate_model(model, samples, prompts, mode=args.mode, mc_samples=args.samples, seed=args.seed,
                            baselines=not args.no_baselines, model_name=str(args.model), zoom=args.zoom,
                            window=args.window, box_size=args.box_size, views=args.views, scales=args.scales,
                            window_step=args.window_step,
                            recentre="auto" if args.recentre is None else args.recentre, box_margin=args.box_margin)
    print_report(report)
    if args.json:
        write_report(report, Path(args.json))
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.csv')}")
    return 0


def print_report(report: EvaluationReport) -> None:
    print(f"model {report.model}, {report.n_images} images")
    print("| prompt | objects | mIoU | J&F | PCC | AUROC | PAvPU | ECE | NLL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for prompt, r in report.results.items():
        print(f"| {prompt} | {r['n_objects']} | {r['miou']:.3f} | {r['jf']:.3f} | {r['pcc']:.3f} | "
              f"{r['auroc']:.3f} | {r['pavpu']:.3f} | {r['ece']:.3f} | {r['nll']:.3f} |")
    if AUTOMATIC in report.results:
        r = report.results[AUTOMATIC]
        print(f"automatic segmentation: {r['n_found']} objects found for {r['n_objects']} true ones; at IoU > "
              f"{MATCH_IOU}: precision {r['precision']:.3f}, recall {r['recall']:.3f}, F1 {r['f1']:.3f}")
    for method, b in report.baselines.items():
        print(f"| baseline {method} ({b['prompt']}) | {b['n_objects']} | {b['miou']:.3f} | {b['jf']:.3f} | | | | | |")


def write_report(report: EvaluationReport, path: Path) -> None:
    from .io.imageio import atomic_write_text

    atomic_write_text(path, json.dumps(report.to_json(), indent=2, allow_nan=True))
    lines = [list(asdict(report.rows[0]).keys())] if report.rows else []
    lines += [list(asdict(r).values()) for r in report.rows]
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(lines)
    atomic_write_text(path.with_suffix(".csv"), buf.getvalue())

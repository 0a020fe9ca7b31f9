"""Automatic instance segmentation: grid, batched decoding, filters, NMS, label resolution and
the per-pixel uncertainty of the decision. Real SAM2 modules (``test-tiny``); what the model
*finds* is checked with the trained ``micro`` model, skipped while its weights are missing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_ruac.io.normalize import to_rgb_float
from napari_ruac.model.automatic import (
    AutomaticSegmenter,
    MaskCandidate,
    SUPPORT_LOGIT,
    _sample_window,
    _support_window,
    box_nms,
    canonical_relabel,
    crop_boxes,
    drop_cut_candidates,
    merge_fragments,
    point_grid,
    reported_iou,
    resolve_labels,
    trained_heads,
)
from napari_ruac.model.weibull import binary_entropy

# every filter open and one grid pass, as SAM2's generator decodes (refinement and the point filter
# have tests of their own)
PERMISSIVE = dict(pred_iou_thresh=-1.0, stability_score_thresh=0.0, max_mean_uncertainty=1.0,
                  object_score_thresh=-1e9, point_in_mask=False, refine_rounds=0, multimask=True)


def discs(shape=(96, 96), centres=((20, 22, 8), (62, 30, 10), (40, 72, 12)), noise=0.05, seed=0):
    """A synthetic plane with bright discs and their true masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 0.1, np.float32)
    masks = []
    for cy, cx, r in centres:
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[m] = 0.9
        masks.append(m)
    img += rng.normal(0, noise, shape).astype(np.float32)
    return img, masks


def _cand(box, value, window=None, iou=0.9, source=(0, 0, 64, 64), shape=(64, 64)):
    """A candidate with constant logit ``value`` on ``box`` and -value around it."""
    window = window or (max(0, box[0] - 2), max(0, box[1] - 2), min(shape[0], box[2] + 2), min(shape[1], box[3] + 2))
    logits = np.full((window[2] - window[0], window[3] - window[1]), -abs(value), np.float32)
    logits[box[0] - window[0] : box[2] - window[0], box[1] - window[1] : box[3] - window[1]] = value
    area = (box[2] - box[0]) * (box[3] - box[1])
    return MaskCandidate(window, logits, box, area, iou, 1.0, 0.0, source)


# ---------------------------------------------------------------------------- geometry
def test_point_grid_is_cell_centred():
    g = point_grid(4)
    assert g.shape == (16, 2)
    assert np.allclose(np.unique(g[:, 0]), [0.125, 0.375, 0.625, 0.875])
    with pytest.raises(ValueError, match="points_per_side"):
        point_grid(0)


def test_crop_pyramid_covers_the_plane_with_overlap():
    boxes = crop_boxes((100, 140), 2, 0.25)
    assert [layer for _, layer in boxes] == [0] + [1] * 4 + [2] * 16
    for layer in (1, 2):
        cover = np.zeros((100, 140), int)
        for (r0, c0, r1, c1), lay in boxes:
            if lay == layer:
                assert 0 <= r0 < r1 <= 100 and 0 <= c0 < c1 <= 140
                cover[r0:r1, c0:c1] += 1
        assert cover.min() >= 1 and cover.max() >= 2  # everything covered, neighbours overlap


def test_window_sampling_equals_upsampling_the_whole_map():
    """Sampling a window must give exactly what upsampling the full low-res map gives."""
    low = torch.randn(24, 20)
    full = F.interpolate(low[None, None], size=(96, 80), mode="bilinear", align_corners=False)[0, 0]
    window = (10, 7, 41, 66)
    got = _sample_window(low, window, 0.25)
    assert np.allclose(got, full[10:41, 7:66].numpy(), atol=1e-5)
    # from a low-res window: exact wherever interpolation needs nothing outside it
    part = low[2:12, 1:17]  # low-res rows 2..11 cover pixel rows 10..45 (centres (r+.5)/4-.5 in [2, 11])
    got = _sample_window(part, (10, 6, 46, 66), 0.25, origin=(2, 1))
    assert np.allclose(got, full[10:46, 6:66].numpy(), atol=1e-5)


# ---------------------------------------------------------------------------- the model path
def test_grid_is_decoded_in_batches_with_one_encoder_pass(tiny_model):
    img, _ = discs()
    seg = AutomaticSegmenter(tiny_model, points_per_side=10, points_per_batch=32, **PERMISSIVE)
    result = seg.segment(img)
    s = result.stats
    assert s.n_encoder_calls == 1 and s.n_points == 100
    assert s.n_decoder_calls == math.ceil(100 / 32)
    assert s.n_masks_decoded == 100 * 3  # multimask: three masks per point
    assert result.labels.shape == img.shape and result.labels.dtype == np.int32
    assert result.uncertainty.shape == img.shape and result.uncertainty.dtype == np.float32
    assert 0 <= result.uncertainty.min() and result.uncertainty.max() <= 1


def test_batch_size_does_not_change_the_result(tiny_model):
    img, _ = discs()
    a = AutomaticSegmenter(tiny_model, points_per_side=8, points_per_batch=64, **PERMISSIVE).segment(img)
    b = AutomaticSegmenter(tiny_model, points_per_side=8, points_per_batch=7, **PERMISSIVE).segment(img)
    assert np.array_equal(a.labels, b.labels)
    assert np.allclose(a.uncertainty, b.uncertainty, atol=1e-5)


def test_filters_keep_only_masks_that_pass(tiny_model):
    img, _ = discs()
    rgb = to_rgb_float(img)
    loose = AutomaticSegmenter(tiny_model, points_per_side=8, box_nms_thresh=1.0, **PERMISSIVE)
    everything = loose.candidates(rgb)
    assert everything, "the permissive segmenter found no candidate at all"
    ious = np.array([c.iou_score for c in everything])
    stab = np.array([c.stability for c in everything])
    unc = np.array([c.mean_uncertainty for c in everything])
    # thresholds between the observed values: some pass, some do not
    tested = 0
    for values, kw, passes in (
        (ious, "pred_iou_thresh", ious > np.median(ious)),
        (stab, "stability_score_thresh", stab >= np.median(stab)),
        (unc, "max_mean_uncertainty", unc <= np.median(unc)),
    ):
        if np.ptp(values) == 0:
            continue
        tested += 1
        thresh = float(np.median(values))
        opts = {**PERMISSIVE, kw: thresh}
        kept = AutomaticSegmenter(tiny_model, points_per_side=8, box_nms_thresh=1.0, **opts).candidates(rgb)
        # exactly the candidates whose value passes survive (no NMS here: threshold 1.0)
        assert len(kept) == int(passes.sum()) < len(everything), kw
        for c in kept:
            if kw == "pred_iou_thresh":
                assert c.iou_score > thresh
            elif kw == "stability_score_thresh":
                assert c.stability >= thresh
            else:
                assert c.mean_uncertainty <= thresh
    assert tested >= 2
    none = AutomaticSegmenter(tiny_model, points_per_side=8, **{**PERMISSIVE, "pred_iou_thresh": ious.max() + 1})
    result = none.segment(img)
    assert result.objects == [] and not result.labels.any() and not result.uncertainty.any()


def test_uncertainty_is_that_of_the_decision_at_each_pixel(tiny_model):
    """Recompute the decision from the kept candidates: label = argmax p (if > 0.5),
    uncertainty = H(max p), per-object mean = mean over its pixels."""
    img, _ = discs()
    seg = AutomaticSegmenter(tiny_model, points_per_side=8, **PERMISSIVE)
    result = seg.segment(img)
    cands = seg.candidates(to_rgb_float(img))
    best = np.zeros(img.shape, np.float32)
    for c in cands:
        r0, c0, r1, c1 = c.window
        p = torch.sigmoid(torch.from_numpy(c.logits)).numpy()
        best[r0:r1, c0:c1] = np.maximum(best[r0:r1, c0:c1], p)
    expected = binary_entropy(torch.from_numpy(best)).numpy()
    assert np.allclose(result.uncertainty, expected, atol=1e-5)
    assert np.array_equal(result.labels > 0, best > 0.5)
    for obj in result.objects:
        sel = result.labels == obj.label
        assert obj.area == sel.sum()
        assert obj.mean_uncertainty == pytest.approx(float(result.uncertainty[sel].mean()), abs=1e-5)


def test_segmentation_is_deterministic_in_mc_mode(tiny_model):
    img, _ = discs()
    seg = AutomaticSegmenter(tiny_model, points_per_side=6, mode="mc", samples=4, **PERMISSIVE)
    a, b = seg.segment(img), seg.segment(img)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.uncertainty, b.uncertainty)


def test_zoom_scales_every_crop_frame_and_keeps_labels_at_plane_size(tiny_model):
    seg = AutomaticSegmenter(tiny_model, points_per_side=4, crop_n_layers=1, zoom=0.5)
    assert seg._frame((64, 64), 0, seg.zoom).scale == 0.5 and seg._frame((64, 64), 1, seg.zoom).scale == 1.0
    img, _ = discs()
    result = seg.segment(img)
    assert result.labels.shape == img.shape and result.uncertainty.shape == img.shape
    assert seg.options()["zoom"] == 0.5
    with pytest.raises(ValueError, match="zoom"):
        AutomaticSegmenter(tiny_model, zoom=0)


def test_auto_zoom_shows_large_nuclei_at_the_size_the_model_learned(micro):
    # nine discs ~50 px across, twice what micro learned: at zoom 1 their grid clicks give
    # token-sized pieces that never add up to whole discs
    rng = np.random.default_rng(0)
    centres = [((i + 0.5) * 256 / 3 + rng.uniform(-5, 5), (j + 0.5) * 256 / 3 + rng.uniform(-5, 5),
                rng.uniform(22, 28)) for i in range(3) for j in range(3)]
    img, masks = discs((256, 256), centres, noise=0.03)
    plain = AutomaticSegmenter(micro).segment(img)
    auto_seg = AutomaticSegmenter(micro, zoom="auto")
    auto = auto_seg.segment(img)
    assert plain.zoom == 1.0 and auto.zoom < 0.75 and auto_seg.options()["zoom"] == "auto"
    assert recall(auto.labels, masks) == 1.0 and recall(plain.labels, masks) < 1.0
    assert auto.labels.max() <= 10 < plain.labels.max()  # at zoom 1 the discs fall into pieces
    # a plane with nothing to measure is seen at its own scale
    assert auto_seg.plane_zoom(np.random.default_rng(1).random((96, 96), dtype=np.float32)) == 1.0
    with pytest.raises(ValueError, match="zoom"):
        AutomaticSegmenter(micro, zoom="big")


def test_auto_zoom_leaves_models_that_resize_every_plane_alone():
    import dataclasses

    from napari_ruac.model import build_model
    from napari_ruac.model.config import TEST_TINY

    resizing = build_model(dataclasses.replace(TEST_TINY, input_scaling="resize")).eval()
    img, _ = discs((256, 256), ((128, 128, 50),))  # one disc 100 px across: auto would say 0.25
    assert AutomaticSegmenter(resizing, zoom="auto").plane_zoom(img) == 1.0


def test_crop_layers_add_magnified_crops(tiny_model):
    img, _ = discs()
    seg = AutomaticSegmenter(tiny_model, points_per_side=4, crop_n_layers=1, **PERMISSIVE)
    s = seg.segment(img).stats
    assert s.n_crops == 5 and s.n_encoder_calls == 5 and s.n_points == 5 * 16


# ---------------------------------------------------------------------------- pure parts
def test_nms_keeps_the_best_of_overlapping_boxes():
    a = _cand((10, 10, 30, 30), 5.0, iou=0.8)
    b = _cand((11, 11, 30, 31), 5.0, iou=0.9)  # same object, better score
    c = _cand((40, 40, 50, 50), 5.0, iou=0.5)  # elsewhere
    kept = box_nms([a, b, c], 0.7)
    assert kept == [b, c]
    assert box_nms([a, b, c], 1.0) == [b, a, c]  # nothing suppressed: score order


def test_cut_candidates_are_dropped_except_at_plane_edges():
    inner = _cand((10, 30, 20, 40), 5.0, source=(0, 30, 64, 64))  # touches the crop's left edge
    at_plane = _cand((0, 40, 10, 50), 5.0, source=(0, 30, 64, 64))  # touches the plane's top edge
    kept = drop_cut_candidates([inner, at_plane], (64, 64))
    assert kept == [at_plane]


def test_resolution_gives_each_pixel_to_the_most_probable_mask():
    big = _cand((10, 10, 40, 40), 2.0)  # p = 0.88
    small = _cand((20, 20, 30, 30), 4.0)  # p = 0.98, inside big
    labels, unc, objects = resolve_labels([big, small], (64, 64))
    assert len(objects) == 2
    inner = labels[25, 25]
    outer = labels[12, 12]
    assert inner != outer and inner > 0 and outer > 0
    assert (labels == inner).sum() == 100 and (labels == outer).sum() == 900 - 100
    h = lambda p: float(binary_entropy(torch.tensor(p)))  # noqa: E731
    assert unc[25, 25] == pytest.approx(h(torch.sigmoid(torch.tensor(4.0)).item()), abs=1e-5)
    assert unc[12, 12] == pytest.approx(h(torch.sigmoid(torch.tensor(2.0)).item()), abs=1e-5)
    # background just outside `big`: decided by big's p = sigmoid(-2), outside all windows: 0
    assert labels[9, 25] == 0 and unc[9, 25] == pytest.approx(h(torch.sigmoid(torch.tensor(-2.0)).item()), abs=1e-5)
    assert unc[60, 60] == 0
    by_label = {o.label: o for o in objects}
    assert by_label[outer].area == 800 and by_label[inner].area == 100
    assert by_label[inner].mean_uncertainty == pytest.approx(float(unc[labels == inner].mean()), abs=1e-6)


def test_small_instances_return_to_the_background_and_labels_are_canonical():
    a = _cand((30, 30, 40, 40), 3.0)
    b = _cand((5, 5, 8, 8), 3.0)  # 9 px
    labels, _, objects = resolve_labels([a, b], (64, 64), min_area=10)
    assert [o.area for o in objects] == [100] and labels.max() == 1
    # numbering follows raster order, not candidate order
    l1, _, _ = resolve_labels([a, b], (64, 64))
    l2, _, _ = resolve_labels([b, a], (64, 64))
    assert np.array_equal(l1, l2) and l1[6, 6] == 1 and l1[35, 35] == 2
    ids = np.array([[0, 7, 7], [3, 0, 9]])
    relabelled, order = canonical_relabel(ids)
    assert relabelled.tolist() == [[0, 1, 1], [2, 0, 3]] and order == [7, 3, 9]


# ---------------------------------------------------------------------------- trained model


def test_trained_model_finds_the_objects_of_a_synthetic_image(micro):
    centres = ((30, 30, 10), (30, 90, 12), (90, 40, 9), (95, 100, 14), (60, 64, 8))
    img, masks = discs((128, 128), centres, noise=0.03)
    result = AutomaticSegmenter(micro, points_per_side=16).segment(img)
    found = 0
    for m in masks:
        ids, counts = np.unique(result.labels[m], return_counts=True)
        best = max(((i, c) for i, c in zip(ids, counts) if i), key=lambda t: t[1], default=None)
        if best is None:
            continue
        pred = result.labels == best[0]
        if (pred & m).sum() / (pred | m).sum() > 0.5:
            found += 1
    assert found >= 4, f"found {found} of {len(masks)} objects"
    # uncertainty concentrates on boundaries, not inside objects
    inside = np.logical_or.reduce(masks)
    assert result.uncertainty[inside].mean() < 0.5


def disc_grid(shape=(256, 256), n_side=4, seed=0):
    """Non-overlapping bright discs (r 6-13 px) on a jittered grid, with their true masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 0.1, np.float32)
    masks = []
    step = shape[0] / n_side
    for i in range(n_side):
        for j in range(n_side):
            cy, cx = (i + 0.5) * step + rng.uniform(-12, 12), (j + 0.5) * step + rng.uniform(-12, 12)
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(6, 13) ** 2
            img[m] = rng.uniform(0.6, 1.0)
            masks.append(m)
    return img + rng.normal(0, 0.03, shape).astype(np.float32), masks


def recall(labels, masks, at=0.5):
    """Fraction of true masks that some label covers with IoU above ``at``."""
    found = 0
    for m in masks:
        ids, counts = np.unique(labels[m], return_counts=True)
        best = max(((i, c) for i, c in zip(ids, counts) if i), key=lambda t: t[1], default=None)
        found += bool(best and ((labels == best[0]) & m).sum() / ((labels == best[0]) | m).sum() > at)
    return found / len(masks)


def test_our_models_defaults_skip_the_heads_stage_1_never_trained(micro, tiny_model):
    seg = AutomaticSegmenter(micro)
    assert not trained_heads(micro)
    assert seg.multimask is False and seg.pred_iou_thresh < 0 and seg.rank_by == "confidence"
    assert seg.stability_score_thresh == 0.5  # softer logits than SAM2's
    assert seg.tile_size == micro.config.image_size  # tiles are the crops it learned from
    # SAM2's weights (or a model without our recipe) keep SAM's choices
    assert trained_heads(tiny_model)
    sam = AutomaticSegmenter(tiny_model)
    assert sam.multimask is True and sam.pred_iou_thresh == 0.7 and sam.rank_by == "iou"
    assert sam.stability_score_thresh == 0.8
    assert AutomaticSegmenter(micro, stability_score_thresh=0.9).stability_score_thresh == 0.9
    # what users are shown of the IoU head: nothing where it is untrained
    assert np.isnan(reported_iou(micro, 0.93)) and reported_iou(tiny_model, 0.93) == pytest.approx(0.93)
    assert AutomaticSegmenter(micro, multimask=True, pred_iou_thresh=0.5, rank_by="iou").options()["pred_iou_thresh"] == 0.5
    with pytest.raises(ValueError, match="rank_by"):
        AutomaticSegmenter(micro, rank_by="area")
    with pytest.raises(ValueError, match="refine_rounds"):
        AutomaticSegmenter(micro, refine_rounds=-1)
    assert AutomaticSegmenter(micro).options()["scales"] == 1
    assert AutomaticSegmenter(micro, scales="auto").options()["scales"] == 3
    with pytest.raises(ValueError, match="scales must be"):
        AutomaticSegmenter(micro, scales=2)


def test_reclicks_at_three_scales_are_decoded_at_each(micro):
    """The re-click step decodes each object's click at three zooms: its masks (and so the
    labels and uncertainty) differ from one zoom's, and the grid step before it does not."""
    img, masks = discs((160, 160), ((40, 40, 11), (40, 115, 13), (115, 50, 10), (112, 112, 12)), noise=0.03)
    one, three = AutomaticSegmenter(micro, scales=1), AutomaticSegmenter(micro, scales=3)
    rgb = to_rgb_float(img)
    assert [c.box for c in one.candidates(rgb)] == [c.box for c in three.candidates(rgb)]
    a, b = one.segment(img), three.segment(img)
    assert recall(a.labels, masks) == recall(b.labels, masks) == 1.0
    assert not np.allclose(a.uncertainty, b.uncertainty, atol=1e-3)


def test_a_grid_click_keeps_only_a_mask_that_holds_it(micro):
    img, _ = discs((128, 128), ((30, 30, 10), (30, 90, 12), (90, 40, 9), (95, 100, 14), (60, 64, 8)), noise=0.03)
    rgb = to_rgb_float(img)
    opts = dict(points_per_side=16, refine_rounds=0, box_nms_thresh=1.0)
    held = AutomaticSegmenter(micro, point_in_mask=True, **opts).candidates(rgb)
    anywhere = AutomaticSegmenter(micro, point_in_mask=False, **opts).candidates(rgb)
    assert 0 < len(held) < len(anywhere)
    grid = point_grid(16) * 128
    for c in held:  # each kept mask holds at least one grid click
        r0, c0, r1, c1 = c.window
        mask = np.zeros(img.shape, bool)
        mask[r0:r1, c0:c1] = c.logits > 0
        assert any(mask[int(r), int(q)] for r, q in grid)


def test_refining_clicks_at_mask_centres_finds_whole_objects(micro):
    img, masks = discs((128, 128), ((30, 30, 10), (30, 90, 12), (90, 40, 9), (95, 100, 14), (60, 64, 8)), noise=0.03)
    once = AutomaticSegmenter(micro, points_per_side=16, refine_rounds=0).segment(img)
    refined = AutomaticSegmenter(micro, points_per_side=16, refine_rounds=1).segment(img)
    # the second round is one more decoder pass per batch of surviving masks
    assert refined.stats.n_decoder_calls > once.stats.n_decoder_calls
    assert refined.stats.n_points == once.stats.n_points == 256
    # fragments of one disc (clicks near its edge) converge on the whole disc: fewer distinct
    # masks survive NMS (a weaker model also left more labels without the refinement; the
    # shipped one's fragments are merged either way, so the labels must not get worse)
    assert refined.stats.n_after_nms < once.stats.n_after_nms
    assert recall(refined.labels, masks) >= recall(once.labels, masks)
    assert refined.labels.max() <= once.labels.max()
    again = AutomaticSegmenter(micro, points_per_side=16, refine_rounds=1).segment(img)
    assert np.array_equal(again.labels, refined.labels)


def test_candidate_windows_reach_where_the_probability_is_negligible():
    # a broad low-res logit bump: the mask (logit > 0) is small, p stays above 0.25 % further out
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    logits = 4.0 - ((yy - 30) ** 2 + (xx - 34) ** 2) / 12.0
    rows, cols = torch.nonzero(logits > 0, as_tuple=True)
    box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    a0, b0, a1, b1 = _support_window(logits, box, margin=2, max_margin=32)
    win = logits[a0:a1, b0:b1]
    border = torch.cat([win[0], win[-1], win[:, 0], win[:, -1]])
    assert bool((border < -SUPPORT_LOGIT).all())
    assert (a1 - a0) > (box[2] - box[0]) + 4  # it grew beyond the initial margin
    # capped: a map that never falls off stops at max_margin
    flat = torch.zeros(64, 64)
    assert _support_window(flat, (30, 30, 34, 34), margin=2, max_margin=8) == (22, 22, 42, 42)


def test_a_candidate_that_lost_most_of_its_mask_is_dropped():
    big = _cand((10, 10, 40, 40), 4.0)  # 900 px, p = 0.98
    piece = _cand((10, 30, 40, 44), 2.0)  # 420 px, 300 of them inside big (less probable there)
    kept_all, _, objs = resolve_labels([big, piece], (64, 64))
    assert len(objs) == 2
    labels, unc, objs = resolve_labels([big, piece], (64, 64), min_kept=0.5)  # piece kept 120/420
    assert len(objs) == 1 and objs[0].area == 900 and labels[20, 42] == 0
    assert np.array_equal(unc, resolve_labels([big, piece], (64, 64))[1])  # the decision map is unchanged
    assert len(resolve_labels([big, piece], (64, 64), min_kept=0.25)[2]) == 2


def test_pieces_of_one_object_are_merged_and_touching_objects_are_not():
    left = _cand((10, 10, 30, 24), 4.0, iou=0.9)  # two pieces of one object, 160 px (57 %) shared
    right = _cand((10, 16, 30, 34), 3.0, iou=0.8)
    neighbour = _cand((10, 33, 30, 50), 4.0, iou=0.7)  # touches right (20 px, 6 % shared)
    apart = _cand((40, 40, 50, 50), 4.0)
    merged = merge_fragments([left, right, neighbour, apart], 0.5)
    assert len(merged) == 3
    whole = merged[0]
    assert whole.box == (10, 10, 30, 34) and whole.area == 20 * 24 and whole.iou_score == 0.9
    assert whole.window == (8, 8, 32, 36)
    # its logit is the better member's wherever either reaches
    assert whole.logits[20 - 8, 15 - 8] == 4.0 and whole.logits[20 - 8, 30 - 8] == 3.0
    labels, _, objs = resolve_labels(merged, (64, 64))
    assert len(objs) == 3 and len(np.unique(labels[10:30, 10:33])) == 1  # one object, not cut (col 33: neighbour)
    assert labels[20, 45] not in (0, labels[20, 15])
    # unmerged, resolution cuts the object in two; 0 turns merging off; chains merge transitively
    assert len(resolve_labels([left, right, neighbour, apart], (64, 64))[2]) == 4
    assert merge_fragments([left, right, neighbour, apart], 0.0) == [left, right, neighbour, apart]
    assert len(merge_fragments([left, right, neighbour, apart], 0.01)) == 2


def test_merging_is_on_for_our_models_and_off_for_sam2_weights(micro, tiny_model):
    assert AutomaticSegmenter(micro).merge_overlap == 0.5
    assert AutomaticSegmenter(tiny_model).merge_overlap == 0.0
    assert AutomaticSegmenter(micro, merge_overlap=0).options()["merge_overlap"] == 0.0
    with pytest.raises(ValueError, match="merge_overlap"):
        AutomaticSegmenter(micro, merge_overlap=1.5)


def test_interior_points_lie_inside_each_label_away_from_its_neighbours():
    from napari_ruac.model.automatic import interior_points

    labels = np.zeros((40, 60), np.int32)
    labels[5:25, 5:25] = 1
    labels[5:25, 25:45] = 2  # touches label 1 along column 25
    labels[30, 50] = 3  # one pixel: no interior
    pts = interior_points(labels, [1, 2, 3])
    assert [labels[p] for p in pts] == [1, 2, 3]
    assert 12 <= pts[0][1] <= 17 and 32 <= pts[1][1] <= 37  # in the middle, not at the shared edge
    assert pts[2] == (30, 50)


def test_reclicking_objects_as_a_user_would_segments_real_nuclei_better(micro):
    """The bundled DSB2018 image: every object found clicked again at its centre in the
    interactive predictor's context window and test-time views (the default for our models)."""
    import tifffile

    from napari_ruac.evaluate import _AutomaticTally

    root = __import__("pathlib").Path(__file__).resolve().parent.parent / "sample_data"
    img, truth = tifffile.imread(root / "nuclei2d.tif"), tifffile.imread(root / "nuclei2d_labels.tif")
    f1 = {}
    for reclick in (False, True):
        seg = AutomaticSegmenter(micro, reclick=reclick)
        result = seg.segment(img)
        tally = _AutomaticTally()
        tally.add("dsb", 0, result, truth, [])
        f1[reclick] = tally.metrics()["f1"]
        assert result.labels.shape == img.shape and result.uncertainty.max() <= 1.0
        assert len(result.objects) == result.labels.max()
    assert AutomaticSegmenter(micro).reclick and AutomaticSegmenter(micro).options()["views"] == 4
    assert f1[True] > f1[False] + 0.1, f1


def test_reclick_defaults_follow_the_heads_and_bad_values_are_refused(tiny_model):
    assert not AutomaticSegmenter(tiny_model).reclick  # SAM2's weights keep SAM's algorithm
    seg = AutomaticSegmenter(tiny_model, reclick=True, views=2, points_per_side=4, **{
        k: v for k, v in PERMISSIVE.items() if k not in ("multimask",)})
    img, _ = discs()
    again = AutomaticSegmenter(tiny_model, reclick=True, views=2, points_per_side=4, **{
        k: v for k, v in PERMISSIVE.items() if k not in ("multimask",)})
    a, b = seg.segment(img), again.segment(img)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.uncertainty, b.uncertainty)
    with pytest.raises(ValueError, match="reclick"):
        AutomaticSegmenter(tiny_model, reclick="yes")
    with pytest.raises(ValueError, match="views"):
        AutomaticSegmenter(tiny_model, views=3)

"""Tiling: planes larger than the model's input are segmented in overlapping tiles and stitched
without seams or duplicates."""

from __future__ import annotations


import numpy as np
import pytest

from napari_ruac.io.normalize import to_rgb_float
from napari_ruac.model.automatic import AutomaticSegmenter, resolve_labels
from napari_ruac.model.tiling import ThresholdSegmenter, segment_tiled, tile_boxes, tiled_candidates


def blobs(shape=(200, 260), n=40, seed=1):
    """Bright blobs of varied size and shape (some on tile borders) with soft edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape, np.float32)
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(3, 11), rng.uniform(3, 11)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        img = np.maximum(img, np.clip(1.5 - d, 0, 1))
    return img


@pytest.mark.parametrize("shape,tile,overlap", [((200, 260), 64, 24), ((64, 300), 128, 40), ((50, 50), 64, 10)])
def test_tiles_cover_the_plane_and_overlap(shape, tile, overlap):
    boxes = tile_boxes(shape, tile, overlap)
    cover = np.zeros(shape, int)
    for r0, c0, r1, c1 in boxes:
        assert r1 - r0 <= tile and c1 - c0 <= tile
        cover[r0:r1, c0:c1] += 1
    assert cover.min() >= 1
    rows = sorted({b[0] for b in boxes})
    ends = sorted({b[2] for b in boxes})
    for nxt, end in zip(rows[1:], ends[:-1]):
        assert end - nxt >= overlap  # neighbours share at least the halo


def test_bad_tiling_parameters_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        tile_boxes((100, 100), 32, 32)
    with pytest.raises(ValueError, match="tile_size"):
        tile_boxes((100, 100), 0, 0)


@pytest.mark.parametrize("tile,overlap", [(64, 28), (100, 30), (80, 40)])
def test_tiling_gives_the_same_labels_as_a_single_pass(tile, overlap):
    """With a segmenter whose result does not depend on the tile origin, stitching must be
    exact: same labels (same numbering), same uncertainty, no seams, no duplicates."""
    rgb = to_rgb_float(blobs())
    seg = ThresholdSegmenter(threshold=0.5)
    single = segment_tiled(seg, rgb, tile_size=1000, overlap=0)
    tiled = segment_tiled(seg, rgb, tile_size=tile, overlap=overlap)
    assert single.labels.max() >= 15
    assert np.array_equal(tiled.labels, single.labels)
    assert np.array_equal(tiled.uncertainty, single.uncertainty)
    assert [(o.label, o.area) for o in tiled.objects] == [(o.label, o.area) for o in single.objects]
    # objects that cross a tile border exist and are still one label each
    boxes = tile_boxes(rgb.shape[:2], tile, overlap)
    borders = {b[2] for b in boxes if b[2] < rgb.shape[0]}
    crossing = [o for o in tiled.objects if any(o.bbox[0] < r <= o.bbox[2] - 1 for r in borders)]
    assert crossing


def test_copies_from_overlapping_tiles_are_merged():
    rgb = to_rgb_float(blobs())
    cands = tiled_candidates(ThresholdSegmenter(), rgb, 64, 28)
    boxes = np.array([c.box for c in cands])
    assert len({tuple(b) for b in boxes}) == len(cands)  # no object kept twice
    labels, _, objects = resolve_labels(cands, rgb.shape[:2])
    assert len(objects) == len(cands)


def test_large_planes_are_tiled_by_the_model_segmenter(tiny_model):
    plane = blobs((150, 150), n=12)
    seg = AutomaticSegmenter(tiny_model, points_per_side=4, tile_size=64, tile_overlap=16,
                             pred_iou_thresh=-1, stability_score_thresh=0, max_mean_uncertainty=1,
                             object_score_thresh=-1e9)
    result = seg.segment(plane)
    n_tiles = len(tile_boxes(plane.shape, 64, 16))
    assert result.stats.n_encoder_calls == n_tiles
    assert result.labels.shape == plane.shape and result.uncertainty.shape == plane.shape
    # a plane that fits is one pass, and tiling it with a tile as large as it changes nothing
    small = plane[:64, :64]
    one = seg.segment(small)
    assert one.stats.n_encoder_calls == 1
    direct = segment_tiled(lambda t: seg.candidates(t), to_rgb_float(small), 64, 16)
    assert np.array_equal(one.labels, direct.labels)




def test_trained_model_tiled_finds_the_objects_a_single_pass_finds(micro):
    # discs on a jittered grid, some across the borders of 128 px tiles (half the crop micro
    # learned from): tiling must not lose or split them
    from test_automatic import disc_grid, recall

    for seed in range(2):
        plane, masks = disc_grid(seed=seed)
        single = AutomaticSegmenter(micro, points_per_side=24).segment(plane)
        tiled = AutomaticSegmenter(micro, points_per_side=12, tile_size=128, tile_overlap=48).segment(plane)
        assert tiled.stats.n_encoder_calls == len(tile_boxes(plane.shape, 128, 48)) > 1
        assert recall(single.labels, masks) >= 0.85
        assert recall(tiled.labels, masks) >= recall(single.labels, masks) - 0.125  # at most 2 of 16

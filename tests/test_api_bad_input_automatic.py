"""Bad input to AutomaticSegmenter, tiling and the zoom estimate: clear errors naming the
argument instead of ZeroDivisionErrors, TypeErrors from deep inside or silently empty results."""

import numpy as np
import pytest

from napari_ruac.io import ImageError
from napari_ruac.model.automatic import AutomaticSegmenter
from napari_ruac.model.scale import auto_zoom
from napari_ruac.model.tiling import tile_boxes


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(points_per_side=2.5), "points_per_side must be a whole number"),  # a skewed grid, silently
        (dict(points_per_side="16"), "points_per_side must be a whole number"),  # TypeError comparing
        (dict(points_per_batch=2.5), "points_per_batch must be a whole number"),  # TypeError in range()
        (dict(crop_n_layers=1, crop_n_points_downscale_factor=0), "crop_n_points_downscale_factor"),  # ZeroDivision
        (dict(crop_n_layers=1, crop_overlap_ratio=-1), "crop_overlap_ratio must be a fraction"),  # ZeroDivision
        (dict(crop_n_layers=-1), "crop_n_layers must be a whole number >= 0"),
        (dict(max_mean_uncertainty=float("nan")), "max_mean_uncertainty must be a finite number"),  # no masks
        (dict(pred_iou_thresh=float("nan")), "pred_iou_thresh must be a finite number"),
        (dict(box_nms_thresh=-1), "box_nms_thresh must be a fraction"),  # kept one mask, silently
        (dict(window_margin=-3), "window_margin must be a whole number >= 0"),
        (dict(seed="x"), "seed must be a whole number"),  # TypeError in the decoder's seeding
    ],
)
def test_bad_segmenter_options_name_the_argument(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutomaticSegmenter(tiny_model, **kwargs)


def test_candidates_names_an_image_that_is_not_rgb(tiny_model):
    seg = AutomaticSegmenter(tiny_model, points_per_side=2)
    with pytest.raises(ImageError, match="\\(H, W, 3\\)"):  # was torch's permute(sparse_coo) error
        seg.candidates(np.ones((10, 10), np.float32))


def test_tile_boxes_refuses_fractional_or_empty_sizes():
    with pytest.raises(ValueError, match="tile_size must be a positive whole number"):
        tile_boxes((100, 100), 32.5, 8)  # gave boxes ending at 32.5, 54.5, ...
    with pytest.raises(ValueError, match="tile_size must be a positive whole number"):
        tile_boxes((100, 100), float("nan"), 8)  # blamed the overlap
    with pytest.raises(ValueError, match="shape must be a plane's"):
        tile_boxes((0, 10), 5, 1)  # gave tiles of no rows


@pytest.mark.parametrize("target", [0, -5, float("nan")])
def test_auto_zoom_refuses_a_target_that_is_not_a_size(target):
    rr, cc = np.mgrid[:64, :64]
    plane = (((rr - 32) ** 2 + (cc - 32) ** 2) < 100).astype(np.float32)
    with pytest.raises(ValueError, match="target must be a diameter"):  # "math domain error"
        auto_zoom(plane, target=target)

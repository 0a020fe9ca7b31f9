"""Object-size estimation and the automatic zoom (napari_ruac.model.scale)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ruac.model.scale import TARGET_DIAMETER, auto_zoom, estimate_object_diameter


def disc_field(diameter: float, shape=(256, 256), dark=False, seed=0):
    """Discs of one diameter on a jittered grid ~2.5 diameters apart (nuclei in a field of
    view), with mild noise; dark discs on a bright field (brightfield-like) when ``dark``."""
    rng = np.random.default_rng(seed)
    n_side = int(np.clip(shape[0] // (2.5 * diameter), 3, 12))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 0.1, np.float32)
    step = shape[0] / n_side
    for i in range(n_side):
        for j in range(n_side):
            cy, cx = (i + 0.5) * step + rng.uniform(-3, 3), (j + 0.5) * step + rng.uniform(-3, 3)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (diameter / 2) ** 2] = 0.8
    img += rng.normal(0, 0.02, shape).astype(np.float32)
    return 0.9 - img if dark else img


@pytest.mark.parametrize("diameter", [8, 14, 24, 40, 56])
def test_diameter_of_bright_and_dark_discs_within_an_eighth(diameter):
    for dark in (False, True):
        est = estimate_object_diameter(disc_field(diameter, dark=dark))
        assert est is not None and abs(est - diameter) / diameter < 0.12, (diameter, dark, est)


def test_colour_planes_and_integer_dtypes():
    grey = disc_field(20)
    rgb = np.stack([grey * 200, grey * 100, grey * 250], -1).astype(np.uint8)
    assert estimate_object_diameter(rgb) == pytest.approx(estimate_object_diameter(grey), rel=0.2)


@pytest.mark.parametrize("plane", [np.zeros((64, 64)), np.full((64, 64), 7.0),
                                   np.random.default_rng(0).random((128, 128)), np.zeros((4, 4)),
                                   np.array([[np.nan] * 16] * 16)])
def test_nothing_to_measure_gives_no_estimate_and_zoom_one(plane):
    assert estimate_object_diameter(plane) is None
    assert auto_zoom(plane) == 1.0


def test_zoom_brings_objects_to_the_target_in_quarter_octaves_and_is_clamped():
    for diameter in (14, 28, 56):
        z = auto_zoom(disc_field(diameter))
        assert abs(np.log2(z * diameter / TARGET_DIAMETER)) <= 0.4  # within ~ a third of an octave
        assert (4 * np.log2(z)) == pytest.approx(round(4 * np.log2(z)))
    assert auto_zoom(disc_field(24), target=2400) == 4.0  # clamped to the range
    assert auto_zoom(disc_field(40), target=1) == 0.25


# ---------------------------------------------------------------------------- zoom="auto" for prompts
def _disc_under(img: np.ndarray, point) -> np.ndarray:
    from scipy import ndimage

    labels, _ = ndimage.label(img > 0.45)
    return labels == labels[point]


@pytest.mark.parametrize("diameter, shape", [(72, (320, 320)), (10, (128, 128))])
def test_auto_zoom_lets_one_click_take_a_large_or_a_tiny_object_whole(micro, diameter, shape):
    """At zoom 1 the shipped model takes a piece of a 72 px disc around an off-centre click (it
    learned nuclei of ~8-60 px) and misses the edges of a 10 px one; seen at each plane's own
    zoom, one click takes either whole."""
    from napari_ruac import Predictor

    img = disc_field(diameter, shape=shape)
    centre = 1.5 * shape[0] / int(np.clip(shape[0] // (2.5 * diameter), 3, 12))  # the middle disc
    click = (int(centre + 0.25 * diameter), int(centre - 0.2 * diameter))
    disc = _disc_under(img, click)
    ious = {}
    for zoom in (1.0, "auto"):
        predictor = Predictor(micro, zoom=zoom)
        predictor.set_image(img)
        mask = predictor.predict(points=[click]).mask
        ious[zoom] = (mask & disc).sum() / (mask | disc).sum()
    assert predictor.auto_zoom and predictor.zoom == auto_zoom(img) != 1.0
    assert ious["auto"] > 0.9 and ious["auto"] > ious[1.0] + 0.1, ious


def test_auto_zoom_is_each_planes_own_and_estimated_once_per_plane(tiny_model):
    from napari_ruac import Predictor

    large, small = disc_field(72, shape=(320, 320)), disc_field(10, shape=(128, 128))
    predictor = Predictor(tiny_model, zoom="AUTO")
    assert predictor.auto_zoom and predictor.zoom == 1.0  # before a plane is set
    zooms = []
    for plane in (large, small, large):
        predictor.set_image(plane)
        zooms.append(predictor.zoom)
        assert predictor._frame_for(plane.shape).scale == pytest.approx(predictor.zoom, rel=0.02)
        assert predictor.is_cached(plane)  # at its own zoom, embedded above
    assert zooms == [auto_zoom(large), auto_zoom(small), auto_zoom(large)] and zooms[0] < 0.5 < 2 < zooms[1]
    assert len(predictor._plane_zooms) == 2  # the third plane's estimate came from the first
    predictor.zoom = 0.5  # a number turns it off and forgets the plane
    assert not predictor.auto_zoom and not predictor.is_image_set
    predictor.set_image(small)
    assert predictor.zoom == 0.5
    predictor.zoom = "auto"
    assert predictor.auto_zoom and not predictor.is_image_set
    assert predictor.is_cached(small)  # its auto-zoom embedding is still in the cache
    predictor.set_image(small)
    assert predictor.zoom == zooms[1]
    with pytest.raises(ValueError, match="zoom must be 'auto' or a number, got 'big'"):
        predictor.zoom = "big"


def test_a_planes_zoom_can_be_estimated_ahead_on_another_thread(tiny_model):
    import threading

    from napari_ruac import Predictor

    large, small = disc_field(72, shape=(320, 320)), disc_field(10, shape=(128, 128))
    predictor = Predictor(tiny_model, zoom="auto")
    assert not predictor.knows_zoom(large) and not predictor.is_image_set
    ahead = threading.Thread(target=predictor.plane_zoom, args=(large,))
    ahead.start()
    predictor.set_image(small)  # predicting on this thread meanwhile
    predictor.predict(points=[(64, 64)], labels=[1])
    ahead.join()
    assert predictor.knows_zoom(large) and predictor.plane_zoom(large) == auto_zoom(large)
    assert predictor.zoom == auto_zoom(small)  # the current plane's, untouched by the estimate
    predictor.set_image(large)
    assert predictor.zoom == auto_zoom(large) and len(predictor._plane_zooms) == 2
    fixed = Predictor(tiny_model, zoom=0.5)
    assert fixed.knows_zoom(large) and fixed.plane_zoom(large) == 0.5
    with pytest.raises(ValueError, match="NaN"):
        predictor.plane_zoom(np.full((32, 32), np.nan, np.float32))


def test_auto_zoom_is_one_for_models_that_resize_every_plane(tiny_model):
    from dataclasses import replace

    from napari_ruac import Predictor
    from napari_ruac.model import build_model

    model = build_model(replace(tiny_model.config, input_scaling="resize")).eval()
    predictor = Predictor(model, zoom="auto")
    predictor.set_image(disc_field(72, shape=(320, 320)))
    assert predictor.auto_zoom and predictor.zoom == 1.0


def test_a_large_plane_is_measured_on_its_central_part():
    from napari_ruac.model.scale import MAX_MEASURED_SIDE

    centre = disc_field(16, shape=(MAX_MEASURED_SIDE, MAX_MEASURED_SIDE))
    plane = np.full((2 * MAX_MEASURED_SIDE, 2 * MAX_MEASURED_SIDE + 100), 0.1, np.float32)
    r0, c0 = MAX_MEASURED_SIDE // 2, MAX_MEASURED_SIDE // 2 + 50
    plane[r0 : r0 + MAX_MEASURED_SIDE, c0 : c0 + MAX_MEASURED_SIDE] = centre
    plane[:40, :40] = 0.8  # a large bright block outside the central part: not measured
    assert estimate_object_diameter(plane) == pytest.approx(estimate_object_diameter(centre))
    assert estimate_object_diameter(plane) == pytest.approx(16, rel=1 / 8)


def test_auto_zoom_keeps_8_bit_colour_images_at_zoom_one(tiny_model):
    """On colour display images (histology) the strongest blobs need not be the objects, so
    "auto" leaves them at 1; the same picture as grey or as 16-bit channels is measured."""
    from napari_ruac import Predictor
    from napari_ruac.model.scale import plane_zoom

    grey = disc_field(72, shape=(320, 320))
    rgb = np.repeat((np.clip(grey, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    predictor = Predictor(tiny_model, zoom="auto")
    predictor.set_image(rgb)
    assert predictor.zoom == 1.0
    predictor.set_image(rgb[..., 0])
    assert predictor.zoom == auto_zoom(grey) < 0.5
    assert plane_zoom(tiny_model.config, rgb.astype(np.uint16)) == auto_zoom(grey)

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

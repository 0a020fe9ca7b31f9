"""One click plus propagation, measured (napari_ruac.evaluate_propagation): the bookkeeping on
hand-made masks, and what the shipped `micro` model does on small synthetic stacks whose truth
is known (nuclei-like ellipsoids in a z-stack; two nuclei crossing a time-lapse)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_ruac.evaluate_propagation import (
    follow_tracks,
    followed,
    objects_3d,
    points_by_frame,
    propagation_ious,
)
from napari_ruac.model.propagation import StopRule


def nuclei_stack(n=14, size=96, seed=0):
    """Two blurred ellipsoids (~25 px across, 9 planes deep) in noise, and their labels."""
    rng = np.random.default_rng(seed)
    z, r, c = np.ogrid[:n, :size, :size]
    labels = np.zeros((n, size, size), np.uint16)
    for i, (cz, cr, cc) in enumerate([(6, 30, 30), (7, 64, 62)], start=1):
        labels[((z - cz) / 4.5) ** 2 + ((r - cr) / 13) ** 2 + ((c - cc) / 12) ** 2 <= 1] = i
    image = ndi.gaussian_filter((labels > 0).astype(np.float32), (0.7, 1.2, 1.2)) * 800 + 100
    return (image + rng.normal(0, 25, image.shape)).astype(np.float32), labels


def moving_nuclei(t=8, size=96, step=4.0, seed=0):
    """Two nuclei moving ``step`` px a frame in opposite directions; (frames, tracks)."""
    rng = np.random.default_rng(seed)
    r, c = np.ogrid[:size, :size]
    frames, tracks = [], []
    for k in range(t):
        img = np.zeros((size, size), np.float32)
        for tid, (r0, c0, dc) in enumerate([(24, 16, step), (70, 80, -step)]):
            img[((r - r0) / 12) ** 2 + ((c - c0 - dc * k) / 13) ** 2 <= 1] = 1
            tracks.append((tid + 7, k, r0, c0 + dc * k))
        frames.append(ndi.gaussian_filter(img, 1.2) * 800 + 100 + rng.normal(0, 25, img.shape))
    return np.array(frames, np.float32), np.array(tracks, float)


def test_followed_needs_the_own_point_and_no_other():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    assert followed(mask, 1, {1: (3, 3), 2: (8, 8)})
    assert not followed(mask, 1, {1: (3, 3), 2: (4, 4)})  # swallowed a neighbour
    assert not followed(mask, 1, {1: (8, 8), 2: (0, 0)})  # left its nucleus
    assert followed(mask, 1, {1: (3, 3), 2: (-1, 3), 3: (3, 40)})  # points off the frame are not held
    assert not followed(None, 1, {1: (3, 3)})  # propagation stopped before this frame


def test_points_by_frame_and_malformed_tracks():
    got = points_by_frame(np.array([[5, 0, 1.4, 2.6], [5, 1, 3.0, 4.0], [6, 1, 7.0, 8.0]]))
    assert got == {0: {5: (1, 3)}, 1: {5: (3, 4), 6: (7, 8)}}
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        points_by_frame(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        points_by_frame(np.array([[1, 0, np.nan, 2.0]]))


def test_objects_3d_clicks_the_innermost_pixel_of_the_largest_section():
    labels = np.zeros((4, 20, 30), np.uint8)
    labels[1, 2:9, 3:18] = 3  # 7 x 15
    labels[2, 4:7, 5:8] = 3  # smaller section
    labels[0:3, 12:20, 0:8] = 9  # touches the image's bottom and left edges
    got = objects_3d(labels)
    assert [g[:2] for g in got] == [(3, 1), (9, 0)]
    assert got[0][2] == (5, 6)  # row centre of the 7-row section, the first column of its flat top
    # the image's edge is not background (as on the whole plane): the innermost pixel is its corner
    assert got[1][2] == (19, 0)
    with pytest.raises(ValueError, match="planes, rows, columns"):
        objects_3d(labels[0])


def test_propagation_ious_with_the_trained_model(micro):
    image, labels = nuclei_stack()
    blind = propagation_ious(micro, image, labels, rule=StopRule(min_contrast_ratio=None))
    seen = propagation_ious(micro, image, labels)  # the annotator's rule
    assert len(seen) == 2
    # without the contrast rule the masks run on through the noise above and below each nucleus
    assert min(seen) > 0.75 and max(blind) < min(seen) - 0.15
    with pytest.raises(ValueError, match="differ"):
        propagation_ious(micro, image[:-1], labels)


def test_follow_tracks_with_the_trained_model(micro):
    frames, tracks = moving_nuclei()
    report = follow_tracks(micro, frames, tracks)
    assert report.tracks == 2 and report.frames == 14
    # the nuclei move their own width over the frames: a mask held still loses them
    assert report.followed >= 0.7 and report.followed > report.held_still + 0.25
    assert 300 < report.first_area < 800  # ~ the nucleus (~490 px), not the frame
    bad = tracks.copy()
    bad[-1, 1] = 8
    with pytest.raises(ValueError, match="frames"):
        follow_tracks(micro, frames, bad)

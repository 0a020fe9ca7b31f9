"""Propagation of one object through a stack.

The stopping logic is checked with a classical segmenter (threshold inside the prompt box: the
Otsu-in-box baseline with a fixed threshold) on synthetic volumes whose true extent is known; the
model path is checked with the real `test-tiny` predictor (random weights: bookkeeping only).
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_ruac.model.predictor import Prediction, Predictor, Prompt
from napari_ruac.model.propagation import (
    StopRule,
    iter_propagate,
    predictor_segmenter,
    prompt_from_mask,
    propagate,
)


def ball_stack(n=15, size=48, center=(7, 24, 24), radius=5.5, drift=0.0):
    """A float (n, size, size) stack with one bright ball (planes 2..12 for the defaults)."""
    z, r, c = np.ogrid[:n, :size, :size]
    cr = center[1] + drift * (z - center[0])
    inside = (z - center[0]) ** 2 + (r - cr) ** 2 + (c - center[2]) ** 2 <= radius**2
    return inside.astype(np.float32)


def threshold_in_box(stack):
    """A real (non-learned) segmenter: pixels above 0.5 inside the prompt box."""

    def segment(index: int, prompt: Prompt) -> Prediction:
        plane = stack[index]
        r0, c0, r1, c1 = (int(round(v)) for v in prompt.box)
        mask = np.zeros(plane.shape, bool)
        mask[r0:r1, c0:c1] = plane[r0:r1, c0:c1] > 0.5
        unc = np.full(plane.shape, 0.1 + 0.05 * index, np.float32)
        return Prediction(mask=mask, probability=mask.astype(np.float32), uncertainty=unc, iou_score=0.9)

    return segment


def test_prompt_from_mask_box_and_interior_point():
    mask = np.zeros((20, 30), bool)
    mask[5:10, 8:20] = True
    mask[15, 25] = True  # a stray pixel: not part of the object
    p = prompt_from_mask(mask, n_points=2, box_margin=1)
    assert p.box == (4.0, 7.0, 11.0, 21.0)
    assert len(p.points) == 2 and p.labels == [1, 1]
    for r, c in p.points:
        assert mask[int(r), int(c)]
    with pytest.raises(ValueError, match="empty mask"):
        prompt_from_mask(np.zeros((4, 4), bool))


def test_propagation_stops_where_the_ball_ends():
    stack = ball_stack()
    start_mask = stack[7] > 0.5
    result = propagate(threshold_in_box(stack), len(stack), 7, start_mask)
    truth = [i for i in range(len(stack)) if stack[i].sum() >= StopRule().min_area]
    assert result.indices == truth
    for i in truth:
        np.testing.assert_array_equal(result.planes[i].mask, stack[i] > 0.5)
    assert "object ended" in result.stop_reasons["forward"]
    assert "object ended" in result.stop_reasons["backward"]
    # per-plane mean uncertainty is recorded, and the worst plane is the least certain one
    curve = result.mean_uncertainty()
    assert curve[truth[-1]] == pytest.approx(0.1 + 0.05 * truth[-1])
    assert result.worst_plane() == truth[-1]
    vol = result.to_volume(len(stack), stack.shape[1:])
    assert vol.dtype == bool and vol.shape == stack.shape and vol[truth].any() and not vol[0].any()


def test_propagation_follows_a_drifting_object_and_ignores_a_neighbour():
    stack = ball_stack(n=15, size=64, center=(7, 20, 20), radius=6, drift=1.0)
    # a second object beside the first: prompts must not jump onto it
    stack = np.maximum(stack, ball_stack(n=15, size=64, center=(7, 20, 50), radius=6))
    start = 7
    result = propagate(threshold_in_box(stack), len(stack), start, largest(stack[start] > 0.5, col_max=35))
    for i in result.indices:
        cols = np.nonzero(result.planes[i].mask)[1]
        assert cols.max() < 35, f"plane {i} jumped onto the neighbour"
    assert len(result.indices) >= 9


def largest(mask, col_max):
    out = mask.copy()
    out[:, col_max:] = False
    return out


def test_collapse_and_jump_stop_rules():
    rule = StopRule(min_area=4, min_area_ratio=0.2, min_overlap=0.3, overlap_margin=1)
    prev = np.zeros((30, 30), bool)
    prev[5:15, 5:15] = True
    small = np.zeros_like(prev)
    small[8:11, 8:11] = True  # 9 px after 100 px: a collapse
    assert "collapsed" in rule.why_stop(small, prev)
    moved = np.zeros_like(prev)
    moved[18:28, 18:28] = True
    assert "left the previous object" in rule.why_stop(moved, prev)
    assert rule.why_stop(prev, prev) is None


def test_start_outside_or_empty_is_a_clear_error():
    stack = ball_stack()
    seg = threshold_in_box(stack)
    with pytest.raises(IndexError, match="outside the stack"):
        propagate(seg, len(stack), 20, stack[7] > 0.5)
    with pytest.raises(ValueError, match="nothing to propagate"):
        propagate(seg, len(stack), 7, np.zeros(stack.shape[1:], bool))


def test_generator_can_be_stopped_midway():
    stack = ball_stack()
    gen = iter_propagate(threshold_in_box(stack), len(stack), 7, stack[7] > 0.5, directions=(1,))
    first = next(gen)
    assert first[0] == 1 and first[1].index == 8
    gen.close()  # a cancelled worker simply stops resuming the generator


def test_propagation_with_the_real_tiny_model(tiny_model):
    rng = np.random.default_rng(0)
    stack = (ball_stack(n=5, size=40, center=(2, 20, 20), radius=8) + 0.1 * rng.random((5, 40, 40))).astype(np.float32)
    predictor = Predictor(tiny_model)
    segment = predictor_segmenter(predictor, lambda i: stack[i])
    start_mask = stack[2] > 0.5
    # permissive rule: random weights make arbitrary masks; this checks the plumbing
    rule = StopRule(min_area=1, min_area_ratio=0.0, min_overlap=0.0)
    result = propagate(segment, len(stack), 2, start_mask, rule=rule, keep_uncertainty=True)
    assert result.start == 2 and 2 in result.planes
    for i, plane in result.planes.items():
        assert plane.mask.shape == (40, 40) and plane.mask.dtype == bool
        if i != 2:
            assert 0.0 <= plane.mean_uncertainty <= 1.0
            assert plane.uncertainty.shape == (40, 40)
    assert set(result.stop_reasons) == {"forward", "backward"}


def keeps_the_box(index: int, prompt: Prompt) -> Prediction:
    """A segmenter that, like the model on a percentile-normalised plane of background noise,
    returns an object whatever the plane holds: the disc inscribed in the prompt box."""
    r0, c0, r1, c1 = prompt.box
    rr, cc = np.ogrid[:48, :48]
    cy, cx, ry, rx = (r0 + r1) / 2 - 0.5, (c0 + c1) / 2 - 0.5, (r1 - r0) / 2 - 2, (c1 - c0) / 2 - 2
    mask = ((rr - cy) / ry) ** 2 + ((cc - cx) / rx) ** 2 <= 1
    return Prediction(mask=mask, probability=mask.astype(np.float32), uncertainty=np.zeros((48, 48), np.float32),
                      iou_score=float("nan"))


@pytest.mark.parametrize("dark", [False, True])
def test_propagation_stops_where_the_object_no_longer_stands_out(dark):
    rng = np.random.default_rng(0)
    ball = ball_stack()  # planes 2..12
    stack = (100 + 400 * ball + rng.normal(0, 20, ball.shape)).astype(np.float32)
    if dark:  # dark objects on a bright field (brightfield): the contrast is negative throughout
        stack = 1000 - stack
    start = ball[7] > 0.5
    blind = propagate(keeps_the_box, len(stack), 7, start)
    assert blind.indices == list(range(15))  # without the planes nothing tells it the ball ended
    seen = propagate(keeps_the_box, len(stack), 7, start, get_plane=lambda i: stack[i])
    assert 5 in seen.indices and 9 in seen.indices and set(seen.indices) <= set(range(2, 13))
    for key in ("forward", "backward"):
        assert "faded into its surroundings" in seen.stop_reasons[key]
    # with the rule off the planes change nothing
    off = propagate(keeps_the_box, len(stack), 7, start, get_plane=lambda i: stack[i],
                    rule=StopRule(min_contrast_ratio=None))
    assert off.indices == list(range(15))


def test_contrast_is_inside_minus_a_ring_around_and_nan_without_a_ring():
    rule = StopRule()
    plane = np.full((40, 40, 3), 10.0, np.float32)
    mask = np.zeros((40, 40), bool)
    mask[15:25, 15:25] = True
    plane[mask] = 50.0
    assert rule.contrast(plane, mask) == pytest.approx(40.0)  # colour planes: the mean of channels
    assert np.isnan(rule.contrast(plane, np.ones((40, 40), bool)))
    assert rule.faded(5.0, 40.0) is not None and rule.faded(20.0, 40.0) is None
    assert rule.faded(-30.0, -40.0) is None and rule.faded(30.0, -40.0) is not None  # dark objects

"""Bad input to propagation (``propagate``/``iter_propagate``/``prompt_from_mask``) and to
``evaluate_propagation``'s functions: clear errors, no hang, no numpy traceback from deep inside."""

import numpy as np
import pytest

from napari_ruac import Predictor
from napari_ruac.evaluate_propagation import follow_tracks, objects_3d, points_by_frame, propagation_ious
from napari_ruac.model.propagation import iter_propagate, predictor_segmenter, prompt_from_mask, propagate

RR, CC = np.mgrid[:64, :64]
DISC = ((RR - 32) ** 2 + (CC - 32) ** 2) < 100
STACK = np.stack([DISC * 1.0 + 0.1] * 5).astype(np.float32)


@pytest.fixture(scope="module")
def segment(tiny_model):
    return predictor_segmenter(Predictor(tiny_model), lambda k: STACK[k])


def test_a_direction_other_than_one_step_is_refused_not_looped(segment):
    calls = []

    def counting(index, prompt):
        calls.append(index)
        if len(calls) > 20:  # a step of 0 tried the same plane for ever
            raise RuntimeError("propagation does not end")
        return segment(index, prompt)

    for bad in ((0,), (2,), (1, 0)):
        with pytest.raises(ValueError, match="directions must hold 1"):
            list(iter_propagate(counting, 5, 2, DISC, directions=bad))
    assert not calls


@pytest.mark.parametrize(
    "mask,get_plane,match",
    [
        (np.stack([DISC] * 5), True, "start_mask must be the start plane's \\(H, W\\) mask"),  # unpack error
        (DISC.ravel(), True, "start_mask must be the start plane's \\(H, W\\) mask"),
        (DISC[:40, :40], True, "start_mask has shape \\(40, 40\\) but plane 2"),  # numpy IndexError
        (np.pad(DISC, ((0, 20), (0, 20))), True, "start_mask has shape \\(84, 84\\) but plane 2"),
        (np.pad(DISC, ((0, 20), (0, 20))), False, "start_mask has shape \\(84, 84\\) but the mask of plane"),
    ],
)
def test_a_seed_mask_of_the_wrong_shape_is_named(segment, mask, get_plane, match):
    kwargs = dict(get_plane=lambda k: STACK[k]) if get_plane else {}
    with pytest.raises(ValueError, match=match):  # were broadcast/IndexErrors from numpy
        propagate(segment, 5, 2, mask, **kwargs)


def test_other_bad_arguments_are_named(segment):
    with pytest.raises(TypeError, match="start must be a whole plane index"):  # IndexError in the stack
        propagate(segment, 5, 1.5, DISC)
    with pytest.raises(ValueError, match="start_uncertainty has shape \\(10, 10\\)"):  # numpy IndexError
        propagate(segment, 5, 2, DISC, start_uncertainty=np.zeros((10, 10)))
    with pytest.raises(ValueError, match="mask must be one plane's"):  # scipy's "equal rank" RuntimeError
        prompt_from_mask(np.stack([DISC] * 2))


def test_evaluate_propagation_names_bad_stacks_and_tracks(tiny_model):
    labels = np.zeros((5, 64, 64), np.int32)
    labels[1:4] = DISC
    with pytest.raises(ValueError, match="label stack is empty"):  # numpy's zero-size reduction error
        objects_3d(labels[:0])
    with pytest.raises(ValueError, match="whole-number object ids"):  # 1.5 was read as object 1
        objects_3d(labels * 1.5)
    assert objects_3d(labels.tolist()) == objects_3d(labels)  # lists: an AttributeError before
    with pytest.raises(ValueError, match="object 1: plane 9 is outside the stack of 5 planes"):
        propagation_ious(tiny_model, STACK, labels, objects=[(1, 9, (32, 32))])
    with pytest.raises(ValueError, match="tracks is empty"):  # "min() arg is an empty sequence"
        follow_tracks(tiny_model, STACK, np.zeros((0, 4)))
    with pytest.raises(ValueError, match="must hold numbers"):  # numpy's isfinite TypeError
        points_by_frame(np.array([["a", 0, 1, 1]]))
    with pytest.raises(ValueError, match="frames must be whole numbers"):  # frame 0.6 was read as 0
        points_by_frame(np.array([[1, 0.6, 10, 10]]))

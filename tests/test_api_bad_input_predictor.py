"""Bad input to Predictor: a clear error naming the argument, never a numpy/torch traceback from
deep inside or a silent result (the project's bad-input standard)."""

import numpy as np
import pytest

from napari_ruac import Predictor
from napari_ruac.model import PromptError


@pytest.fixture(scope="module")
def predictor(tiny_model):
    p = Predictor(tiny_model)
    rr, cc = np.mgrid[:150, :210]
    p.set_image((100 + 900 * (((rr - 50) ** 2 + (cc - 60) ** 2) < 400)).astype(np.uint16))
    return p


@pytest.mark.parametrize(
    "kwargs,match",
    [
        # were sorted into another box silently
        (dict(box=(60, 80, 10, 20)), "corners swapped"),
        (dict(box=(10, 80, 60, 20)), "corners swapped"),
        # were ValueErrors from numpy ("could not convert string to float", "inhomogeneous shape")
        (dict(points="ab"), "points must be a list of \\(row, col\\) numbers"),
        (dict(points=[(1, 2), (3,)]), "points must be a list of \\(row, col\\) numbers"),
        (dict(box="abcd"), "box must be"),
        # said "1 points but 1 labels"
        (dict(points=[(10, 10)], labels=[[1]]), "labels must be a list of one 1 or 0 per point"),
        (dict(points=[(10, 10)], labels=1), "labels must be a list of one 1 or 0 per point"),
        # labels without points were ignored
        (dict(box=(0, 0, 20, 20), labels=[1]), "0 points but 1 labels"),
        # NaN corners were said to lie outside the image only
        (dict(box=(np.nan, 0, 10, 10)), "not a finite position"),
    ],
)
def test_bad_prompts_name_the_problem(predictor, kwargs, match):
    with pytest.raises(PromptError, match=match):
        predictor.predict(**kwargs)


def test_a_box_in_order_still_predicts(predictor):
    assert predictor.predict(box=(10, 20, 60, 80)).mask.shape == (150, 210)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="mc", samples=2.5), "samples must be a whole number"),  # was a torch TypeError in rand()
        (dict(seed="x"), "seed must be a whole number"),  # was torch's "manual_seed expected a long"
    ],
)
def test_bad_sampling_options_name_the_argument(predictor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(points=[(50, 60)], **kwargs)


@pytest.mark.parametrize(
    "prompts,match",
    [
        ([{"point": [(1, 1)]}], "unknown prompt key\\(s\\) 'point'"),  # was Prompt.__init__'s TypeError
        ([[(1, 1)]], "object 0: a prompt set must be a Prompt or a dict"),  # "argument after ** must be a mapping"
        ({"points": [(1, 1)]}, "prompts must be a list of prompt sets"),  # iterated the dict's keys
    ],
)
def test_bad_prompt_sets_name_the_object(predictor, prompts, match):
    with pytest.raises(PromptError, match=match):
        predictor.predict_batch(prompts)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cache_size=-1), "cache_size must be a whole number"),  # was KeyError 'dictionary is empty'
        (dict(cache_size="16"), "cache_size must be a whole number"),  # was a TypeError comparing int and str
        (dict(window_step="half"), "window_step must be"),  # was a TypeError comparing int and str
        (dict(window=float("inf")), "window must be"),  # was an OverflowError
    ],
)
def test_bad_options_name_the_argument(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Predictor(tiny_model, **kwargs)


def test_embed_window_refuses_a_bad_zoom_or_window(tiny_model):
    p = Predictor(tiny_model)
    p.set_image(np.random.default_rng(0).integers(0, 255, (300, 300)).astype(np.uint8))
    zoom, window = p.click_windows()[0]
    with pytest.raises(ValueError, match="zoom"):  # was encoded at zoom -1 and cached
        p.embed_window(-1, window)
    for bad in ((0, 0, -10, 10), (0, 0, 400, 10), (5, 5, 5, 50), "abcd"):
        with pytest.raises(ValueError, match="window must be"):  # were encoded (or failed in numpy)
            p.embed_window(zoom, bad)
    assert not p._cache
    p.embed_window(zoom, window)
    assert len(p._cache) == len(p.views)

"""Predictor: images of any dtype/size, prompts in (row, col), outputs at the input size."""

import numpy as np
import pytest
import torch

from napari_ruac import Prediction, Predictor
from napari_ruac.io import ImageError
from napari_ruac.model import PromptError


@pytest.fixture
def predictor(tiny_model):
    return Predictor(tiny_model)


def _blobs(shape=(150, 210), dtype=np.uint16):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    img = 100 + 900 * (((rr - 50) ** 2 + (cc - 60) ** 2) < 20**2)
    img = img + 600 * (((rr - 110) ** 2 + (cc - 160) ** 2) < 15**2)
    return img.astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64, bool])
def test_outputs_match_input_size_for_any_dtype(predictor, dtype):
    img = _blobs(dtype=np.float64)
    img = img > 500 if dtype is bool else img.astype(dtype)
    predictor.set_image(img)
    pred = predictor.predict(points=[(50, 60)], labels=[1])
    assert isinstance(pred, Prediction)
    assert pred.mask.shape == img.shape[:2] and pred.mask.dtype == bool
    assert pred.probability.dtype == np.float32 and pred.uncertainty.dtype == np.float32
    assert 0 <= pred.uncertainty.min() and pred.uncertainty.max() <= 1
    assert 0 <= pred.probability.min() and pred.probability.max() <= 1
    assert pred.epistemic is None and pred.aleatoric is None
    assert np.array_equal(pred.mask, pred.probability > 0.5) or pred.object_score < 0.5


@pytest.mark.parametrize("shape", [(40, 30), (300, 700), (700, 90, 3), (64, 64, 4), (64, 64, 1)])
def test_any_size_and_channels(predictor, shape):
    img = np.random.default_rng(0).integers(0, 4000, size=shape).astype(np.uint16)
    predictor.set_image(img)
    pred = predictor.predict(box=(5, 5, shape[0] - 5, shape[1] - 5))
    assert pred.uncertainty.shape == shape[:2]


def test_large_image_is_downscaled_to_max_native_size(tiny_model):
    p = Predictor(tiny_model)
    frame = p._frame_for((2048, 1000))
    assert frame.input_size[0] <= tiny_model.config.max_native_size
    assert frame.input_size[0] % 32 == 0 and frame.input_size[1] % 32 == 0
    assert frame.scale == pytest.approx(tiny_model.config.max_native_size / 2048)


def test_mc_mode_splits_uncertainty(predictor):
    predictor.set_image(_blobs())
    pred = predictor.predict(points=[(50, 60)], mode="mc", samples=16)
    assert pred.epistemic.shape == pred.aleatoric.shape == pred.mask.shape
    np.testing.assert_allclose(pred.epistemic + pred.aleatoric, pred.uncertainty, atol=1e-4)


@pytest.mark.parametrize("views", [1, 4])
def test_embedding_is_cached_by_content(tiny_model, views):
    predictor = Predictor(tiny_model, window=None, views=views)
    img = _blobs()
    predictor.set_image(img)
    calls = []
    original = predictor.model.encode
    predictor.model.encode = lambda x: calls.append(len(x)) or original(x)
    try:
        assert predictor.set_image(img.copy())  # same content, new array: from the cache
        assert calls == []
        assert not predictor.set_image(img + 1)
        assert calls == [views]  # every view encoded, in one pass, when the image is set
        assert predictor.is_cached(img)
        predictor.predict(points=[(50, 60)])
        assert calls == [views]
    finally:
        del predictor.model.encode



def test_is_cached_then_set_image_never_uses_a_stale_hash(tiny_model):
    """set_image reuses the check and hash of the is_cached call just before it only for the
    same array object, and only once: an array changed in place afterwards is hashed again."""
    predictor = Predictor(tiny_model, window=None)
    img = _blobs()
    assert not predictor.is_cached(img)
    predictor.set_image(img)
    first = predictor.image_key
    other = img.copy()
    other[:10] += 1
    predictor.is_cached(img)  # remembers img's check and hash
    predictor.set_image(other)  # another object: its own hash, not img's
    second = predictor.image_key
    assert second != first
    predictor.is_cached(img)
    predictor.set_image(img)  # the same object: the remembered hash is img's
    assert predictor.image_key == first
    img[:10] += 1  # changed in place: the remembered hash was used once and is gone
    predictor.set_image(img)
    assert predictor.image_key == second  # now the same content as ``other``

def test_point_coordinates_are_row_col(tiny_model):
    """A point at (row, col) reaches the model as x=col, y=row (scaled), for native and resized frames."""
    from napari_ruac.model.predictor import model_coords

    p = Predictor(tiny_model, window=None, recentre=False)  # the click itself reaches the model
    p.set_image(np.zeros((100, 300), np.uint8))
    rc, labs = p._check_prompt(0, p_prompt(points=[(10, 250)], box=(20, 30, 80, 290)))
    pts = model_coords(rc, (0, 0, 100, 300), p._frame_for((100, 300)))
    assert pts[0] == pytest.approx((250, 10)) and labs == [1, 2, 3]
    assert pts[1] == pytest.approx((30, 20)) and pts[2] == pytest.approx((290, 80))
    # prompts at transposed positions give different masks
    a = p.predict(points=[(10, 250)]).probability
    b = p.predict(points=[(250 % 100, 10)]).probability
    assert not np.allclose(a, b)


def p_prompt(**kw):
    from napari_ruac import Prompt

    return Prompt(**kw)


def test_batch_equals_one_by_one_and_keeps_order(predictor):
    predictor.set_image(_blobs())
    prompts = [
        dict(points=[(50, 60)], labels=[1]),
        dict(box=(90, 140, 130, 180)),
        dict(points=[(50, 60), (52, 90)], labels=[1, 0]),
        dict(points=[(110, 160)]),
    ]
    batch = predictor.predict_batch(prompts)
    assert len(batch) == 4
    for prompt, got in zip(prompts, batch):
        single = predictor.predict(**prompt)
        np.testing.assert_allclose(got.probability, single.probability, atol=1e-4)
        assert got.iou_score == pytest.approx(single.iou_score, abs=1e-5)


def test_cpu_batches_are_decoded_in_cache_sized_chunks_with_the_same_results(tiny_model, monkeypatch):
    import napari_ruac.model.predictor as predictor_module

    predictor = Predictor(tiny_model, window=None, views=1, recentre=False)  # one pass per click
    predictor.set_image(_blobs())
    prompts = [dict(points=[(20 + 15 * i, 30 + 20 * i)]) for i in range(5)]
    whole = predictor.predict_batch(prompts)
    per_set = predictor._cache[predictor.image_key][0].image_embed[0].numel() * 4
    monkeypatch.setattr(predictor_module, "CPU_DECODER_BYTES", 2 * per_set)
    assert predictor.decoder_chunk() == 2
    calls = []
    decode = predictor.model.decode
    monkeypatch.setattr(predictor.model, "decode", lambda *a, **k: calls.append(a[1].shape[0]) or decode(*a, **k))
    chunked = predictor.predict_batch(prompts)
    assert calls == [2, 2, 1]
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a.probability, b.probability, atol=1e-5)
    monkeypatch.setattr(predictor_module, "CPU_DECODER_BYTES", 1)
    assert predictor.decoder_chunk() == 2  # never less than a pair: pairs share the first layer


def test_mc_batch_equals_one_by_one(predictor):
    """Without a seed each prompt set gets the same fixed noise, so batching does not change MC maps."""
    predictor.set_image(_blobs())
    prompts = [dict(points=[(50, 60)]), dict(points=[(110, 160)]), dict(points=[(20, 180)])]
    batch = predictor.predict_batch(prompts, mode="mc", samples=8)
    for prompt, got in zip(prompts, batch):
        single = predictor.predict(**prompt, mode="mc", samples=8)
        np.testing.assert_allclose(got.uncertainty, single.uncertainty, atol=1e-4)
        np.testing.assert_allclose(got.epistemic, single.epistemic, atol=1e-4)
    assert not np.allclose(batch[0].probability, batch[1].probability)


def test_multimask_gives_best_first(predictor):
    predictor.set_image(_blobs())
    pred = predictor.predict(points=[(50, 60)], multimask=True)
    assert len(pred.alternatives) == 2
    assert all(pred.iou_score >= alt.iou_score for alt in pred.alternatives)


@pytest.mark.parametrize(
    "image,match",
    [
        (np.full((32, 32), np.nan, np.float32), "NaN"),
        (np.zeros((0, 10)), "empty"),
        (np.zeros((2, 3, 32, 32)), "4 dimensions"),
        (np.zeros((5, 32, 32)), "one plane"),
        (np.zeros((8, 8), dtype=complex), "dtype"),
    ],
)
def test_bad_images_are_rejected_clearly(predictor, image, match):
    with pytest.raises(ImageError, match=match):
        predictor.set_image(image)


def test_constant_image_still_predicts(predictor):
    predictor.set_image(np.zeros((64, 64), np.uint16))
    assert predictor.predict(points=[(32, 32)]).mask.shape == (64, 64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(points=[(150, 10)]), "outside the image"),
        (dict(points=[(-1, 10)]), "outside the image"),
        (dict(points=[(10, float("nan"))]), "outside the image"),
        (dict(box=(0, 0, 151, 50)), "outside the image"),
        (dict(points=[(10, 10)], labels=[1, 0]), "labels"),
        (dict(points=[(10, 10)], labels=[5]), "labels must be"),
        (dict(points=[10, 10]), "points must be"),
        (dict(box=(1, 2, 3)), "box must be"),
        (dict(), "no prompt"),
    ],
)
def test_bad_prompts_are_rejected_clearly(predictor, kwargs, match):
    predictor.set_image(_blobs())
    with pytest.raises(PromptError, match=match):
        predictor.predict(**kwargs)


def test_predict_before_set_image(tiny_model):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(tiny_model).predict(points=[(1, 1)])


def test_resize_models_pad_to_square(tiny_model):
    from dataclasses import replace

    from napari_ruac.model import build_model

    model = build_model(replace(tiny_model.config, input_scaling="resize")).eval()
    p = Predictor(model)
    p.set_image(_blobs((90, 250)))
    assert p.window is None  # models that resize every image see all of it
    frame = p._frame_for((90, 250))
    assert frame.input_size == (128, 128) and frame.valid == (46, 128)
    assert p.predict(points=[(45, 200)]).mask.shape == (90, 250)


def test_zoom_resizes_what_the_model_sees_and_keeps_outputs_in_image_pixels(micro):
    # nuclei twice the size micro was trained on, seen at half size; the click is in image pixels
    rr, cc = np.mgrid[:256, :256]
    disc = ((rr - 128) ** 2 + (cc - 100) ** 2) < 24**2
    img = (0.1 + 0.8 * disc + np.random.default_rng(0).normal(0, 0.03, disc.shape)).astype(np.float32)
    predictor = Predictor(micro, zoom=0.5)
    predictor.set_image(img)
    assert not predictor.windowed
    frame = predictor._frame_for(img.shape)
    assert frame.scale == 0.5 and frame.valid == (128, 128)
    pred = predictor.predict(points=[(128, 100)])
    assert pred.mask.shape == img.shape and pred.mask[128, 100]
    assert (pred.mask & disc).sum() / (pred.mask | disc).sum() > 0.6


def test_an_embedding_belongs_to_one_zoom(tiny_model):
    predictor = Predictor(tiny_model, window=None)
    img = _blobs()
    assert not predictor.set_image(img)
    predictor.zoom = 0.5
    assert not predictor.is_image_set  # a new zoom forgets the image: no stale embedding
    with pytest.raises(RuntimeError, match="no image set"):
        predictor.predict(points=[(50, 60)])
    assert not predictor.is_cached(img) and not predictor.set_image(img)
    predictor.zoom = 1.0
    assert predictor.set_image(img)  # the zoom-1 embedding is still cached
    for bad in (0, -1, float("nan"), "big", 100):
        with pytest.raises(ValueError, match="zoom"):
            Predictor(predictor.model, zoom=bad)


# ---------------------------------------------------------------------------- context windows


def _wide_plane():
    rr, cc = np.mgrid[:150, :400]
    img = 100 + 900 * (((rr - 60) ** 2 + (cc - 300) ** 2) < 18**2) + 700 * (((rr - 70) ** 2 + (cc - 60) ** 2) < 14**2)
    return (img + np.random.default_rng(1).normal(0, 20, rr.shape)).astype(np.float32)


def test_a_plane_larger_than_the_window_is_decoded_in_a_window_around_the_prompt(tiny_model):
    """What a windowed prediction is: the crop around the prompt, normalised and decoded on its
    own, pasted back into the plane; nothing outside it."""
    img = _wide_plane()
    p = Predictor(tiny_model, views=1)
    assert p.window == tiny_model.config.image_size == 128
    assert p.set_image(img) and p.windowed  # nothing to encode until a prompt arrives
    r0, c0, r1, c1 = p.window_of((60, 300, 60, 300))
    assert (r1 - r0, c1 - c0) == (128, 128) and r0 + 16 <= 60 < r1 - 16 and c0 + 16 <= 300 < c1 - 16
    pred = p.predict(points=[(60, 300)], mode="mc", samples=4)
    crop = Predictor(tiny_model, window=None, views=1)
    crop.set_image(img[r0:r1, c0:c1])
    ref = crop.predict(points=[(60 - r0, 300 - c0)], mode="mc", samples=4)
    np.testing.assert_allclose(pred.probability[r0:r1, c0:c1], ref.probability, atol=1e-5)
    np.testing.assert_allclose(pred.epistemic[r0:r1, c0:c1], ref.epistemic, atol=1e-5)
    outside = np.ones(img.shape, bool)
    outside[r0:r1, c0:c1] = False
    assert not pred.mask[outside].any() and not pred.probability[outside].any()
    assert not pred.uncertainty[outside].any()
    assert pred.mask.shape == img.shape
    # the prediction says where its maps can be non-zero, and its summaries look only there
    assert pred.extent == (r0, c0, r1, c1)
    assert pred.area == int(pred.mask.sum())
    assert pred.mean_uncertainty == pytest.approx(float(pred.uncertainty[pred.mask].mean()) if pred.mask.any() else 0.0)
    whole = Predictor(tiny_model, window=None, views=1)
    whole.set_image(img)
    assert whole.predict(points=[(60, 300)]).extent in (None, (0, 0, *img.shape))


@pytest.mark.parametrize("views", [1, 4])
def test_nearby_prompts_share_a_window_embedding(tiny_model, monkeypatch, views):
    p = Predictor(tiny_model, views=views, recentre=False)  # a recentred click may need its own window
    p.set_image(_wide_plane())
    calls = []
    encode = p.model.encode
    monkeypatch.setattr(p.model, "encode", lambda x: calls.extend([tuple(x.shape[-2:])] * len(x)) or encode(x))
    p.predict(points=[(60, 300)])
    p.predict(points=[(62, 305), (40, 290)], labels=[1, 0])  # a refinement of the same object
    assert calls == [(128, 128)] * views  # every view's window is as large as the window
    p.predict(points=[(70, 60)])  # another object far away: its own window
    assert len(calls) == 2 * views
    p.predict_batch([dict(points=[(60, 300)]), dict(points=[(70, 60)])])  # both cached
    assert len(calls) == 2 * views


def test_a_full_embedding_cache_never_drops_what_the_current_request_uses(tiny_model):
    # cache_size=1 holds one window in both views. Clicks in the plane's bottom corners are lost
    # by the moved view, so each caches only its window's plain view; a click in the first
    # corner's window that both views hold then needs one cached embedding (the oldest) and one
    # new one: the eviction must not drop the cached one it is about to use (it raised KeyError)
    p = Predictor(tiny_model, cache_size=1, views=2, recentre=False, window_step=1 / 8)  # (fine grid)
    p.set_image(_wide_plane())
    corner = p.window_of((149, 399, 149, 399))
    assert p.window_of((100, 330, 100, 330)) == corner
    p.predict(points=[(149, 399)])
    p.predict(points=[(149, 0)])
    assert len(p._cache) == 2
    got = p.predict(points=[(100, 330)])
    assert len(p._cache) <= 2
    fresh = Predictor(tiny_model, views=2, recentre=False, window_step=1 / 8)
    fresh.set_image(_wide_plane())
    # (the two views were encoded one by one here and together there: equal up to rounding)
    np.testing.assert_allclose(got.probability, fresh.predict(points=[(100, 330)]).probability, atol=1e-5)


def test_a_box_larger_than_the_window_gets_a_window_that_holds_it(tiny_model):
    p = Predictor(tiny_model)
    p.set_image(_wide_plane())
    box = (10, 120, 140, 330)
    r0, c0, r1, c1 = p.window_of(box)
    assert r0 <= 10 and r1 >= 140 and c0 <= 120 and c1 >= 330
    assert p.predict(box=box).mask.shape == (150, 400)
    # at zoom 2 the window covers half as many image pixels
    p.zoom = 2.0
    p.set_image(_wide_plane())
    r0, c0, r1, c1 = p.window_of((60, 300, 60, 300))
    assert (r1 - r0, c1 - c0) == (64, 64)


@pytest.mark.parametrize("window", [10, "big", 100.5, -1])
def test_bad_windows_are_rejected_clearly(tiny_model, window):
    with pytest.raises(ValueError, match="window"):
        Predictor(tiny_model, window=window)


# ---------------------------------------------------------------------------- box scale


def test_a_box_is_seen_at_the_zoom_that_makes_it_box_size_pixels(tiny_model):
    rr, cc = np.mgrid[:60, :60]
    img = (100 + 800 * (((rr - 30) ** 2 + (cc - 28) ** 2) < 7**2)).astype(np.uint16)
    box = (22, 20, 38, 36)  # 16 px: seen at 32 / 16 = 2x
    p = Predictor(tiny_model)
    assert p.box_size == 32.0 and p.zoom == 1.0
    p.set_image(img)
    got = p.predict(box=box)
    ref = Predictor(tiny_model, zoom=2.0, box_size=None)
    ref.set_image(img)
    np.testing.assert_allclose(got.probability, ref.predict(box=box).probability, atol=1e-6)
    # points alone keep the predictor's zoom; boxes with box_size=None too
    plain = Predictor(tiny_model, box_size=None)
    plain.set_image(img)
    np.testing.assert_allclose(p.predict(points=[(30, 28)]).probability,
                               plain.predict(points=[(30, 28)]).probability, atol=1e-6)
    assert not np.allclose(plain.predict(box=box).probability, got.probability)


@pytest.mark.parametrize("side,zoom", [(32, 1.0), (16, 2.0), (26, 2**0.25), (45, 2**-0.5), (1000, 0.25), (2, 4.0)])
def test_box_zoom_is_on_a_quarter_octave_grid_within_range(tiny_model, side, zoom):
    from napari_ruac.model.sam import LABEL_BOX_BR, LABEL_BOX_TL

    p = Predictor(tiny_model)
    pts = np.array([(10.0, 10.0), (10.0 + side, 10.0 + side / 2)])
    assert p.zoom_for(pts, [LABEL_BOX_TL, LABEL_BOX_BR]) == pytest.approx(zoom)
    assert p.zoom_for(pts[:1], [1]) == 1.0


def test_box_size_is_off_for_resize_models_and_checked(tiny_model):
    from dataclasses import replace

    from napari_ruac.model import build_model

    model = build_model(replace(tiny_model.config, input_scaling="resize")).eval()
    assert Predictor(model).box_size is None
    assert Predictor(tiny_model, box_size=24).box_size == 24.0
    for bad in ("big", -3, 1, float("nan"), 10_000):
        with pytest.raises(ValueError, match="box_size"):
            Predictor(tiny_model, box_size=bad)


def test_the_trunk_positional_embedding_is_kept_at_inference_and_follows_the_weights(tiny_model):
    """The Hiera trunk's resized positional table is cached per grid at inference only, and a
    change of the weights (a load, an optimiser step) is seen at once."""
    import copy

    model = copy.deepcopy(tiny_model)
    trunk = model.image_encoder.trunk
    trunk._pos_cache.clear()  # the shared model has been used by other tests
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        first = model.encode(x).image_embed
        assert len(trunk._pos_cache) == 1
        again = model.encode(x).image_embed
    assert torch.equal(first, again)
    with torch.no_grad():
        trunk.pos_embed.add_(0.5)  # in place, as an optimiser or load_state_dict writes it
    with torch.inference_mode():
        moved = model.encode(x).image_embed
    with torch.enable_grad():
        fresh = model.encode(x).image_embed  # autograd on: computed, never cached
    assert not torch.allclose(moved, first)
    torch.testing.assert_close(moved, fresh.detach())
    with torch.enable_grad():
        assert model.encode(x).image_embed.requires_grad


# ---------------------------------------------------------------------------- box bounds


def test_a_box_bounds_its_mask_and_maps_unless_turned_off(tiny_model):
    rr, cc = np.mgrid[:60, :60]
    img = (100 + 800 * (((rr - 30) ** 2 + (cc - 28) ** 2) < 7**2)).astype(np.uint16)
    box = (22, 20, 38, 36)  # pixel edges: rows 22..37, cols 20..35 are inside
    inside = np.zeros((60, 60), bool)
    inside[22:38, 20:36] = True
    free, bounded, loose = (Predictor(tiny_model, box_margin=m) for m in (None, "auto", 2))
    assert (free.box_margin, bounded.box_margin, loose.box_margin) == (None, 0.0, 2.0)
    for p in (free, bounded, loose):
        p.set_image(img)
    ref = free.predict(box=box)
    assert ref.probability[~inside].max() > 0.01  # the random model predicts outside the box
    for mode in ("analytic", "mc"):
        ref, got = free.predict(box=box, mode=mode), bounded.predict(box=box, mode=mode)
        for name in ("mask", "probability", "uncertainty") + (("epistemic", "aleatoric") if mode == "mc" else ()):
            a, b = getattr(ref, name), getattr(got, name)
            np.testing.assert_array_equal(b[inside], a[inside])  # the model's own values inside
            assert not b[~inside].any(), name  # background, certain, outside
    ring = np.zeros((60, 60), bool)
    ring[20:40, 18:38] = True
    wide = loose.predict(box=box)
    np.testing.assert_array_equal(wide.probability[ring], free.predict(box=box).probability[ring])
    assert not wide.probability[~ring].any()
    # a box with points is bounded too; points alone are not
    both = bounded.predict(points=[(30, 28)], box=box)
    assert not both.probability[~inside].any()
    np.testing.assert_array_equal(bounded.predict(points=[(30, 28)]).probability,
                                  free.predict(points=[(30, 28)]).probability)


@pytest.mark.parametrize("bad", [-1, "wide", float("nan")])
def test_bad_box_margins_are_rejected_clearly(tiny_model, bad):
    with pytest.raises(ValueError, match="box_margin"):
        Predictor(tiny_model, box_margin=bad)


@pytest.mark.parametrize("name", ["micro", "micro-bayes"])
def test_the_shipped_bayesian_models_are_certain_of_background_far_from_every_nucleus(name):
    # Trained on one Weibull sample per step, the heads gave far background p ~ 0.02 in the
    # analytic mode (0.13 bits everywhere, a haze over the whole uncertainty layer) where drawing
    # every factor gives ~0: stage 1f trains the heads on the analytic predictive logit.
    import tifffile
    from scipy import ndimage as ndi

    from napari_ruac._sample_data import SAMPLE_DIR
    from napari_ruac.model import load_model

    model = load_model(name)
    if not model.info.get("trained", True):
        pytest.skip(f"the {name} model's trained weights are not installed")
    img = tifffile.imread(SAMPLE_DIR / "nuclei2d.tif")
    labels = tifffile.imread(SAMPLE_DIR / "nuclei2d_labels.tif")
    far = ~ndi.binary_dilation(labels > 0, iterations=5)
    predictor = Predictor(model)
    predictor.set_image(img)
    ids = [int(i) for i in np.unique(labels) if i]
    for obj in (ids[5], ids[len(ids) // 2], ids[-5]):
        rr, cc = np.nonzero(labels == obj)
        click = (int(np.median(rr)), int(np.median(cc)))
        # pixels well inside the click's context window (outside it the maps are 0 by design)
        near = (slice(max(click[0] - 60, 0), click[0] + 60), slice(max(click[1] - 60, 0), click[1] + 60))
        for mode in ("analytic", "mc"):
            pred = predictor.predict(points=[click], mode=mode, samples=20)
            assert pred.mask[click], (obj, mode)
            unc, prob = pred.uncertainty[near][far[near]], pred.probability[near][far[near]]
            assert unc.size > 1000
            assert np.median(unc) < 0.05 and np.percentile(prob, 99) < 0.01, (obj, mode, np.median(unc))


def test_odd_but_valid_planes_and_a_zero_area_box(tiny_model):
    """A plane one pixel high (mirrored views of it once reached torch with a negative stride),
    float64 values beyond float32's range (they became inf), and a box of zero height: a clear
    PromptError, not an empty mask."""
    p = Predictor(tiny_model)
    assert len(p.views) > 1  # mirrored test-time views
    for plane in (np.linspace(0, 1, 64)[None], np.linspace(0, 1, 64)[:, None]):
        p.set_image(plane)
        pred = p.predict(points=[(0, 0)])
        assert pred.mask.shape == plane.shape and np.isfinite(pred.uncertainty).all()
    huge = np.random.default_rng(0).random((48, 48)) * 1e300
    p.set_image(huge)
    same = Predictor(tiny_model)
    same.set_image(huge / 1e300)  # percentile normalisation: the scale does not matter
    np.testing.assert_allclose(p.predict(points=[(20, 20)]).probability,
                               same.predict(points=[(20, 20)]).probability, atol=1e-5)
    import tifffile

    from napari_ruac._sample_data import SAMPLE_DIR
    from napari_ruac.model.scale import estimate_object_diameter

    nuclei = tifffile.imread(SAMPLE_DIR / "nuclei2d.tif").astype(np.float64)  # the size estimate too
    assert estimate_object_diameter(nuclei * 1e300) == pytest.approx(estimate_object_diameter(nuclei), rel=1e-3)
    with pytest.raises(PromptError, match="zero height or width"):
        p.predict(box=(10, 10, 10, 40))
    with pytest.raises(PromptError, match="zero height or width"):
        p.predict(box=(10, 30, 40, 30.5))

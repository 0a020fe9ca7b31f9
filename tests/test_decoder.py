"""The Bayesian mask decoder on real SAM2 modules (test-tiny config)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from napari_ruac.model.mask_decoder import BayesianMaskDecoder


@pytest.fixture(scope="module")
def embedded(tiny_model):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 128, 160, generator=g)
    with torch.inference_mode():
        emb = tiny_model.encode(images)
    coords = torch.tensor([[[40.0, 30.0], [0, 0]], [[100.0, 90.0], [120.0, 100.0]]])
    labels = torch.tensor([[1, -1], [2, 3]])
    return emb, coords, labels


def _decode(model, emb, coords, labels, **kw):
    with torch.inference_mode():
        return model.decode(emb, coords, labels, image_index=torch.tensor([0, 1]), **kw)


def test_shapes_and_ranges_in_every_mode(tiny_model, embedded):
    emb, coords, labels = embedded
    for mode in ("deterministic", "sample", "analytic", "mc"):
        out = _decode(tiny_model, emb, coords, labels, mode=mode, samples=8)
        assert out.logits.shape == (2, 1, 32, 40), mode  # 1/4 of the 128x160 input
        assert out.iou_pred.shape == (2, 1) and out.object_score_logits.shape == (2, 1)
        assert ((out.probability >= 0) & (out.probability <= 1)).all()
        assert ((out.uncertainty >= 0) & (out.uncertainty <= 1 + 1e-6)).all()
        assert (out.epistemic is not None) == (mode == "mc")
        assert (out.kl is not None) == (mode == "sample")


def test_multimask_returns_three_masks(tiny_model, embedded):
    emb, coords, labels = embedded
    out = _decode(tiny_model, emb, coords, labels, multimask_output=True, mode="analytic")
    assert out.logits.shape == (2, 3, 32, 40) and out.iou_pred.shape == (2, 3)
    single = _decode(tiny_model, emb, coords, labels, multimask_output=False, mode="analytic")
    assert not torch.allclose(out.logits[:, :1], single.logits)  # token 0 is not a multimask token


@pytest.fixture(scope="module")
def spread_model(tiny_model):
    """test-tiny with its Weibull head's scales spread out like a trained head's.

    With random weights every pixel has p ~ 0.54 (uncertainty ~ 0.996 everywhere), and a
    correlation over such a flat map measures nothing. Larger pixel scales and foreground /
    background rows that favour different channels give logits of both signs and uncertainty
    from ~0.5 to 1, which is what a comparison of the two estimators needs.
    """
    model = copy.deepcopy(tiny_model)
    head = model.sam_mask_decoder.weibull_head
    c = head.channels
    with torch.no_grad():
        head.pixel_head.weight[:c] *= 8
        last = head.token_head.layers[-1]
        last.bias[: c // 2] += 1.5  # foreground scales of the first half of the channels
        last.bias[2 * c + c // 2 : 3 * c] += 1.5  # background scales of the second half
    return model


def test_analytic_uncertainty_agrees_with_monte_carlo(spread_model, embedded):
    emb, coords, labels = embedded
    analytic = _decode(spread_model, emb, coords, labels, mode="analytic")
    mc = _decode(spread_model, emb, coords, labels, mode="mc", samples=256, generator=torch.Generator().manual_seed(0))
    assert analytic.uncertainty.std() > 0.03  # the map is not flat
    for a, m in ((analytic.uncertainty, mc.uncertainty), (analytic.probability, mc.probability)):
        r = np.corrcoef(a.flatten().numpy(), m.flatten().numpy())[0, 1]
        assert r > 0.9, r


def test_mc_band_shortcut_matches_full_sampling(spread_model, embedded):
    """Pixels outside the sampled band take analytic values; that must not change the map."""
    emb, coords, labels = embedded
    dec = spread_model.sam_mask_decoder
    c = dec.weibull_head.channels
    head = dec.weibull_head
    saved = copy.deepcopy(head.state_dict())
    with torch.no_grad():  # large, nearly deterministic weights: many certain pixels
        head.pixel_head.weight[:c] *= 20
        head.pixel_head.bias[c:] += 6
        head.token_head.layers[-1].bias[:c] += 3  # foreground rows dominate: confident pixels
        head.token_head.layers[-1].bias[2 * c : 3 * c] -= 3
        head.token_head.layers[-1].bias[c : 2 * c] += 6
        head.token_head.layers[-1].bias[3 * c : 4 * c] += 6
    try:
        dec.mc_band_below = 1.0  # take the shortcut whatever the band's size
        banked = _decode(spread_model, emb, coords, labels, mode="mc", samples=64)
        again = _decode(spread_model, emb, coords, labels, mode="mc", samples=64)
        torch.testing.assert_close(banked.uncertainty, again.uncertainty)  # fixed noise bank
        dec.mc_band = False
        full = _decode(spread_model, emb, coords, labels, mode="mc", samples=64, generator=torch.Generator().manual_seed(5))
        moments = _decode(spread_model, emb, coords, labels, mode="analytic")
        certain = moments.logit_mean.abs() > 8 + 6 * moments.logit_var.sqrt()  # outside the band
        assert certain.float().mean() > 0.05  # the shortcut was exercised
        assert (full.uncertainty - banked.uncertainty)[certain].abs().max() < 5e-3
        r = np.corrcoef(full.uncertainty.flatten().numpy(), banked.uncertainty.flatten().numpy())[0, 1]
        assert r > 0.95
    finally:
        dec.mc_band, dec.mc_band_below = True, 0.5
        head.load_state_dict(saved)


@pytest.mark.parametrize("estimator", ["integrate", "sample"])
def test_analytic_agrees_with_monte_carlo_for_both_estimators(spread_model, embedded, estimator):
    emb, coords, labels = embedded
    dec = spread_model.sam_mask_decoder
    analytic = _decode(spread_model, emb, coords, labels, mode="analytic")
    dec.mc_pixels = estimator
    try:
        mc = _decode(spread_model, emb, coords, labels, mode="mc", samples=256, generator=torch.Generator().manual_seed(1))
    finally:
        dec.mc_pixels = "integrate"
    r = np.corrcoef(analytic.uncertainty.flatten().numpy(), mc.uncertainty.flatten().numpy())[0, 1]
    assert r > 0.9, r


def test_integrated_pixels_estimator_agrees_with_full_sampling(spread_model, embedded):
    """Rao-Blackwellised MC (token draws, pixel factor integrated) against drawing everything.

    Two full-sampling runs with different seeds set the noise floor (r ~ 0.93-0.99 for the four
    maps at S=256); the integrated estimator must agree with full sampling about as well. Its
    epistemic part is smaller on average by design: pixel-level noise counts as aleatoric.
    """
    emb, coords, labels = embedded
    dec = spread_model.sam_mask_decoder
    runs = {}
    try:
        for estimator, seed in (("sample", 1), ("integrate", 2)):
            dec.mc_pixels = estimator
            runs[estimator] = _decode(
                spread_model, emb, coords, labels, mode="mc", samples=256, generator=torch.Generator().manual_seed(seed)
            )
    finally:
        dec.mc_pixels = "integrate"
    full, fast = runs["sample"], runs["integrate"]
    for field, min_r in (("probability", 0.97), ("uncertainty", 0.93), ("aleatoric", 0.9), ("epistemic", 0.85)):
        a, b = getattr(full, field).flatten().numpy(), getattr(fast, field).flatten().numpy()
        r = np.corrcoef(a, b)[0, 1]
        assert r > min_r, (field, r)
    assert abs(full.uncertainty.mean() - fast.uncertainty.mean()) < 0.02
    assert fast.epistemic.mean() < full.epistemic.mean()  # pixel noise moved to aleatoric
    torch.testing.assert_close(fast.epistemic + fast.aleatoric, fast.uncertainty, atol=1e-5, rtol=0)


def test_unknown_mc_estimator_is_rejected(tiny_model, embedded):
    emb, coords, labels = embedded
    dec = tiny_model.sam_mask_decoder
    dec.mc_pixels = "bogus"
    try:
        with pytest.raises(ValueError, match="unknown mc_pixels 'bogus'"):
            _decode(tiny_model, emb, coords, labels, mode="mc", samples=4)
    finally:
        dec.mc_pixels = "integrate"


def test_inference_softplus_matches_torch():
    from napari_ruac.model.mask_decoder import _softplus_inference

    x = torch.cat([torch.linspace(-120, 120, 200_001), torch.tensor([0.0, 1e-30, -1e-30, 1e4, -1e4])])
    ref = torch.nn.functional.softplus(x.double())
    got = _softplus_inference(x).double()
    assert torch.isfinite(got).all()
    # absolute error below 1e-6 (lambda has a 1e-4 floor), relative float32 rounding for large x
    assert ((got - ref).abs() <= 1e-6 + 4 * 2.0**-23 * ref.abs()).all()


def test_fast_shape_factors_match_lgamma():
    from napari_ruac.model.weibull import weibull_shape_factors, weibull_shape_factors_fast

    kappa = torch.cat([torch.linspace(1.0, 20.0, 100_001), torch.tensor([1.0 + 1e-6, 1.5, 2.0, 100.0, 1e4])])
    g1, r = weibull_shape_factors(kappa.double())
    fg1, fr = weibull_shape_factors_fast(kappa)
    assert (fg1.double() - g1).abs().max() < 1e-6
    assert (fr.double() - r).abs().max() < 2e-6
    assert (fr >= 0).all()


def test_analytic_mode_gives_same_result_with_and_without_autograd(tiny_model, embedded):
    """Without autograd the analytic mode uses the vectorised softplus; only rounding differs."""
    emb, coords, labels = embedded
    with torch.no_grad():
        fast = tiny_model.decode(emb, coords, labels, image_index=torch.tensor([0, 1]), mode="analytic")
    exact = tiny_model.decode(emb, coords, labels, image_index=torch.tensor([0, 1]), mode="analytic")
    torch.testing.assert_close(fast.logit_mean, exact.logit_mean.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.logit_var, exact.logit_var.detach(), atol=1e-5, rtol=1e-5)


def test_analytic_inference_in_chunks_equals_the_autograd_path(tiny_model, embedded):
    """More prompt sets than one chunk of the inference head (a ragged last chunk too)."""
    from napari_ruac.model.mask_decoder import HEAD_CHUNK

    emb = embedded[0]
    n = 2 * HEAD_CHUNK + 3
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(n, 1, 2, generator=g) * torch.tensor([160.0, 128.0])
    labels = torch.ones(n, 1, dtype=torch.long)
    index = torch.arange(n) % 2
    with torch.no_grad():
        fast = tiny_model.decode(emb, coords, labels, image_index=index, multimask_output=True, mode="analytic")
    exact = tiny_model.decode(emb, coords, labels, image_index=index, multimask_output=True, mode="analytic")
    assert fast.logits.shape == (n, 3, *exact.logits.shape[-2:])
    for field in ("logit_mean", "logit_var", "logits"):
        torch.testing.assert_close(getattr(fast, field), getattr(exact, field).detach(), atol=1e-5, rtol=1e-5)
    # each prompt set got its own maps (no chunk written over another)
    assert not torch.allclose(fast.logits[HEAD_CHUNK - 1], fast.logits[HEAD_CHUNK + 1])


def test_analytic_moments_match_sampled_logits(tiny_model, embedded):
    emb, coords, labels = embedded
    analytic = _decode(tiny_model, emb, coords, labels, mode="analytic")
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([_decode(tiny_model, emb, coords, labels, mode="sample", generator=g).logits for _ in range(400)])
    # standardised error of the sample mean: |z| averages ~0.8 when the analytic mean is right
    z = (draws.mean(0) - analytic.logit_mean) / (analytic.logit_var / draws.shape[0]).sqrt()
    var_ratio = draws.var(0).mean() / analytic.logit_var.mean()
    assert z.abs().mean() < 1.5
    assert 0.85 < var_ratio < 1.15


def test_mc_split_adds_up(tiny_model, embedded):
    emb, coords, labels = embedded
    mc = _decode(tiny_model, emb, coords, labels, mode="mc", samples=16)
    assert torch.allclose(mc.epistemic + mc.aleatoric, mc.uncertainty, atol=1e-5) or (
        (mc.epistemic == 0) & (mc.aleatoric >= mc.uncertainty - 1e-5)
    ).any()
    assert (mc.epistemic >= 0).all() and (mc.aleatoric >= 0).all()


def test_sample_mode_trains_head_and_gives_kl(tiny_model):
    images = torch.rand(1, 3, 128, 128)
    emb = tiny_model.encode(images)
    out = tiny_model.decode(emb, torch.tensor([[[60.0, 60.0]]]), torch.tensor([[1]]), mode="sample")
    loss = out.logits.mean() + out.kl
    loss.backward()
    head = tiny_model.sam_mask_decoder.weibull_head
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert out.kl.item() > 0
    tiny_model.zero_grad(set_to_none=True)


def test_batched_prompts_equal_one_by_one(tiny_model, embedded):
    emb, _, _ = embedded
    coords = torch.tensor([[[40.0, 30.0], [70.0, 50.0]], [[100.0, 90.0], [120.0, 100.0]]])
    labels = torch.tensor([[1, 0], [2, 3]])
    both = _decode(tiny_model, emb, coords, labels, mode="analytic")
    for i in range(2):
        with torch.inference_mode():
            one = tiny_model.decode(emb.select([i]), coords[i : i + 1], labels[i : i + 1], mode="analytic")
        torch.testing.assert_close(one.logits, both.logits[i : i + 1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["analytic", "mc", "sample"])
def test_prompt_sets_sharing_one_image_equal_one_by_one(tiny_model, embedded, mode):
    """One image, several prompt sets: the embedding is broadcast, not copied per prompt set."""
    emb, _, _ = embedded
    one_image = emb.select([1])
    coords = torch.tensor([[[40.0, 30.0], [70.0, 50.0]], [[100.0, 90.0], [120.0, 100.0]], [[10.0, 20.0], [90.0, 60.0]]])
    labels = torch.tensor([[1, 0], [2, 3], [1, 1]])
    with torch.inference_mode():
        kw = dict(mode=mode, samples=8, generator=None if mode != "sample" else torch.Generator().manual_seed(0))
        together = tiny_model.decode(one_image, coords, labels, **kw)
        for i in range(3):
            if mode == "sample":
                continue  # noise is drawn for the whole batch at once; shapes are checked below
            one = tiny_model.decode(one_image, coords[i : i + 1], labels[i : i + 1], **kw)
            torch.testing.assert_close(one.logits, together.logits[i : i + 1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(one.uncertainty, together.uncertainty[i : i + 1], atol=1e-4, rtol=1e-4)
    assert together.logits.shape == (3, 1, 32, 40)
    assert not torch.allclose(together.logits[0], together.logits[1])  # prompts still matter


def test_unknown_mode_is_rejected(tiny_model, embedded):
    emb, coords, labels = embedded
    with pytest.raises(ValueError, match="unknown decoder mode"):
        _decode(tiny_model, emb, coords, labels, mode="bogus")


def test_kappa_init_must_lie_inside_range():
    from napari_ruac.model.mask_decoder import WeibullHead

    with pytest.raises(ValueError, match="kappa_init"):
        WeibullHead(32, kappa_range=(1.0, 3.0), kappa_init=4.0)
    assert issubclass(BayesianMaskDecoder, torch.nn.Module)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("image_batch", [1, 3])
def test_reassociated_transformer_equals_sam2s(heads, image_batch):
    """SAM2's TwoWayTransformer with the first layer's image side computed once (one image for
    all prompt sets) and the attentions folded on per-set image tokens equals SAM2's own
    module run on B copies (one and several attention heads), values and gradients."""
    from sam2.modeling.sam.transformer import TwoWayTransformer

    from napari_ruac.model.mask_decoder import two_way_shared_image

    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=heads, mlp_dim=64).eval()
    image, pe = torch.randn(image_batch, 32, 6, 5), torch.randn(1, 32, 6, 5)
    tokens = torch.randn(3, 7, 32, requires_grad=True)
    want_q, want_k = transformer(image.expand(3, -1, -1, -1), pe.expand(3, -1, -1, -1), tokens)
    got_q, got_k = two_way_shared_image(transformer, image, pe, tokens)
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_k[0], got_k[1])  # the image tokens do depend on the prompts
    with torch.no_grad():  # inference takes its own softmax
        fast_q, fast_k = two_way_shared_image(transformer, image, pe, tokens)
    torch.testing.assert_close(fast_q, want_q.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_k, want_k.detach(), atol=1e-5, rtol=1e-5)
    w_q, w_k = torch.randn(want_q.shape), torch.randn(want_k.shape)
    params = [tokens, *transformer.parameters()]
    want = torch.autograd.grad((want_q * w_q).sum() + (want_k * w_k).sum(), params, allow_unused=True)
    got = torch.autograd.grad((got_q * w_q).sum() + (got_k * w_k).sum(), params, allow_unused=True)
    for a, b in zip(got, want):
        if b is None or a is None:  # a key bias cancels in the softmax: no gradient either way
            assert a is None or float(a.abs().max()) < 1e-6
            assert b is None or float(b.abs().max()) < 1e-5
            continue
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_maps_derived_on_demand_equal_the_full_maps(tiny_model, embedded):
    """Analytic and deterministic outputs compute probability/uncertainty when read;
    uncertainty_of gives the rows of the full map without computing the others."""
    from napari_ruac.model.weibull import binary_entropy_from_logit

    emb, coords, labels = embedded
    for mode in ("analytic", "deterministic", "mc"):
        out = _decode(tiny_model, emb, coords, labels, mode=mode, samples=8, multimask_output=True)
        full = out.uncertainty.flatten(0, 1)
        idx = torch.tensor([4, 1])
        torch.testing.assert_close(out.uncertainty_of(idx), full[idx])
        if mode != "mc":
            torch.testing.assert_close(out.probability, torch.sigmoid(out.logits))
            torch.testing.assert_close(out.uncertainty, binary_entropy_from_logit(out.logits))


@pytest.mark.parametrize("feature_batch", [1, 3])
def test_channels_last_upscaling_equals_sam2s_modules_with_gradients(feature_batch):
    """The matmul-and-reshuffle upscaling gives SAM2's ConvTranspose2d / LayerNorm2d / GELU
    result and gradients, with high-resolution features shared (batch 1) or per prompt set."""
    from sam2.modeling.sam2_utils import LayerNorm2d

    from napari_ruac.model.mask_decoder import _upscale_channels_last

    g = torch.Generator().manual_seed(3)
    d = 32
    up = nn.Sequential(nn.ConvTranspose2d(d, d // 4, 2, 2), LayerNorm2d(d // 4), nn.GELU(),
                       nn.ConvTranspose2d(d // 4, d // 8, 2, 2), nn.GELU())
    with torch.no_grad():
        for prm in up.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
    src = torch.randn(3, d, 5, 7, generator=g).requires_grad_()
    s1 = torch.randn(feature_batch, d // 4, 10, 14, generator=g).requires_grad_()
    s0 = torch.randn(feature_batch, d // 8, 20, 28, generator=g).requires_grad_()
    dc1, ln1, act1, dc2, act2 = up
    ref = act2(dc2(act1(ln1(dc1(src) + s1))) + s0)
    got = _upscale_channels_last(up, src, s0, s1)
    assert got.shape == (3, d // 8, 20, 28)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    wts = torch.randn(ref.shape, generator=g)
    inputs = (src, s0, s1, *up.parameters())
    ref_grads = torch.autograd.grad((ref * wts).sum(), inputs)
    got_grads = torch.autograd.grad((got * wts).sum(), inputs)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the in-place inference path, and its view for the pointwise head
        fast = _upscale_channels_last(up, src, s0, s1)
    torch.testing.assert_close(fast, ref.detach(), atol=2e-6, rtol=1e-5)
    assert fast.reshape(3, d // 8, -1).data_ptr() == fast.data_ptr()
    # GELUs run in place at inference; any other activation is called as a module
    up[4] = nn.Tanh()
    with torch.no_grad():
        torch.testing.assert_close(_upscale_channels_last(up, src, s0, s1),
                                   torch.tanh(dc2(act1(ln1(dc1(src) + s1))) + s0), atol=2e-6, rtol=1e-5)
    up[0] = nn.ConvTranspose2d(d, d // 4, 3, 2)
    with pytest.raises(ValueError, match="2x2 stride-2"):
        _upscale_channels_last(up, src, s0, s1)


def test_the_weibull_head_runs_in_float32_under_bf16_autocast(tiny_model, embedded):
    """Mixed precision (bf16 training on a GPU; CPU autocast follows the same rules): the
    transformer may run in bf16, but the Bayesian head's moments, KL and maps come out in float32
    and close to a float32 run. Before, the fused analytic path raised a dtype error and the KL
    was a bf16 number."""
    emb, coords, labels = embedded
    exact = _decode(tiny_model, emb, coords, labels, mode="analytic")
    for mode in ("analytic", "sample", "mc"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _decode(tiny_model, emb, coords, labels, mode=mode, samples=4, return_kl=True)
        names = ("logits", "kl", "probability", "uncertainty", "epistemic") if mode == "mc" else \
            ("logits", "logit_mean", "logit_var", "kl", "probability", "uncertainty")
        for name in names:
            value = getattr(out, name)
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), (mode, name)
        if mode == "analytic":
            scale = float(exact.logit_mean.std())
            assert float((out.logit_mean - exact.logit_mean).abs().mean()) < 0.05 * scale
            assert float((out.probability - exact.probability).abs().mean()) < 0.01

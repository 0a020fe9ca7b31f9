"""Attackers and gradient reversal (issue 3): the behaviours the min-max game relies on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from napari_ruac.training.adversaries import (
    AdversaryConfig,
    DeformAdversary,
    StyleAdversary,
    adain_regions,
    grad_reverse,
    move_points,
    object_graph,
    region_stats,
    spatial_edges_from_masks,
    warp,
    warp_masks,
    zero_mean_per_object,
)

torch.set_num_threads(1)


def _label_scene(h=48, w=48):
    """Two touching squares and a disc: (1, H, W) labels and a textured (1, 3, H, W) image."""
    lab = torch.zeros(1, h, w, dtype=torch.long)
    lab[0, 8:20, 8:20] = 1
    lab[0, 8:20, 20:32] = 2
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    lab[0][(yy - 36) ** 2 + (xx - 34) ** 2 < 36] = 3
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, h, w, generator=g) * 0.3 + lab.unsqueeze(1) * 0.2
    return img, lab


def test_gradient_reversal_flips_the_attackers_gradient():
    style = StyleAdversary(AdversaryConfig())
    img, lab = _label_scene()
    edges = torch.zeros(2, 0, dtype=torch.long)
    target = torch.rand(img.shape, generator=torch.Generator().manual_seed(1))

    def attacker_grads(coef):
        style.zero_grad()
        out = style(img, lab, edges, grl_coef=coef) if coef is not None else None
        if coef is None:  # the same loss without the reversal layer
            d_mean, d_log_std, mean, _, n = style.residuals(img, lab, edges)
            out = adain_regions(img, lab, n, mean, d_mean, d_log_std)
        F.mse_loss(out, target).backward()
        return [p.grad.clone() for p in style.parameters()]

    plain = attacker_grads(None)
    reversed_ = attacker_grads(1.0)
    assert any(g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, reversed_):
        torch.testing.assert_close(b, -a)
    # and a coefficient scales it
    half = attacker_grads(0.5)
    for a, b in zip(plain, half):
        torch.testing.assert_close(b, -0.5 * a)


def test_grad_reverse_is_identity_forward():
    x = torch.randn(5, requires_grad=True)
    y = grad_reverse(x, 2.0)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5,), -2.0))


def test_zero_offsets_warp_is_identity_and_masks_stay_binary_and_aligned():
    img, lab = _label_scene()
    zero = torch.zeros(1, 2, *lab.shape[-2:])
    torch.testing.assert_close(warp(img, zero), img)
    masks = torch.stack([(lab[0] == k).float() for k in (1, 2, 3)])
    torch.testing.assert_close(warp_masks(masks, zero.expand(3, -1, -1, -1)), masks)

    # a real (smooth, non-zero) field: the warped mask is binary and is the object in the
    # warped image (warp the label-coded image and compare where the object's colour lands)
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    field = torch.stack([2.5 * torch.sin(yy / 7), 2.0 * torch.cos(xx / 9)]).unsqueeze(0)
    warped = warp_masks(masks, field.expand(3, -1, -1, -1))
    assert set(torch.unique(warped).tolist()) <= {0.0, 1.0}
    coded = masks[2:3].unsqueeze(0)  # the disc as an image channel
    warped_img = warp(coded, field)
    agree = ((warped_img[0, 0] > 0.5).float() == warped[2]).float().mean()
    assert agree == 1.0
    assert (warped != masks).any()


def test_adain_gives_the_target_statistics_inside_each_region():
    img, lab = _label_scene()
    n = int(lab.max()) + 1
    mean, std, count = region_stats(img, lab, n)
    g = torch.Generator().manual_seed(3)
    d_mean = (torch.rand(n, 3, generator=g) - 0.5) * 0.2
    d_log_std = (torch.rand(n, 3, generator=g) - 0.5) * 0.6
    out = adain_regions(img, lab, n, mean, d_mean, d_log_std)
    new_mean, new_std, _ = region_stats(out, lab, n)
    torch.testing.assert_close(new_mean, mean + d_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_std, std * torch.exp(d_log_std), atol=1e-5, rtol=1e-4)


def test_attacker_outputs_respect_their_bounds():
    cfg = AdversaryConfig(max_mean_shift=0.1, max_log_std=0.3, max_offset=3.0)
    style = StyleAdversary(cfg)
    deform = DeformAdversary(cfg, feature_dim=16)
    # blow the output layers up so the raw outputs would be far outside the bounds
    with torch.no_grad():
        style.out.weight.normal_(0, 50)
        deform.net[-1].weight.normal_(0, 50)
    img, lab = _label_scene()
    d_mean, d_log_std, *_ = style.residuals(img, lab, torch.zeros(2, 0, dtype=torch.long))
    assert d_mean.abs().max() <= 0.1 + 1e-6 and d_mean.abs().max() > 0.05
    assert d_log_std.abs().max() <= 0.3 + 1e-6
    feats = torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    off = deform.offsets(feats, lab)
    assert off.shape == (1, 2, 48, 48)
    assert off.abs().max() <= 3.0 + 1e-5 and off.abs().max() > 1.0
    # zero-mean inside each object: objects change shape but do not drift
    for k in (1, 2, 3):
        inside = lab[0] == k
        assert off[0, :, inside].mean(dim=1).abs().max() < 1e-4


def test_zero_mean_per_object_leaves_background():
    _, lab = _label_scene()
    field = torch.ones(1, 2, 48, 48)
    out = zero_mean_per_object(field, lab)
    assert torch.all(out[:, :, lab[0] == 0] == 1)
    assert out[:, :, lab[0] > 0].abs().max() < 1e-6


def test_points_move_with_the_warp():
    coords = torch.tensor([[[20.0, 10.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, -1]])
    field = torch.zeros(1, 2, 32, 32)
    field[:, 0] = 2.0  # every output pixel samples 2 px to the right: content moves left
    moved = move_points(coords, labels, field)
    torch.testing.assert_close(moved[0, 0], torch.tensor([18.0, 10.0]))
    torch.testing.assert_close(moved[0, 1], coords[0, 1])  # padding stays put


def test_the_gcn_sees_the_right_edges_on_three_objects():
    """A overlaps B; C is far from both but has A's statistics; B and C differ."""
    masks = torch.zeros(3, 40, 40, dtype=torch.bool)
    masks[0, 5:15, 5:15] = True  # A
    masks[1, 12:22, 12:22] = True  # B, overlapping A
    masks[2, 30:38, 30:38] = True  # C, far away
    spatial = spatial_edges_from_masks(masks, radius=1)
    assert sorted(map(tuple, spatial.T.tolist())) == [(0, 1), (1, 0)]
    features = torch.tensor([[0.2, 0.1], [0.9, 0.5], [0.21, 0.1]])
    present = torch.ones(3, dtype=torch.bool)
    edges = object_graph(features, spatial, 3, present, similarity_threshold=0.1)
    got = sorted(map(tuple, edges.T.tolist()))
    expected = sorted([(0, 1), (1, 0), (0, 2), (2, 0), (0, 0), (1, 1), (2, 2)])
    assert got == expected
    # an absent region (e.g. a label not in this image) gets no edges at all
    edges = object_graph(features, spatial, 3, torch.tensor([True, True, False]), 0.1)
    assert sorted(map(tuple, edges.T.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_touching_objects_are_adjacent_and_the_style_graph_uses_them():
    from napari_ruac.training.data import spatial_edges_from_labels

    _, lab = _label_scene()
    edges = spatial_edges_from_labels(lab.numpy(), radius=1)
    pairs = set(map(tuple, edges.T.tolist()))
    assert (1, 2) in pairs and (2, 1) in pairs  # the touching squares
    assert (1, 3) not in pairs and (2, 3) not in pairs  # the disc is apart
    assert {(0, 1), (0, 2), (0, 3)} <= pairs  # every object borders the background
    # a two-image batch: node ids are offset per image
    both = spatial_edges_from_labels(torch.cat([lab, lab]).numpy(), radius=1)
    n = int(lab.max()) + 1
    assert (n + 1, n + 2) in set(map(tuple, both.T.tolist()))

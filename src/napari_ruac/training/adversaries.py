"""The two RUAC attackers and the gradient reversal layer between them and the model.

Both attackers' outputs pass through :class:`GradientReversal` before they touch the image,
so one backward pass of the model's loss trains the model to resist (ordinary gradients) and
the attackers to attack (reversed gradients: they ascend the same loss).

* :class:`StyleAdversary`: per-region (objects + background) mean/std of the image, a GCN
  (torch-geometric) over the object graph predicting bounded residuals of those statistics,
  AdaIN per region.
* :class:`DeformAdversary`: a small conv net on detached backbone features and a mask
  embedding predicts a coarse offset field; bounded, zero-mean inside each object, upsampled
  smooth; ``grid_sample`` warps image and masks together and moves point prompts along.

At inference the attackers are gone; only the model remains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.sam import LABEL_PAD


# ---------------------------------------------------------------------------------- GRL
class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coef):
        ctx.coef = coef
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coef * grad, None


def grad_reverse(x: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-coef`` backward."""
    return _ReverseGrad.apply(x, coef)


class GradientReversal(nn.Module):
    def __init__(self, coef: float = 1.0) -> None:
        super().__init__()
        self.coef = coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.coef)


@dataclass(frozen=True)
class AdversaryConfig:
    style: bool = True
    deform: bool = True
    # style: residual of each region's mean (image units) and of its log std
    max_mean_shift: float = 0.15
    max_log_std: float = math.log(1.6)
    gcn_hidden: int = 32
    similarity_threshold: float = 0.5  # feature distance below which two regions are linked
    # deformation: offsets in pixels of the model input
    max_offset: float = 4.0
    deform_hidden: int = 32
    lr: float = 1e-3

    @classmethod
    def from_dict(cls, data: dict | None) -> "AdversaryConfig":
        return cls(**(data or {}))


# ---------------------------------------------------------------------------------- graph
def region_stats(images: torch.Tensor, label_maps: torch.Tensor, n: int):
    """Per-region statistics; region ``b * n + k`` is label ``k`` of image ``b`` (0 = background).

    ``images`` (B, C, H, W), ``label_maps`` (B, H, W) long with values < n.
    Returns mean (B*n, C), std (B*n, C), count (B*n,).
    """
    b, c, h, w = images.shape
    idx = (label_maps + n * torch.arange(b, device=images.device).view(b, 1, 1)).reshape(-1)
    x = images.permute(0, 2, 3, 1).reshape(-1, c)
    count = torch.zeros(b * n, device=images.device).index_add_(0, idx, torch.ones_like(idx, dtype=images.dtype))
    s1 = torch.zeros(b * n, c, device=images.device, dtype=images.dtype).index_add_(0, idx, x)
    s2 = torch.zeros(b * n, c, device=images.device, dtype=images.dtype).index_add_(0, idx, x * x)
    cnt = count.clamp_min(1).unsqueeze(1)
    mean = s1 / cnt
    var = (s2 / cnt - mean.square()).clamp_min(0)
    return mean, var.sqrt(), count


def spatial_edges_from_masks(masks: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Overlap and adjacency edges between M (possibly overlapping) masks (M, H, W).

    Two objects are linked when they overlap or when one, dilated by ``radius`` pixels,
    touches the other. Returns (2, E) long, both directions, no self-loops.
    """
    m = masks.float().unsqueeze(1)
    dil = F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius) if radius > 0 else m
    touch = dil.flatten(1) @ m.flatten(1).T > 0
    touch = touch | touch.T
    touch.fill_diagonal_(False)
    return touch.nonzero().T.contiguous()


def object_graph(
    features: torch.Tensor,
    spatial_edges: torch.Tensor,
    nodes_per_graph: int,
    present: torch.Tensor,
    similarity_threshold: float,
) -> torch.Tensor:
    """The edges the GCN sees: spatial (overlap/adjacency) + feature similarity + self-loops.

    ``features`` (G*n, F) standardised region features; ``spatial_edges`` (2, E) global node ids;
    ``present`` (G*n,) bool, regions that exist (absent ones get no edges, not even self-loops).
    Feature-similarity edges join regions of the same image whose feature distance is below
    ``similarity_threshold``. Returns (2, E') long without duplicates.
    """
    total = features.shape[0]
    g = total // nodes_per_graph
    f = features.view(g, nodes_per_graph, -1)
    dist = torch.cdist(f, f)
    ok = present.view(g, nodes_per_graph)
    sim = (dist < similarity_threshold) & ok.unsqueeze(1) & ok.unsqueeze(2)
    sim = sim & ~torch.eye(nodes_per_graph, dtype=torch.bool, device=features.device)
    gi, i, j = sim.nonzero(as_tuple=True)
    sim_edges = torch.stack([gi * nodes_per_graph + i, gi * nodes_per_graph + j])
    keep = present[spatial_edges[0]] & present[spatial_edges[1]] if spatial_edges.numel() else None
    spatial = spatial_edges[:, keep] if keep is not None else spatial_edges
    nodes = present.nonzero().squeeze(1)
    loops = torch.stack([nodes, nodes])
    edges = torch.cat([spatial.to(features.device), sim_edges, loops], dim=1)
    code = torch.unique(edges[0] * total + edges[1])
    return torch.stack([code // total, code % total])


# ---------------------------------------------------------------------------------- style
class StyleAdversary(nn.Module):
    """GCN over region statistics -> bounded residuals -> AdaIN per region."""

    def __init__(self, cfg: AdversaryConfig, channels: int = 3) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv  # lazy: torch_geometric pulls in triton

        self.cfg = cfg
        self.channels = channels
        in_dim = 2 * channels + 2
        # self-loops are part of the graph we build (object_graph), not added again here
        self.conv1 = GCNConv(in_dim, cfg.gcn_hidden, add_self_loops=False)
        self.conv2 = GCNConv(cfg.gcn_hidden, cfg.gcn_hidden, add_self_loops=False)
        self.out = nn.Linear(cfg.gcn_hidden, 2 * channels)
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)

    def node_features(self, mean, std, count, pixels):
        """(N, 2C + 2): mean, log std, relative log area, background flag; standardised."""
        log_std = torch.log(std + 1e-3)
        area = torch.log1p(count).unsqueeze(1) - math.log1p(pixels)
        feats = torch.cat([mean, log_std, area, torch.zeros_like(area)], dim=1)
        return feats

    def residuals(self, images, label_maps, spatial_edges):
        """Bounded residuals of each region's statistics.

        Returns ``d_mean`` (B*n, C) in [-max_mean_shift, max_mean_shift], ``d_log_std``
        (B*n, C) in [-max_log_std, max_log_std], the region ``mean`` (B*n, C), the graph's
        ``edges`` and ``n`` (regions per image).
        """
        n = int(label_maps.max()) + 1
        with torch.no_grad():
            mean, std, count = region_stats(images, label_maps, n)
            feats = self.node_features(mean, std, count, images.shape[-2] * images.shape[-1])
            feats[::n, -1] = 1.0  # background flag
            present = count > 0
            sim_feats = torch.cat([mean, torch.log(std + 1e-3) / 4], dim=1)
            edges = object_graph(sim_feats, spatial_edges.to(images.device), n, present, self.cfg.similarity_threshold)
        x = F.gelu(self.conv1(feats, edges))
        x = F.gelu(self.conv2(x, edges))
        raw = torch.tanh(self.out(x))
        c = self.channels
        d_mean = self.cfg.max_mean_shift * raw[:, :c]
        d_log_std = self.cfg.max_log_std * raw[:, c:]
        return d_mean, d_log_std, mean, edges, n

    def forward(self, images, label_maps, spatial_edges, grl_coef: float = 1.0):
        """(B, C, H, W) -> re-styled (B, C, H, W); residuals pass a gradient reversal layer."""
        d_mean, d_log_std, mean, _, n = self.residuals(images, label_maps, spatial_edges)
        d_mean = grad_reverse(d_mean, grl_coef)
        d_log_std = grad_reverse(d_log_std, grl_coef)
        return adain_regions(images, label_maps, n, mean, d_mean, d_log_std)


def adain_regions(images, label_maps, n, mean, d_mean, d_log_std):
    """AdaIN per region: inside region r, ``x' = (mu_r + dmu_r) + (x - mu_r) * exp(dls_r)``.

    This is ``(x - mu) / sigma * sigma' + mu'`` with ``sigma' = sigma * exp(dls)`` and
    ``mu' = mu + dmu``, written without the division so tiny flat regions stay finite: the
    output has exactly mean ``mu'`` and std ``sigma'`` inside each region.
    ``images`` (B, C, H, W), ``label_maps`` (B, H, W); stats (B*n, C).
    """
    b, c, h, w = images.shape
    idx = label_maps + n * torch.arange(b, device=images.device).view(b, 1, 1)
    mu = mean[idx].permute(0, 3, 1, 2)
    dmu = d_mean[idx].permute(0, 3, 1, 2)
    scale = torch.exp(d_log_std)[idx].permute(0, 3, 1, 2)
    return mu + dmu + (images - mu) * scale


# ---------------------------------------------------------------------------------- deformation
class DeformAdversary(nn.Module):
    """Detached backbone features + mask embedding -> coarse, bounded, object-zero-mean offsets."""

    def __init__(self, cfg: AdversaryConfig, feature_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        hid = cfg.deform_hidden
        self.net = nn.Sequential(
            nn.Conv2d(feature_dim + 2, hid, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hid, hid, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hid, 2, 3, padding=1),
        )
        # start (almost) at the identity warp; the reversed gradient grows it
        nn.init.normal_(self.net[-1].weight, std=1e-3)
        nn.init.zeros_(self.net[-1].bias)

    def offsets(self, features: torch.Tensor, label_maps: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) features, (B, H, W) labels -> offsets (B, 2, H, W) in pixels (dx, dy).

        Bounded by ``max_offset`` everywhere, zero-mean inside each object.
        """
        size = label_maps.shape[-2:]
        grid = features.shape[-2:]
        fg = (label_maps > 0).float().unsqueeze(1)
        edge = (label_maps != -F.max_pool2d(-label_maps.float().unsqueeze(1), 3, 1, 1).squeeze(1)).float()
        mask_embed = torch.cat([F.adaptive_avg_pool2d(fg, grid), F.adaptive_avg_pool2d(edge.unsqueeze(1), grid)], 1)
        # float32 from here on, also under bf16 autocast: offsets are added to pixel coordinates,
        # which bf16's 8-bit mantissa rounds to 2-4 px at the sizes trained on
        coarse = torch.tanh(self.net(torch.cat([features.detach(), mask_embed], dim=1)).float()) * self.cfg.max_offset
        field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
        field = zero_mean_per_object(field, label_maps)
        # rescale (not clamp) so the bound holds without undoing the zero mean
        peak = field.abs().flatten(1).amax(1).clamp_min(1e-6)
        factor = (self.cfg.max_offset / peak).clamp(max=1.0).view(-1, 1, 1, 1)
        return field * factor

    def forward(self, features, label_maps, grl_coef: float = 1.0) -> torch.Tensor:
        return grad_reverse(self.offsets(features, label_maps), grl_coef)


def zero_mean_per_object(field: torch.Tensor, label_maps: torch.Tensor) -> torch.Tensor:
    """Subtract each object's mean offset inside it (background left as it is).

    An object then changes shape but does not move as a whole, so prompts stay meaningful.
    ``field`` (B, 2, H, W), ``label_maps`` (B, H, W).
    """
    b = field.shape[0]
    n = int(label_maps.max()) + 1
    idx = (label_maps + n * torch.arange(b, device=field.device).view(b, 1, 1)).reshape(-1)
    vec = field.permute(0, 2, 3, 1).reshape(-1, 2)
    count = torch.zeros(b * n, device=field.device).index_add_(0, idx, torch.ones_like(idx, dtype=field.dtype))
    sums = torch.zeros(b * n, 2, device=field.device, dtype=field.dtype).index_add_(0, idx, vec)
    means = sums / count.clamp_min(1).unsqueeze(1)
    means[::n] = 0.0  # background
    return field - means[idx].view(b, *label_maps.shape[-2:], 2).permute(0, 3, 1, 2)


def warp(images: torch.Tensor, offsets: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``images`` (B, C, H, W) at ``p + offsets(p)``; offsets (B, 2, H, W) in pixels (dx, dy).

    Zero offsets give the input back exactly (align_corners=False pixel centres).
    """
    b, _, h, w = images.shape
    ys = torch.arange(h, device=images.device, dtype=offsets.dtype)
    xs = torch.arange(w, device=images.device, dtype=offsets.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    x = gx + offsets[:, 0]
    y = gy + offsets[:, 1]
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)
    return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="border", align_corners=False)


def warp_masks(masks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Warp (P, H, W) {0, 1} masks with per-mask offsets (P, 2, H, W): bilinear, then > 0.5."""
    return (warp(masks.unsqueeze(1).float(), offsets.detach()).squeeze(1) > 0.5).float()


def move_points(coords: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Where prompt points land after the warp.

    The warp samples input ``q = p + d(p)``; a point at ``q`` moves to ``p ~ q - d(q)`` (first
    order; the field is smooth). ``coords`` (P, N, 2) (x, y), ``offsets`` (P, 2, H, W).
    Padding points are left alone.
    """
    h, w = offsets.shape[-2:]
    grid = torch.stack([(2 * coords[..., 0] + 1) / w - 1, (2 * coords[..., 1] + 1) / h - 1], dim=-1)
    d = F.grid_sample(offsets.detach(), grid.unsqueeze(1), mode="bilinear", padding_mode="border",
                      align_corners=False).squeeze(2).permute(0, 2, 1)  # (P, N, 2)
    moved = coords - d
    moved = torch.stack([moved[..., 0].clamp(0, w), moved[..., 1].clamp(0, h)], dim=-1)
    return torch.where((labels == LABEL_PAD).unsqueeze(-1), coords, moved)


@dataclass
class AdversarialBatch:
    """``images`` (B, 3, H, W); ``targets`` (P, H, W); ``coords`` (P, N, 2); ``offsets`` (B, 2, H, W)."""

    images: torch.Tensor
    targets: torch.Tensor
    coords: torch.Tensor
    offsets: torch.Tensor | None


class Adversaries(nn.Module):
    """Style then deformation; returns the attacked batch (gradients reversed into both)."""

    def __init__(self, cfg: AdversaryConfig, feature_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.style = StyleAdversary(cfg) if cfg.style else None
        self.deform = DeformAdversary(cfg, feature_dim) if cfg.deform else None

    def forward(self, images, label_maps, spatial_edges, features, targets, image_index, coords, point_labels,
                grl_coef: float = 1.0) -> AdversarialBatch:
        x = images
        if self.style is not None:
            x = self.style(x, label_maps, spatial_edges, grl_coef)
        offsets = None
        if self.deform is not None:
            offsets = self.deform(features, label_maps, grl_coef)
            x = warp(x, offsets)
            per_obj = offsets[image_index]
            targets = warp_masks(targets, per_obj)
            coords = move_points(coords, point_labels, per_obj)
        return AdversarialBatch(x, targets, coords, offsets)

"""Losses of RUAC training (DESIGN.md, "Training").

Mask logits come from the decoder at 1/4 of the input size. They are upsampled bilinearly to
the input size (exactly as :class:`~napari_ruac.model.Predictor` upsamples them at inference)
and compared with the full-resolution ground truth, so training optimises the masks users see.

* ``L_seg = w_focal * focal + dice + IoU-L1 (+ object score BCE)`` (``form="focal"``, the paper),
  or ``BCE + dice + IoU-L1`` (``form="bce"``): from scratch the focal form collapsed to empty
  masks in our prototype while BCE learned, so the micro recipes use ``bce``.
* ``KL``: the decoder's closed-form Weibull-Gamma KL (mean per element).
* ``L_cal = e * exp(-sg[u]) + (1 - e) * exp(sg[u])``, ``e = |p - M*|`` per pixel, sg = stop-gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.weibull import binary_entropy_from_logit


@dataclass(frozen=True)
class LossConfig:
    form: str = "bce"  # "bce" or "focal"
    focal_weight: float = 20.0
    bce_weight: float = 1.0
    # foreground pixels' weight in BCE at step 0, decaying linearly to 1 at fg_weight_steps:
    # objects cover a few % of a crop, and from scratch the masks first collapse to empty;
    # the weight pulls them out early and is gone (calibrated p) once the decay ends
    fg_weight_start: float = 1.0
    fg_weight_steps: int = 0
    # distillation of a warm-started Bayesian head from the model's own deterministic decoder
    # (SAM2's hypernetwork MLPs, trained in the det run it was warm-started from): soft-target
    # BCE of the predictive logit against sigmoid(teacher logit), weight decaying linearly to 0
    distill_weight: float = 0.0
    distill_steps: int = 0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    object_weight: float = 1.0
    kl_weight: float = 1e-3  # beta
    cal_weight: float = 0.1  # lambda (attackers only)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    @classmethod
    def from_dict(cls, data: dict | None) -> "LossConfig":
        cfg = cls(**(data or {}))
        if cfg.form not in ("bce", "focal"):
            raise ValueError(f"loss form must be 'bce' or 'focal', got {cfg.form!r}")
        return cfg


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(P, M, h, w) decoder-resolution logits -> (P, M, H, W), as the predictor does."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss, mean over pixels, per object: (P, H, W) -> (P,)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, fg_weight: float = 1.0) -> torch.Tensor:
    """(P, H, W) -> (P,); foreground pixels weigh ``fg_weight``."""
    weight = None if fg_weight == 1.0 else 1.0 + (fg_weight - 1.0) * target
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none").flatten(1).mean(1)


def distill_weight_at(step: int, cfg: "LossConfig") -> float:
    if cfg.distill_weight <= 0 or step >= cfg.distill_steps:
        return 0.0
    return cfg.distill_weight * (1.0 - step / max(1, cfg.distill_steps))


def fg_weight_at(step: int, cfg: "LossConfig") -> float:
    """The foreground weight of BCE at ``step`` (linear decay to 1)."""
    if cfg.fg_weight_steps <= 0 or step >= cfg.fg_weight_steps:
        return 1.0
    return 1.0 + (cfg.fg_weight_start - 1.0) * (1.0 - step / cfg.fg_weight_steps)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per object: (P, H, W) -> (P,)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks per object: (P, H, W) -> (P,); an empty union counts as 1."""
    pred, target = pred.flatten(1), target.flatten(1) > 0.5
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``keep``; a zero that still carries the graph when none is kept."""
    return values[keep].mean() if bool(keep.any()) else values.sum() * 0.0


def pixel_losses(logits: torch.Tensor, target: torch.Tensor, cfg: LossConfig,
                 fg_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt set (P,): the weighted pixel term (BCE or focal) and the Dice term."""
    if cfg.form == "focal":
        pix = cfg.focal_weight * focal_loss(logits, target, cfg.focal_alpha, cfg.focal_gamma)
    else:
        pix = cfg.bce_weight * bce_loss(logits, target, fg_weight)
    return pix, dice_loss(logits, target)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    iou_pred: torch.Tensor,
    object_logits: torch.Tensor,
    cfg: LossConfig,
    fg_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """All parts of ``L_seg`` for one mask per prompt set.

    ``logits`` (P, H, W) full-resolution, ``target`` (P, H, W) in {0, 1}, ``iou_pred`` (P,),
    ``object_logits`` (P,). As in SAM2, the object score learns whether the prompt hits an
    object (target non-empty); mask, Dice and IoU terms count only prompt sets with an object
    (a prompt on background has no mask to learn, only "no object").
    Returns scalars: ``seg`` (the weighted sum), ``focal`` or ``bce``, ``dice``, ``iou``, ``obj``.
    """
    present = target.flatten(1).amax(1) > 0.5
    pix, dice = pixel_losses(logits, target, cfg, fg_weight)
    pix_mean = _masked_mean(pix, present)
    parts: dict[str, torch.Tensor] = {}
    parts["focal" if cfg.form == "focal" else "bce"] = pix_mean / (
        cfg.focal_weight if cfg.form == "focal" else cfg.bce_weight)
    parts["dice"] = _masked_mean(dice, present)
    with torch.no_grad():
        actual_iou = mask_iou(logits > 0, target)
    parts["iou"] = _masked_mean((iou_pred.float() - actual_iou).abs(), present)
    parts["obj"] = F.binary_cross_entropy_with_logits(object_logits.float(), present.float())
    parts["seg"] = (pix_mean + cfg.dice_weight * parts["dice"] + cfg.iou_weight * parts["iou"]
                    + cfg.object_weight * parts["obj"])
    parts["train_iou"] = _masked_mean(actual_iou, present)
    return parts


def multimask_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor, cfg: LossConfig,
                   fg_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """SAM2's loss for the multimask outputs of ambiguous (single-point) prompts.

    ``logits`` (P, K, H, W), ``target`` (P, H, W), ``iou_pred`` (P, K). Only the best of the K
    masks (lowest pixel + Dice loss) is trained towards the target, so the K tokens can
    specialise on different readings of one click; the IoU head learns the actual IoU of every
    token's mask, which is what lets the predictor and the automatic segmenter choose.
    Prompt sets without an object are ignored. Returns ``mm_seg`` and ``mm_iou`` scalars.
    """
    p, k = logits.shape[:2]
    flat = logits.flatten(0, 1)
    tgt = target.repeat_interleave(k, 0)
    pix, dice = pixel_losses(flat, tgt, cfg, fg_weight)
    per_token = (pix + cfg.dice_weight * dice).view(p, k)
    present = target.flatten(1).amax(1) > 0.5
    with torch.no_grad():
        actual = mask_iou(flat > 0, tgt).view(p, k)
    best = per_token.min(1).values
    iou_l1 = (iou_pred.float() - actual).abs().mean(1)
    return {"mm_seg": _masked_mean(best, present), "mm_iou": _masked_mean(iou_l1, present)}


def calibration_loss(prob_logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(e * exp(-sg[u]) + (1 - e) * exp(sg[u]))`` with ``e = |p - M*|``.

    ``prob_logit`` (P, H, W) is the logit of the predictive probability ``p``; ``u`` is its
    binary entropy in bits (the uncertainty users see). The stop-gradient on ``u`` means only
    the error term carries gradient: an attacker maximising this loss seeks errors where the
    model is confident (where ``exp(-u)`` is large), not merely more uncertainty.
    """
    p = torch.sigmoid(prob_logit)
    e = (p - target).abs()
    u = binary_entropy_from_logit(prob_logit).detach()
    return (e * torch.exp(-u) + (1 - e) * torch.exp(u)).mean()

"""The RUAC trainer: one step = clean pass (+ attacked pass), one backward, AdamW.

A run lives in a folder: ``last.pt`` (model, attackers, optimizer, step, RNG states; written
atomically every ``checkpoint_every`` steps), ``log.csv`` (losses per step and validation
metrics) and ``curves.png``. ``resume=True`` continues the same run: the data of step ``k`` is a
pure function of ``(seed, k)`` and the trainer's own random stream is restored, so the loss log
of a killed-and-resumed run equals the uninterrupted one.

Variants (``variant`` in the config):

* ``det``: SAM2's deterministic decoder (``head: deterministic``), seg loss only;
* ``bayes``: the Weibull Bayesian decoder, ``L_seg + beta * KL`` on sampled logits;
* ``ruac``: ``bayes`` plus the style and deformation attackers behind gradient reversal:
  ``L = (L_seg + beta KL) + gamma (L_seg_adv + beta KL_adv)``; the attackers also ascend
  ``lam * L_cal`` (applied to their gradients only, see :meth:`Trainer._calibration_grads`).
"""

from __future__ import annotations

import copy
import csv
import gc
import io
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.automatic import trained_heads
from ..model.build import build_model, load_model
from ..model.checkpoint import atomic_torch_save, first_nonfinite, save_checkpoint
from ..model.config import MODEL_SPECS, ModelConfig
from ..model.sam import RuacSam, tie_query_key
from ..model.weibull import binary_entropy_from_logit, probit_logit
from .adversaries import AdversaryConfig, Adversaries
from .config import check_recipe
from .data import AnnotatedImages, BatchMaker, DataConfig, close_batches, make_loader, received_batches
from .losses import (LossConfig, calibration_loss, distill_weight_at, fg_weight_at, mask_iou, multimask_loss,
                     segmentation_loss, upsample_logits)
from .prompts import KIND_POINT, correction_clicks

VARIANTS = ("det", "bayes", "ruac")

DEFAULTS: dict = {
    "name": "custom",
    "variant": "ruac",
    "seed": 0,
    "model": {"spec": "micro", "init": "scratch", "checkpoint": None, "config": None, "align_image_to_token": True,
              "warm_start": None},
    "data": {},
    "loss": {},
    "adversaries": {},
    "optim": {
        "steps": 10000,
        "lr": 4e-4,
        "encoder_lr": None,  # None: same as lr; 0: encoder frozen
        # None: every parameter the variant uses learns; a list of parameter-name prefixes of
        # the model (e.g. [sam_mask_decoder.weibull_head]): only those learn, the rest is frozen
        "trainable": None,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "warmup": 300,
        "min_lr_ratio": 0.05,
        "clip": 1.0,
    },
    "curriculum": {"kl_start": 0, "adv_start": 0, "adv_ramp": 1000, "gamma": 0.5},
    "train": {
        "checkpoint_every": 200,
        "log_every": 1,
        "val_every": 500,
        "correction_prob": 0.5,
        "bayes_logits": "sample",  # which logits the seg loss sees in Bayesian variants
        # SAM2's multimask loss on single-click prompts (best of the 3 extra masks + IoU head on all)
        "multimask": False,
        "threads": None,
        # "auto": bf16 autocast on CUDA, float32 elsewhere; "bf16" or "fp32" to choose (the
        # Weibull head and the deformation field stay in float32 under bf16)
        "precision": "auto",
    },
    "val": {"images": 16, "size": 256, "seed": 12345, "batch_size": 4, "source": "synthetic"},
}

LOG_FIELDS = [
    "step", "lr", "size", "prompts", "gamma", "beta", "loss", "seg", "bce", "focal", "dice", "iou", "obj",
    "kl", "train_iou", "adv_seg", "adv_kl", "adv_iou", "cal", "distill", "mm_seg", "mm_iou", "grad_norm", "sec",
    "val_miou_point", "val_miou_box", "val_fg_iou", "val_pcc", "val_auroc", "val_ece",
]
PRECISIONS = ("auto", "bf16", "fp32")
# steps in a row with a NaN or infinite loss or gradient (each skipped) before a run stops
MAX_NONFINITE_STEPS = 5
LOSS_FIELDS = ["loss", "seg", "bce", "focal", "dice", "iou", "obj", "kl", "train_iou", "adv_seg", "adv_kl", "adv_iou", "cal",
               "distill", "mm_seg", "mm_iou"]


def merge(base: dict, over: dict | None) -> dict:
    """Recursive dict merge (``over`` wins); unknown top-level sections are an error."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path_or_dict) -> dict:
    """A recipe (YAML path or dict) merged over :data:`DEFAULTS`, checked."""
    if isinstance(path_or_dict, (str, os.PathLike)):
        import yaml

        path = Path(path_or_dict)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        where = str(path)
        with open(path, "rb") as f:  # bytes: YAML finds the encoding itself
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping")
    else:
        where = "training config"
        raw = dict(path_or_dict)
    unknown = sorted(set(raw) - set(DEFAULTS), key=str)
    if unknown:
        raise ValueError(f"unknown training config sections {unknown}; expected some of {sorted(DEFAULTS)}")
    raw = check_recipe(raw, DEFAULTS, where)
    cfg = merge(DEFAULTS, raw)
    if cfg["variant"] not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {cfg['variant']!r}")
    if cfg["train"]["precision"] not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {cfg['train']['precision']!r}")
    trainable = cfg["optim"]["trainable"]
    if trainable is not None and (not isinstance(trainable, list) or not trainable
                                  or not all(isinstance(t, str) and t for t in trainable)):
        raise ValueError(f"optim.trainable must be a non-empty list of parameter-name prefixes, got {trainable!r}")
    return cfg


def _yaml_problem(exc) -> str:
    """What a YAML error says went wrong, and where (line and column counted from 1)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if not problem:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return (f"{context + ', ' if context else ''}{problem}"
            + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""))


# ---------------------------------------------------------------------------------- model
def build_training_model(cfg: dict, require_weights: bool = True) -> RuacSam:
    """From scratch (``init: scratch``: a registered spec's architecture, with the fields given
    in ``config`` changed) or from existing weights (``init: pretrained``, via ``load_model``).

    ``require_weights``: a ``checkpoint`` the recipe names must exist (a fine-tuning recipe must
    not quietly start from random weights). A resumed run, whose weights come from its own
    state, passes False: without the file it gets the registered spec's architecture with
    random weights (``info["weights_missing"]``), which its state then overwrites."""
    mcfg = cfg["model"]
    named = mcfg.get("checkpoint")
    if mcfg["init"] == "pretrained" and named and not Path(named).is_file():
        if require_weights or mcfg["spec"] not in MODEL_SPECS:
            raise FileNotFoundError(f"the recipe starts from {named}, which does not exist (model.checkpoint)")
        model = build_model(_recipe_architecture(cfg), seed=cfg["seed"])
        model.info = {"source": f"random ({named} missing)", "variant": mcfg["spec"], "trained": False,
                      "weights_missing": True}
        return model
    if mcfg["init"] == "scratch":
        model = build_model(_recipe_architecture(cfg), seed=cfg["seed"])
        if mcfg.get("align_image_to_token", True):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg["seed"] + 2)
                align_image_to_token(model)
        if mcfg.get("warm_start"):
            warm_start(model, mcfg["warm_start"])
        return model
    if mcfg["init"] == "pretrained":
        source = mcfg.get("checkpoint") if mcfg["spec"] not in MODEL_SPECS else mcfg["spec"]
        checkpoint = mcfg.get("checkpoint") if mcfg["spec"] in MODEL_SPECS else None
        # an UntrainedWeightsWarning (e.g. official SAM2 weights: no Bayesian head yet) is
        # left to reach the user: fine-tuning is what trains that head
        model = load_model(source or mcfg["spec"], device="cpu", checkpoint=checkpoint)
        if (model.config.head == "deterministic") != (cfg["variant"] == "det"):
            raise ValueError(
                f"model {mcfg['spec']!r} has a {model.config.head} decoder but the recipe's variant is "
                f"{cfg['variant']!r} (use variant 'det' exactly for deterministic models)"
            )
        return model
    raise ValueError(f"model.init must be 'scratch' or 'pretrained', got {mcfg['init']!r}")


def _recipe_architecture(cfg: dict) -> ModelConfig:
    """The registered spec's architecture with the recipe's ``model.config`` fields changed and
    the decoder its variant needs."""
    mcfg = cfg["model"]
    if mcfg["spec"] not in MODEL_SPECS:
        raise ValueError(f"unknown model spec {mcfg['spec']!r}; expected one of {list(MODEL_SPECS)}")
    config = MODEL_SPECS[mcfg["spec"]].config
    if mcfg.get("config"):
        config = ModelConfig.from_dict({**config.to_dict(), **mcfg["config"]})
    want = "deterministic" if cfg["variant"] == "det" else "bayesian"
    if config.head != want:
        config = ModelConfig(**{**config.to_dict(), "head": want})
    return config


def warm_start(model: RuacSam, path: str | os.PathLike) -> list[str]:
    """Copy every same-named, same-shaped tensor of a trainer checkpoint (``last.pt``) or a
    package checkpoint into ``model``; returns the keys that kept their fresh values.

    The use: a Bayesian model warm-started from a ``micro-det`` run inherits an encoder and a
    two-way transformer that already follow the prompt, and trains its Weibull head on top
    (from scratch the Bayesian head learned "all objects" and ignored the prompt for longer
    than our CPU budget). A det run's Weibull head is its (frozen) initialisation, so copying it
    is the same as starting it fresh.
    """
    from ..model.checkpoint import FORMAT, read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"warm-start checkpoint not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = read_checkpoint(path)[0] if obj.get("format") == FORMAT else obj["model"]
    own = model.state_dict()
    keep = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
            if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(keep) < len(own) // 2:
        raise ValueError(f"{path} shares only {len(keep)} of {len(own)} tensors with this model: another architecture")
    model.load_state_dict(keep, strict=False)
    return sorted(set(own) - set(keep))


def align_image_to_token(model: RuacSam, scale: float = 1.0) -> None:
    """Give the image->token cross-attention the same query and key projection.

    ``build_model`` does this for token->image attention (a prompt attends to the image
    positions it encodes). Here image positions attend most to the prompt tokens whose
    positional encoding matches theirs, so from step 0 the image embedding is updated near the
    prompt: a from-scratch decoder then has a positional route to make its mask depend on the
    prompt, instead of first learning "all objects" and ignoring where the user clicked.
    """
    tie_query_key([layer.cross_attn_image_to_token for layer in model.sam_mask_decoder.transformer.layers], scale)


def freeze_unused(model: RuacSam, variant: str) -> None:
    """Parameters the variant never uses get ``requires_grad=False`` (DDP must see no unused
    parameters): SAM2's hypernetwork MLPs in Bayesian variants, the Weibull head in ``det``,
    the mask-prompt downscaling (we never prompt with masks)."""
    dec = model.sam_mask_decoder
    unused = [model.sam_prompt_encoder.mask_downscaling]
    unused.append(dec.weibull_head if variant == "det" else dec.output_hypernetworks_mlps)
    for module in unused:
        for p in module.parameters():
            p.requires_grad_(False)


class TrainStep(nn.Module):
    """Model + attackers in one module whose ``forward`` computes all losses of a step
    (so DDP sees one forward per backward)."""

    def __init__(self, model: RuacSam, adversaries: Adversaries | None, variant: str,
                 loss_cfg: LossConfig, bayes_logits: str = "sample", multimask: bool = False) -> None:
        super().__init__()
        self.model = model
        self.adversaries = adversaries
        self.variant = variant
        self.loss_cfg = loss_cfg
        self.bayes_logits = bayes_logits
        self.multimask = multimask

    def _decode(self, emb, coords, labels, image_index, generator, mode=None, multimask_output=False):
        mode = mode or ("deterministic" if self.variant == "det" else self.bayes_logits)
        return self.model.decode(emb, coords, labels, image_index=image_index, mode=mode,
                                 multimask_output=multimask_output, return_kl=self.variant != "det",
                                 generator=generator)

    def _multimask(self, emb, batch, size, fg_weight, generator) -> dict[str, torch.Tensor] | None:
        """Multimask loss for the single-click prompt sets, with their original click (SAM2
        uses multimask output for the first, ambiguous click only)."""
        single = batch["kind"] == KIND_POINT
        if not bool(single.any()):
            return None
        out = self._decode(emb, batch["coords"][single], batch["point_labels"][single], batch["image_index"][single],
                           generator, multimask_output=True)
        parts = multimask_loss(upsample_logits(out.logits, size), batch["targets"][single], out.iou_pred,
                               self.loss_cfg, fg_weight)
        parts["mm_kl"] = out.kl if out.kl is not None else parts["mm_seg"].new_zeros(())
        return parts

    def _losses(self, out, targets, size, prefix="", fg_weight=1.0):
        logits = upsample_logits(out.logits, size)[:, 0]
        parts = segmentation_loss(logits, targets, out.iou_pred[:, 0], out.object_score_logits[:, 0], self.loss_cfg,
                                  fg_weight)
        parts["kl"] = out.kl if out.kl is not None else logits.new_zeros(())
        return {prefix + k: v for k, v in parts.items()}

    def forward(self, batch: dict, gamma: float, beta: float, correct: bool,
                generator: torch.Generator | None = None, fg_weight: float = 1.0,
                distill: float = 0.0) -> dict[str, torch.Tensor]:
        images, targets = batch["images"], batch["targets"]
        coords, labels, idx = batch["coords"], batch["point_labels"], batch["image_index"]
        size = tuple(images.shape[-2:])
        emb = self.model.encode(images)
        if correct:
            coords, labels = self._add_correction(emb, coords, labels, idx, targets, size, generator)
        out = self._decode(emb, coords, labels, idx, generator)
        parts = self._losses(out, targets, size, fg_weight=fg_weight)
        total = parts["seg"] + beta * parts["kl"]
        if self.multimask:
            mm = self._multimask(emb, batch, size, fg_weight, generator)
            if mm is not None:
                total = total + mm["mm_seg"] + self.loss_cfg.iou_weight * mm["mm_iou"] + beta * mm.pop("mm_kl")
                parts.update(mm)
        if distill > 0 and self.variant != "det":
            parts["distill"] = self._distillation(emb, coords, labels, idx, out, size)
            total = total + distill * parts["distill"]
        if gamma > 0 and self.adversaries is not None:
            adv = self.adversaries(images, batch["label_maps"], batch["edges"], emb.image_embed, targets, idx,
                                   coords, labels)
            emb_a = self.model.encode(adv.images)
            out_a = self._decode(emb_a, adv.coords, labels, idx, generator)
            adv_parts = self._losses(out_a, adv.targets, size, "adv_", fg_weight)
            total = total + gamma * (adv_parts["adv_seg"] + beta * adv_parts["adv_kl"])
            prob_logit = upsample_logits(probit_logit(out_a.logit_mean, out_a.logit_var), size)[:, 0]
            parts["cal"] = calibration_loss(prob_logit, adv.targets)
            parts["adv_seg"], parts["adv_kl"] = adv_parts["adv_seg"], adv_parts["adv_kl"]
            parts["adv_iou"] = adv_parts["adv_train_iou"]
        parts["loss"] = total
        return parts

    def _distillation(self, emb, coords, labels, idx, out, size):
        """Soft-target BCE of the Bayesian predictive logit against the deterministic decoder's
        probability (the teacher runs without gradient; its MLPs are frozen in Bayesian runs)."""
        with torch.no_grad():
            teacher = self.model.decode(emb, coords, labels, image_index=idx, mode="deterministic").logits
            target = torch.sigmoid(upsample_logits(teacher, size)[:, 0])
        student = upsample_logits(probit_logit(out.logit_mean, out.logit_var), size)[:, 0]
        return F.binary_cross_entropy_with_logits(student, target)

    @torch.no_grad()
    def _add_correction(self, emb, coords, labels, idx, targets, size, generator):
        """SAM2-style: predict with the current prompts, click once on the error."""
        out = self._decode(emb, coords, labels, idx, generator,
                           mode="deterministic" if self.variant == "det" else "analytic")
        pred = upsample_logits(out.logits, size)[:, 0] > 0
        c, l = correction_clicks(pred, targets > 0.5, generator)
        return torch.cat([coords, c], 1), torch.cat([labels, l], 1)


def freeze_all_but(model: RuacSam, prefixes: list[str] | None) -> None:
    """Freeze every parameter of ``model`` whose name starts with none of ``prefixes`` (None:
    change nothing). A prefix that names no parameter the variant trains is an error: a typo
    would otherwise train nothing, or everything, without a word."""
    if prefixes is None:
        return

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix in prefixes:
        if not any(under(n, prefix) for n in names):
            raise ValueError(f"optim.trainable: {prefix!r} names no trainable parameter of this model "
                             f"(e.g. sam_mask_decoder.weibull_head, sam_mask_decoder, image_encoder)")
    for name, p in model.named_parameters():
        if not any(under(name, t) for t in prefixes):
            p.requires_grad_(False)


# ---------------------------------------------------------------------------------- schedule
def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def curriculum(step: int, cfg: dict, variant: str, loss_cfg: LossConfig) -> tuple[float, float]:
    """(gamma, beta) at ``step``: clean first, then + KL, then adversarial with a linear ramp."""
    cur = cfg["curriculum"]
    beta = loss_cfg.kl_weight if (variant != "det" and step >= cur["kl_start"]) else 0.0
    gamma = 0.0
    if variant == "ruac" and step >= cur["adv_start"]:
        ramp = max(1, cur["adv_ramp"])
        gamma = cur["gamma"] * min(1.0, (step - cur["adv_start"] + 1) / ramp)
    return gamma, beta


# ---------------------------------------------------------------------------------- validation
@dataclass
class ValidationResult:
    miou_point: float
    miou_box: float
    fg_iou: float  # IoU of point-prompted masks with ALL objects: high = the prompt is ignored
    pcc: float  # Pearson r of uncertainty and error inside the dilated objects
    auroc: float = float("nan")  # uncertainty as a detector of wrong pixels, same region
    ece: float = float("nan")  # calibration of the point-prompted probabilities, same region

    def as_dict(self) -> dict:
        return {"val_miou_point": self.miou_point, "val_miou_box": self.miou_box,
                "val_fg_iou": self.fg_iou, "val_pcc": self.pcc, "val_auroc": self.auroc, "val_ece": self.ece}


def validation_batches(cfg: dict) -> list[dict]:
    """A fixed held-out set: one batch list with point prompts, one with tight boxes."""
    v = cfg["val"]
    n_batches = max(1, v["images"] // v["batch_size"])
    out = []
    for kind, prompts in (("point", dict(p_point=1, p_points=0, p_box=0)),
                          ("box", dict(p_point=0, p_points=0, p_box=1, box_jitter=0.0, box_jitter_px=0.0))):
        dcfg = DataConfig(source=v.get("source", "synthetic"), batch_size=v["batch_size"], crop_size=v["size"],
                          p_large=0.0, p_small=0.0, synthetic=cfg["data"].get("synthetic", {}),
                          prompts={**cfg["data"].get("prompts", {}), **prompts, "background_per_image": 0})
        maker = BatchMaker(dcfg, seed=v["seed"])
        out += [(kind, maker[i]) for i in range(n_batches)]
    return out


@torch.no_grad()
def validate(model: RuacSam, batches: list) -> ValidationResult:
    was_training = model.training
    model.eval()
    ious = {"point": [], "box": []}
    fg, errs, uncs, probs, targets = [], [], [], [], []
    for kind, batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        size = tuple(batch["images"].shape[-2:])
        emb = model.encode(batch["images"])
        out = model.decode(emb, batch["coords"], batch["point_labels"], image_index=batch["image_index"])
        logits = upsample_logits(out.logits, size)[:, 0]
        present = out.object_score_logits[:, 0] > 0
        pred = (logits > 0) & present.view(-1, 1, 1)
        target = batch["targets"] > 0.5
        ious[kind].append(mask_iou(pred, target))
        if kind == "point":
            allfg = (batch["label_maps"] > 0)[batch["image_index"]]
            fg.append(mask_iou(pred, allfg))
            region = F.max_pool2d(target.float().unsqueeze(1), 11, 1, 5).squeeze(1) > 0
            errs.append((pred != target)[region].float())
            uncs.append(binary_entropy_from_logit(logits)[region])
            probs.append(torch.sigmoid(logits)[region])
            targets.append(target[region].float())
    model.train(was_training)
    from ..evaluate import auroc, ece  # the evaluation's own metrics (numpy)

    e, u = torch.cat(errs), torch.cat(uncs)
    pcc = float(torch.corrcoef(torch.stack([e, u]))[0, 1]) if e.std() > 0 and u.std() > 0 else 0.0
    e_np = e.cpu().numpy() > 0.5
    return ValidationResult(float(torch.cat(ious["point"]).mean()), float(torch.cat(ious["box"]).mean()),
                            float(torch.cat(fg).mean()), pcc, auroc(u.cpu().numpy(), e_np),
                            ece(torch.cat(probs).cpu().numpy(), torch.cat(targets).cpu().numpy()))


# ---------------------------------------------------------------------------------- trainer
@dataclass
class StepResult:
    step: int
    row: dict = field(default_factory=dict)


class Trainer:
    """``Trainer(config, run_dir).fit()``; see the module docstring for the run folder.

    ``annotated``: train on these images instead of ``data.source`` (the fine-tune widget).
    ``callback(step_result) -> bool``: called after every step; returning True stops the run
    (after a checkpoint), which is how the widget cancels.
    """

    def __init__(self, config, run_dir: str | os.PathLike, resume: bool = False, device: str = "cpu",
                 annotated: AnnotatedImages | None = None, workers: int | None = None,
                 callback: Callable[[StepResult], bool | None] | None = None, quiet: bool = False) -> None:
        self.cfg = load_config(config)
        self.run_dir = Path(run_dir)
        checkpoint = self.run_dir / "last.pt"
        if resume and checkpoint.is_file():
            self.cfg = self._saved_config(checkpoint, quiet)
        self.device = torch.device(device)
        self.callback = callback
        self.quiet = quiet
        self.nonfinite_steps = 0  # steps skipped in a row for a NaN/inf loss or gradient
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.variant = self.cfg["variant"]
        self.loss_cfg = LossConfig.from_dict(self.cfg["loss"])
        self.data_cfg = DataConfig.from_dict(self.cfg["data"])
        self.workers = self.data_cfg.workers if workers is None else workers
        self.annotated = annotated

        model = build_training_model(self.cfg, require_weights=not (resume and checkpoint.is_file())).to(self.device)
        # whether the multimask tokens and IoU head are trained SAM2's way, over the model's
        # whole lineage (recorded on export for automatic segmentation's defaults): from
        # existing weights, what the source had; and this recipe's multimask loss trains them
        source_heads = self.cfg["model"]["init"] == "pretrained" and trained_heads(model)
        self.trained_heads = bool(source_heads or self.cfg["train"]["multimask"])
        freeze_unused(model, self.variant)
        adversaries = None
        if self.variant == "ruac":
            # seeded like the model, so two processes of one recipe start identical
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg["seed"] + 1)
                adversaries = Adversaries(AdversaryConfig.from_dict(self.cfg["adversaries"]),
                                          model.config.d_model).to(self.device)
        self.model = model
        self.adversaries = adversaries
        self.step_module = TrainStep(model, adversaries, self.variant, self.loss_cfg,
                                     self.cfg["train"]["bayes_logits"], self.cfg["train"]["multimask"]).to(self.device)
        self.optimizer = self._optimizer()
        self.generator = torch.Generator(device=self.device).manual_seed(self.cfg["seed"] * 1000 + 17 + self.rank)
        self.step = 0
        self.elapsed = 0.0
        self.last_val: dict = {}
        if resume and (self.run_dir / "last.pt").is_file():
            self._load(self.run_dir / "last.pt")
        elif resume and not quiet:
            print(f"no checkpoint in {self.run_dir}: starting a new run")
        self.wrapped = self.step_module
        if self.distributed:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.step_module, find_unused_parameters=self.variant == "ruac" or self.cfg["train"]["multimask"])
        self._val_batches = None

    # -------------------------------------------------------------- set-up
    def _saved_config(self, checkpoint: Path, quiet: bool) -> dict:
        """A resumed run keeps the recipe it started with (a run is one recipe); a recipe file
        edited since is reported and ignored."""
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
        changed = sorted(_diff_keys(saved, self.cfg))
        if changed and not quiet:
            print(f"resuming with the recipe saved in {checkpoint}; ignoring edits to: {', '.join(changed)}")
        return load_config(saved)

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg["optim"]
        enc_lr = o["lr"] if o["encoder_lr"] is None else o["encoder_lr"]
        if enc_lr == 0:
            for p in self.model.image_encoder.parameters():
                p.requires_grad_(False)
        freeze_all_but(self.model, o["trainable"])
        groups: dict[str, list] = {"encoder": [], "decoder": [], "attackers": []}
        for name, p in self.step_module.named_parameters():
            if not p.requires_grad:
                continue
            key = ("attackers" if name.startswith("adversaries.") else
                   "encoder" if name.startswith("model.image_encoder.") else "decoder")
            groups[key].append(p)
        lrs = {"encoder": enc_lr, "decoder": o["lr"],
               "attackers": AdversaryConfig.from_dict(self.cfg["adversaries"]).lr}
        param_groups = []
        for key, params in groups.items():
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            # attackers get no weight decay: it would pull them back towards the identity
            wd = 0.0 if key == "attackers" else o["weight_decay"]
            for ps, w in ((decay, wd), (no_decay, 0.0)):
                if ps:
                    param_groups.append({"params": ps, "lr": lrs[key], "base_lr": lrs[key],
                                         "weight_decay": w, "name": key})
        return torch.optim.AdamW(param_groups, lr=o["lr"], betas=tuple(o["betas"]))

    def attacker_params(self) -> list[torch.Tensor]:
        if self.adversaries is None:
            return []
        return [p for p in self.adversaries.parameters() if p.requires_grad]

    # -------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "adversaries": self.adversaries.state_dict() if self.adversaries is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
            "config": self.cfg,
            "elapsed": self.elapsed,
            "last_val": self.last_val,
            "model_config": self.model.config.to_dict(),
            # decided when the run started, from the weights it started from: a resumed or
            # exported run may no longer have that file at hand
            "trained_heads": self.trained_heads,
        }

    def save(self) -> None:
        self.check_finite("checkpoint")  # on every rank: DDP replicas diverge together
        if self.rank == 0:
            atomic_torch_save(self.state(), self.run_dir / "last.pt")

    def check_finite(self, what: str) -> None:
        """Stop, rather than write a checkpoint or model whose weights hold NaN or inf: such a
        model predicts nothing, and its file would replace the last good one."""
        bad = first_nonfinite(self.model.state_dict())
        if bad is not None:
            raise TrainingDiverged(
                f"training diverged: by step {self.step} the weight {bad} is NaN or infinite; no {what} "
                f"was written ({self.run_dir / 'last.pt'} keeps the last good step, if any); try a lower "
                f"optim.lr or optim.clip"
            )

    def _load(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        bad = first_nonfinite(ckpt["model"])
        if bad is not None:
            # an older version checkpointed diverged weights; training on from them would only
            # spend a checkpoint interval before stopping
            raise TrainingDiverged(
                f"cannot resume {path}: its weight {bad} is NaN or infinite (step {int(ckpt['step'])}; it was "
                f"saved after training diverged); nothing can be trained or exported from it. Restore an "
                f"earlier copy of it, or start the run again in a new --run-dir with a lower optim.lr or optim.clip"
            )
        self.model.load_state_dict(ckpt["model"])
        if self.adversaries is not None:
            self.adversaries.load_state_dict(ckpt["adversaries"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.step = int(ckpt["step"])
        try:
            self.generator.set_state(ckpt["rng"]["generator"])
        except RuntimeError:
            # saved on another kind of device (a GPU run resumed on the CPU, or back): a CUDA
            # generator's state is not a CPU one's. The data do not depend on it (they are a
            # function of the seed and the step); the prompts' corrections and the Weibull noise
            # from here on do, so the run goes on, no longer bit-identical to an uninterrupted one
            self.generator.manual_seed(self.cfg["seed"] * 1000 + 17 + self.rank + self.step)
            if not self.quiet and self.rank == 0:
                print(f"{path} was saved on another kind of device: its random generator is reseeded at step "
                      f"{self.step} (the batches stay the same; corrections and sampling noise differ)")
        self.elapsed = float(ckpt.get("elapsed", 0.0))
        self.last_val = dict(ckpt.get("last_val", {}))
        if "trained_heads" in ckpt:
            self.trained_heads = bool(ckpt["trained_heads"])
        if not self.quiet and self.rank == 0:
            print(f"resumed {path} at step {self.step}")

    # -------------------------------------------------------------- log
    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.csv"

    def _prepare_log(self) -> None:
        """Keep the log rows of steps before ``self.step`` (a killed run may have logged
        steps after its last checkpoint; they will be logged again)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rows = read_log(self.log_path) if self.log_path.is_file() else []
        rows = [r for r in rows if int(r["step"]) < self.step]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in LOG_FIELDS})
        tmp = self.log_path.with_suffix(".csv.tmp")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, self.log_path)

    def _append_log(self, row: dict) -> None:
        with open(self.log_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow({k: _fmt(row.get(k, "")) for k in LOG_FIELDS})

    # -------------------------------------------------------------- loop
    def fit(self, max_steps: int | None = None) -> int:
        """Train until ``optim.steps`` (or ``max_steps``, without changing the schedule).
        Returns the step reached."""
        steps = self.iter_steps(max_steps)
        try:
            for result in steps:
                if self.callback is not None and self.callback(result):
                    break
        finally:
            steps.close()  # checkpoints a run stopped between checkpoints
        return self.step

    def iter_steps(self, max_steps: int | None = None):
        """The training loop as a generator of :class:`StepResult` (one per step), so a GUI
        thread worker can report progress and stop between steps. Checkpoints, the log and
        validation happen inside; closing the generator early checkpoints the last step."""
        total = self.cfg["optim"]["steps"]
        stop = min(total, max_steps) if max_steps is not None else total
        tcfg = self.cfg["train"]
        if self.rank == 0:
            self._prepare_log()
        maker = BatchMaker(self.data_cfg, seed=self.cfg["seed"] * 7919 + self.rank, annotated=self.annotated,
                           length=total)
        batches = iter(make_loader(maker, self.step, stop, self.workers))
        self.wrapped.train()
        saved_at = self.step
        try:
            for batch in received_batches(batches):
                t0 = time.perf_counter()
                row = self.train_step(batch)
                dt = time.perf_counter() - t0
                self.elapsed += dt
                row["sec"] = dt
                self.step += 1
                if tcfg["val_every"] and self.step % tcfg["val_every"] == 0:
                    row.update(self.run_validation())
                if self.rank == 0 and (self.step % tcfg["log_every"] == 0 or "val_pcc" in row):
                    self._append_log(row)
                if self.step % tcfg["checkpoint_every"] == 0 or self.step == stop:
                    self.save()
                    saved_at = self.step
                    if self.rank == 0:
                        self.plot()
                if not self.quiet and self.rank == 0 and self.step % 20 == 0:
                    print(_progress_line(row, total), flush=True)
                yield StepResult(self.step, row)
        finally:
            # Stop the data-loading workers now, not when the iterator is collected: after a
            # KeyboardInterrupt the traceback keeps it alive until interpreter exit, where the
            # DataLoader no longer stops its workers and multiprocessing's SIGTERM (which they
            # ignore, see data._worker_init) left the exit joining them forever.
            close_batches(batches)
            if saved_at != self.step:  # stopped early (cancelled): keep what was learned
                self.save()
                if self.rank == 0:
                    self.plot()

    def train_step(self, batch: dict) -> dict:
        """One optimisation step on ``batch``; returns the log row (floats)."""
        o = self.cfg["optim"]
        step = self.step
        factor = lr_factor(step, o["warmup"], o["steps"], o["min_lr_ratio"])
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        gamma, beta = curriculum(step, self.cfg, self.variant, self.loss_cfg)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        # on the generator's device: a CUDA generator cannot draw a CPU tensor (the same draws on the CPU)
        correct = bool(torch.rand((), generator=self.generator, device=self.device)
                       < self.cfg["train"]["correction_prob"])
        precision = self.cfg["train"]["precision"]
        bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        with autocast:
            parts = self.wrapped(batch, gamma, beta, correct, self.generator, fg_weight_at(step, self.loss_cfg),
                                 distill_weight_at(step, self.loss_cfg))
        self.optimizer.zero_grad(set_to_none=True)
        cal_grads = self._calibration_grads(parts.get("cal"))
        parts["loss"].backward()
        if cal_grads is not None:
            for p, g in zip(self.attacker_params(), cal_grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        params = [p for p in self.step_module.parameters() if p.requires_grad]
        # the norm also when not clipping (a max of inf scales by 1): a NaN or inf loss or
        # gradient shows there, and one such step must not turn every weight into NaN
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o["clip"] or float("inf"))
        if bool(torch.isfinite(grad_norm)):  # DDP: the gradients are all-reduced, every rank agrees
            self.optimizer.step()
            self.nonfinite_steps = 0
        else:
            self._skip_nonfinite_step(step)
        row = {"step": step, "lr": o["lr"] * factor, "size": batch["images"].shape[-1],
               "prompts": batch["targets"].shape[0], "gamma": gamma, "beta": beta,
               "grad_norm": float(grad_norm)}
        for k in LOSS_FIELDS:
            if k in parts:
                row[k] = float(parts[k].detach())
        return row

    def _skip_nonfinite_step(self, step: int) -> None:
        """A step whose loss or gradients are NaN or infinite leaves the weights as they were
        (as a mixed-precision loss scaler does); several in a row is a divergence."""
        self.nonfinite_steps += 1
        if self.nonfinite_steps >= MAX_NONFINITE_STEPS:
            raise TrainingDiverged(
                f"training diverged: the loss or its gradients were NaN or infinite in {self.nonfinite_steps} "
                f"steps in a row (to step {step + 1}); the weights are those of the last good step, and "
                f"{self.run_dir / 'last.pt'} keeps the last checkpoint; try a lower optim.lr or optim.clip"
            )
        if not self.quiet and self.rank == 0:
            print(f"step {step + 1}: the loss or its gradients are NaN or infinite; step skipped, weights unchanged",
                  flush=True)

    def _calibration_grads(self, cal: torch.Tensor | None):
        """The attackers' share of ``lam * L_cal``: gradients for the attacker parameters only.

        The model must not minimise ``L_cal`` (with ``u`` stopped it would push errors into
        uncertain pixels), so this term is not in the backward pass of the model's loss. Its
        gradient reaches the attackers through the gradient reversal layer, so adding it to
        their ``.grad`` makes them ascend it.
        """
        lam = self.loss_cfg.cal_weight
        params = self.attacker_params()
        if cal is None or lam == 0 or not params or not cal.requires_grad:
            return None
        grads = torch.autograd.grad(lam * cal, params, retain_graph=True, allow_unused=True)
        if self.distributed:
            grads = list(grads)
            for i, g in enumerate(grads):
                g = torch.zeros_like(params[i]) if g is None else g.contiguous()
                dist.all_reduce(g)
                grads[i] = g / self.world
        return grads

    def run_validation(self) -> dict:
        if self._val_batches is None:
            self._val_batches = validation_batches(self.cfg)
        res = validate(self.model, self._val_batches).as_dict()
        self.last_val = res
        return res

    # -------------------------------------------------------------- outputs
    def plot(self) -> Path | None:
        """``curves.png``: training losses (smoothed) and validation metrics."""
        if not self.log_path.is_file():
            return None
        return plot_log(self.log_path, self.run_dir / "curves.png")

    def release_distributed(self) -> None:
        """Drop the DDP wrapper (its reducer holds the process group) so the group can be
        destroyed before interpreter shutdown; the trainer keeps working undistributed."""
        if self.wrapped is not self.step_module:
            self.wrapped = self.step_module
            gc.collect()

    def export(self, path: str | os.PathLike, half: bool = True) -> Path:
        """The current model as a package checkpoint (fp16 by default) with its recipe."""
        metadata = {
            "steps": self.step,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "train_seconds": round(self.elapsed, 1),
            "variant": self.variant,
            "validation": self.last_val,
            "torch": str(torch.__version__),
            "trained_heads": self.trained_heads,
        }
        self.check_finite(f"model ({path})")
        save_checkpoint(self.model, path, variant=self.cfg["name"], recipe=self.cfg, metadata=metadata, half=half)
        return Path(path)


class TrainingDiverged(RuntimeError):
    """The weights became NaN or infinite: nothing more is saved from this run."""


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)):
            out.append(prefix + str(k))
    return out


def read_log(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_log(log_path: Path, out: Path) -> Path:
    """Loss curves (moving average) and validation metrics into a PNG, without pyplot
    (so it never touches the GUI backend of a napari session)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_log(log_path)
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for key in ("loss", "seg", "adv_seg", "kl", "cal"):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in ("", None)]
        if pts:
            xs, ys = zip(*pts)
            ax1.plot(xs, _smooth(ys), label=key)
    ax1.set_xlabel("step")
    ax1.set_yscale("log")
    if ax1.lines:
        ax1.legend()
    ax1.set_title("training losses (moving average)")
    for key in ("val_miou_point", "val_miou_box", "val_fg_iou", "val_pcc"):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in ("", None)]
        if pts:
            xs, ys = zip(*pts)
            ax2.plot(xs, ys, marker="o", label=key)
    ax2.set_xlabel("step")
    if ax2.lines:
        ax2.legend()
    ax2.set_title("validation")
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, out)
    return out


def _smooth(ys, k: int = 25):
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _progress_line(row: dict, total: int) -> str:
    keys = ("loss", "seg", "train_iou", "kl", "adv_seg", "cal", "val_miou_point", "val_miou_box", "val_pcc")
    parts = [f"{k}={row[k]:.4f}" for k in keys if isinstance(row.get(k), float)]
    return f"step {row['step'] + 1}/{total} size {row['size']} " + " ".join(parts) + f" ({row['sec']:.2f} s)"


def shutdown_distributed(trainer: Trainer | None, completed: bool) -> None:
    """End a ``torchrun`` process cleanly: release DDP, meet the other ranks, destroy the group.

    Without the release and the barrier a rank that finished first tore its sockets down while
    another still held live gloo state, and one process in ~10 died with SIGABRT ("terminate
    called without an active exception") after a successful run. After a failure the other
    ranks may never arrive, so the barrier is skipped then.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if trainer is not None:
        trainer.release_distributed()
    if completed:
        dist.barrier()
    dist.destroy_process_group()


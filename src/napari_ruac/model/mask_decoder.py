"""SAM2's mask decoder with the hypernetwork product replaced by a Weibull Bayesian head.

SAM2 forms mask logits as ``hyper_in @ upscaled_embedding``. RUAC makes both factors
non-negative Weibull random variables (DESIGN.md, "The method"):

* image tokens: a 1x1 conv on the upscaled features gives per-pixel ``(lambda_z, kappa_z)``:
  a scale per channel and one shape per pixel -> ``z`` of shape (B, C, h, w),
  ``C = transformer_dim // 8``. Sharing kappa over a pixel's channels means the Gamma-function
  terms are computed once per pixel, not C times: the analytic mode costs little more than SAM2's
  deterministic product;
* mask tokens: one MLP shared by all mask tokens gives per-channel ``(lambda, kappa)`` for a
  foreground and a background row -> ``w_fg, w_bg`` of shape (B, K, C);
* ``logit_k = <z, w_k,fg> - <z, w_k,bg> + b_k`` (signed, although every factor is positive),
  with a deterministic per-mask offset ``b_k`` from the same MLP. Why the offset: with ``z >= 0``
  the first thing training learns is "mostly background"; without ``b_k`` it can only do that by
  making every ``w_fg - w_bg`` negative, after which no pixel can reach a positive logit (we saw
  from-scratch runs stall at p < 0.15). The offset carries the background prior instead, and the
  foreground/background scales start favouring different channels so ``w_fg - w_bg`` has both
  signs from step 0 and the pixel factors get gradient at once.

The original hypernetwork MLPs stay in the module so that official SAM2.1 checkpoints load
without missing keys and the deterministic decoder can be run side by side (``mode="deterministic"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam2_utils import MLP
from torch import nn

from .weibull import (
    binary_entropy,
    binary_entropy_from_logit,
    kl_weibull_gamma,
    log_exponential,
    probit_logit,
    sigmoid_and_entropy,
    weibull_moments,
    weibull_sample,
    weibull_shape_factors,
    weibull_shape_factors_fast,
    weibull_transform,
)

DecoderMode = Literal["deterministic", "sample", "analytic", "mc"]
DECODER_MODES = ("deterministic", "sample", "analytic", "mc")
# prompt sets per pass of the analytic head at inference (see _analytic_inference); for the 64
# prompt sets of an automatic-segmentation batch of micro, 7.8 ms in chunks of 8 against 9.3 ms
# in chunks of 16 and 8.0 ms in chunks of 4 (one AVX-512 core)
HEAD_CHUNK = 8
MC_PIXEL_ESTIMATORS = ("integrate", "sample")
"""How MC mode treats the pixel factor ``z`` (``BayesianMaskDecoder.mc_pixels``).

* ``"integrate"`` (default): draw only the token factors ``w_fg, w_bg`` S times and integrate
  ``z`` analytically per draw (Rao-Blackwellised). Chosen on evidence: at S=256 its maps
  correlate with ``"sample"`` as well as two ``"sample"`` runs with different seeds do
  (per-pixel Pearson r, sample-vs-integrate / sample-vs-sample: probability 0.987 / 0.989,
  total 0.960 / 0.960, aleatoric 0.953 / 0.961, epistemic 0.952 / 0.931 on the spread test-tiny
  head of tests/test_decoder.py; 0.9998 / 0.9998, 0.996 / 0.997, 0.996 / 0.998, 0.967 / 0.973
  on the shipped micro weights and nuclei), while the head costs 8-19x less (S=20 at 256x256
  decoder resolution, one thread: micro 22 vs 181 ms, hiera-tiny 55 vs 1027 ms): a draw is two
  small matrix products instead of ``C`` Weibull draws per pixel. Its split counts the
  pixel-level Weibull noise as aleatoric, so its epistemic part is smaller on average (0.3-0.6x
  in those runs): epistemic = mutual information between the label and the mask-token weights, i.e.
  disagreement about *which object* the prompt means.
* ``"sample"``: draw every factor S times (the textbook estimator, kept for validation); its
  epistemic part also contains the pixel-level noise.
"""


@dataclass
class DecoderOutput:
    """Decoder outputs at the decoder's resolution (1/4 of the model input).

    Shapes: M masks per prompt set (1, or 3 with multimask output).

    * ``logits`` (B, M, h, w): the logit whose sigmoid is ``probability`` (analytic: the
      probit-corrected mean; mc: logit of the mean probability; sample: one sampled logit;
      deterministic: SAM2's logit).
    * ``probability``, ``uncertainty`` (B, M, h, w): foreground probability and the binary
      entropy of it in bits (total predictive uncertainty). Except in MC mode both follow from
      ``logits`` and are computed when first read: automatic segmentation reads neither for
      most of its masks (:meth:`uncertainty_of` gives the rows it needs).
    * ``logit_mean``, ``logit_var`` (B, M, h, w): moments of the Bayesian logit
      (analytic and sample modes), else None.
    * ``epistemic``, ``aleatoric`` (B, M, h, w): the MC split of ``uncertainty``, else None.
    * ``iou_pred`` (B, M), ``object_score_logits`` (B, 1).
    * ``kl``: scalar KL of both Weibull granularities to the Gamma prior (sample mode, or
      whenever ``return_kl=True``), else None.
    """

    logits: torch.Tensor
    iou_pred: torch.Tensor
    object_score_logits: torch.Tensor
    logit_mean: torch.Tensor | None = None
    logit_var: torch.Tensor | None = None
    epistemic: torch.Tensor | None = None
    aleatoric: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    # given by MC mode (the mean over samples); derived from ``logits`` on first read otherwise
    _probability: torch.Tensor | None = field(default=None, repr=False)
    _uncertainty: torch.Tensor | None = field(default=None, repr=False)

    @property
    def probability(self) -> torch.Tensor:
        if self._probability is None:
            self._probability = torch.sigmoid(self.logits)
        return self._probability

    @property
    def uncertainty(self) -> torch.Tensor:
        if self._uncertainty is None:
            self._uncertainty = binary_entropy_from_logit(self.logits)
        return self._uncertainty

    def uncertainty_of(self, index: torch.Tensor) -> torch.Tensor:
        """``uncertainty`` of the masks ``index`` (into the B*M masks, flattened), (K, h, w),
        without computing it for the others."""
        if self._uncertainty is not None:
            return self._uncertainty.flatten(0, 1)[index]
        return binary_entropy_from_logit(self.logits.flatten(0, 1)[index])


class WeibullHead(nn.Module):
    """Predicts the Weibull parameters of both factors of the mask product.

    ``lambda = softplus(x) + eps``; ``kappa = kappa_min + (kappa_max - kappa_min) * sigmoid(x)``
    so kappa stays in a range where the Gamma-function moments are well conditioned.
    """

    def __init__(
        self,
        transformer_dim: int,
        kappa_range: tuple[float, float] = (1.0, 20.0),
        kappa_init: float = 4.0,
    ) -> None:
        super().__init__()
        self.channels = transformer_dim // 8
        self.kappa_min, self.kappa_max = float(kappa_range[0]), float(kappa_range[1])
        if not 0 < self.kappa_min < kappa_init < self.kappa_max:
            raise ValueError(f"kappa_init {kappa_init} must lie inside kappa_range {kappa_range}")
        c = self.channels
        # C scales + one shape per pixel
        self.pixel_head = nn.Conv2d(c, c + 1, kernel_size=1)
        # per channel (lam, kappa) for fg and bg rows, plus one deterministic logit offset
        self.token_head = MLP(transformer_dim, transformer_dim, 4 * c + 1, 3)
        # start with moderately certain weights: kappa = kappa_init everywhere
        frac = (kappa_init - self.kappa_min) / (self.kappa_max - self.kappa_min)
        kappa_bias = math.log(frac / (1.0 - frac))
        with torch.no_grad():
            self.pixel_head.bias[c:].fill_(kappa_bias)
            self.pixel_head.weight[c:].mul_(0.1)
            last = self.token_head.layers[-1]
            last.bias[c : 2 * c].fill_(kappa_bias)
            last.bias[3 * c : 4 * c].fill_(kappa_bias)
            half = c // 2
            last.bias[:half] += 0.5  # foreground scale favours the first half of the channels
            last.bias[half:c] -= 0.5
            last.bias[2 * c : 2 * c + half] -= 0.5  # background scale the second half
            last.bias[2 * c + half : 3 * c] += 0.5
            last.bias[4 * c] = 0.0

    def _lam(self, x: torch.Tensor, fast: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        if fast:  # no autograd: the vectorised softplus, in place (into ``out`` if given)
            return _softplus_inference(x, out=out).add_(1e-4)
        return F.softplus(x) + 1e-4

    def _kappa(self, x: torch.Tensor) -> torch.Tensor:
        return self.kappa_min + (self.kappa_max - self.kappa_min) * torch.sigmoid(x)

    def pixel_params(self, upscaled: torch.Tensor, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) features -> ``lambda_z`` (B, C, h, w) and ``kappa_z`` (B, 1, h, w).

        ``fast`` swaps torch's softplus for :func:`_softplus_inference` (absolute error < 1e-6):
        on CPU torch's softplus runs a scalar ``log1p`` and was the largest extra cost of the
        analytic mode over SAM2's decoder (C values per pixel). Training and ``sample`` mode keep
        the exact function, so their numerics and gradients do not move.
        """
        raw = _pointwise_conv(self.pixel_head, upscaled)
        c = self.channels
        return self._lam(raw[:, :c], fast), self._kappa(raw[:, c:])

    def pixel_params_into(self, upscaled: torch.Tensor, raw: torch.Tensor,
                          lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`pixel_params` at inference (``fast``), flattened and written into buffers.

        (n, C, h, w) features -> ``lambda_z`` (n, C, h*w), a view of ``lam``, and ``kappa_z``
        (n, 1, h*w); ``raw`` (n, C + 1, h*w) takes the 1x1 convolution. The analytic head's
        inference loop passes the same buffers for every chunk of prompt sets, so they stay in
        the CPU's caches instead of being allocated anew per chunk.
        """
        _pointwise_conv(self.pixel_head, upscaled, out=raw)
        c = self.channels
        return self._lam(raw[:, :c], fast=True, out=lam), self._kappa(raw[:, c:])

    def token_params(self, tokens: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(B, K, D) mask tokens -> ``(lam_fg, kappa_fg, lam_bg, kappa_bg)`` each (B, K, C),
        and the logit offset (B, K)."""
        raw = self.token_head(tokens)
        c = self.channels
        params = (
            self._lam(raw[..., :c]),
            self._kappa(raw[..., c : 2 * c]),
            self._lam(raw[..., 2 * c : 3 * c]),
            self._kappa(raw[..., 3 * c : 4 * c]),
        )
        return params, raw[..., 4 * c]


class BayesianMaskDecoder(MaskDecoder):
    """SAM2 ``MaskDecoder`` whose output product is the dual-granularity Weibull head.

    ``forward`` takes the same inputs as SAM2's plus ``mode`` and ``samples`` and returns a
    :class:`DecoderOutput`. The two-way transformer runs once in every mode; Monte-Carlo
    sampling repeats only the (cheap) head.
    """

    def __init__(
        self,
        *,
        kappa_range: tuple[float, float] = (1.0, 20.0),
        prior_alpha: float = 1.0,
        prior_beta: float = 3.0,
        mc_chunk: int = 5,
        mc_pixels: str = "integrate",
        **kwargs,
    ) -> None:
        kwargs.setdefault("dynamic_multimask_via_stability", False)
        super().__init__(**kwargs)
        self.weibull_head = WeibullHead(self.transformer_dim, kappa_range=kappa_range)
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta
        self.mc_chunk = mc_chunk
        self._noise_banks: dict = {}
        # sample only the pixels that can be uncertain (see _monte_carlo); off = sample all
        self.mc_band = True
        # ... when they are less than this fraction of the map: above it, gathering and
        # scattering the band cost more than sampling every pixel (the shipped micro has
        # |logit| < 8 + 6 sd on 99-100% of a 1024^2 map; MC click 26.5 -> 23.7 ms)
        self.mc_band_below = 0.5
        if mc_pixels not in MC_PIXEL_ESTIMATORS:
            raise ValueError(f"unknown mc_pixels {mc_pixels!r}; expected one of {MC_PIXEL_ESTIMATORS}")
        self.mc_pixels = mc_pixels

    # ------------------------------------------------------------------ transformer trunk
    def _run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: torch.Tensor | None,
        high_res_features: list[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns iou token (B, D), mask tokens (B, K, D), obj token (B, D) or None,
        and the upscaled per-pixel features (B, C, h, w)."""
        s = 1 if self.pred_obj_scores else 0
        weights = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            weights.insert(0, self.obj_score_token.weight)
        output_tokens = torch.cat(weights, dim=0)
        n = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings), 1)

        # one image per prompt set: index the (few) images rather than copying them up front.
        # With a single image (interactive use) every prompt set shares it: broadcasting in the
        # additions below gives the same values without B copies of the embedding and of the
        # high-resolution features (hundreds of MB for 8 objects at 1024 px, which made a batch
        # slower than a loop).
        if image_index is not None and image_embeddings.shape[0] > 1:
            src = image_embeddings[image_index]
            if high_res_features is not None:
                high_res_features = [f[image_index] for f in high_res_features]
        else:
            src = image_embeddings
        src = src + dense_prompt_embeddings
        _, c, h, w = src.shape
        b = n
        if src.shape[0] == 1 or not torch.is_grad_enabled():
            # every prompt set sees the same image (its side of the first layer is computed
            # once), or inference: the attentions re-associated, fewer operations per pixel.
            # Training with one image per prompt set runs SAM2's own modules.
            hs, src = two_way_shared_image(self.transformer, src, image_pe, tokens)
        else:
            if src.shape[0] != n:
                src = src.expand(n, -1, -1, -1)
            hs, src = self.transformer(src, image_pe.expand(n, -1, -1, -1), tokens)
        iou_token_out = hs[:, s, :]
        mask_tokens_out = hs[:, s + 1 : s + 1 + self.num_mask_tokens, :]
        obj_token_out = hs[:, 0, :] if self.pred_obj_scores else None

        # (B, hw, D) -> a channels-last strided (B, D, h, w) view: no copy, and the upscaling
        # below works channels-last anyway
        src = src.transpose(1, 2).unflatten(2, (h, w))
        if not self.use_high_res_features:
            upscaled = self.output_upscaling(src)
        else:
            feat_s0, feat_s1 = high_res_features
            upscaled = _upscale_channels_last(self.output_upscaling, src, feat_s0, feat_s1)
        return iou_token_out, mask_tokens_out, obj_token_out, upscaled

    # ------------------------------------------------------------------ public forward
    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: list[torch.Tensor] | None = None,
        image_index: torch.Tensor | None = None,
        mode: DecoderMode = "analytic",
        samples: int = 20,
        return_kl: bool = False,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput:
        """Predict masks for a batch of prompt sets.

        Arguments:
          image_embeddings: (Bi, D, he, we) image features (Bi images).
          image_pe: (1, D, he, we) dense positional encoding.
          sparse_prompt_embeddings: (B, N, D), one row per prompt set.
          dense_prompt_embeddings: (B, D, he, we) or broadcastable.
          image_index: (B,) long, which image each prompt set belongs to; None means Bi == B.
          high_res_features: [(Bi, D/8, 4he, 4we), (Bi, D/4, 2he, 2we)] or None.
        """
        if mode not in DECODER_MODES:
            raise ValueError(f"unknown decoder mode {mode!r}; expected one of {DECODER_MODES}")
        if mode == "mc" and samples < 2:
            raise ValueError(f"mc mode needs at least 2 samples, got {samples}")
        iou_tok, mask_toks, obj_tok, upscaled = self._run_transformer(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            image_index,
            high_res_features,
        )
        iou_pred = self.iou_prediction_head(iou_tok)
        if self.pred_obj_scores:
            object_score_logits = self.pred_obj_score_head(obj_tok)
        else:
            object_score_logits = 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1)

        # select the output tokens first, so the head only runs for the masks we return
        sel = slice(1, None) if multimask_output else slice(0, 1)
        iou_pred = iou_pred[:, sel]
        mask_toks_sel = mask_toks[:, sel]
        token_ids = range(self.num_mask_tokens)[sel]

        if mode == "deterministic":
            hyper_in = torch.stack(
                [self.output_hypernetworks_mlps[i](mask_toks_sel[:, j]) for j, i in enumerate(token_ids)],
                dim=1,
            )
            logits = torch.einsum("bkc,bchw->bkhw", hyper_in, upscaled)
            return DecoderOutput(
                logits=logits,
                iou_pred=iou_pred,
                object_score_logits=object_score_logits,
                kl=None,
            )

        device = upscaled.device.type
        if torch.is_autocast_enabled(device):
            # the Weibull head in float32 under mixed precision (bf16 training on a GPU): its
            # moments, lgamma factors and KL are sums of products and logs that bf16's 8-bit
            # mantissa would round, and its fused inference path writes into float32 buffers
            with torch.autocast(device, enabled=False):
                return self._bayesian(upscaled.float(), mask_toks_sel.float(), iou_pred.float(),
                                      object_score_logits.float(), mode, samples, return_kl, generator)
        return self._bayesian(upscaled, mask_toks_sel, iou_pred, object_score_logits, mode, samples, return_kl,
                              generator)

    def _bayesian(self, upscaled, mask_toks_sel, iou_pred, object_score_logits, mode, samples, return_kl,
                  generator) -> DecoderOutput:
        """The Weibull head's output for the selected mask tokens (``forward``'s Bayesian modes)."""
        head = self.weibull_head
        # inference-only modes without autograd may take the vectorised softplus
        fast = mode in ("analytic", "mc") and not torch.is_grad_enabled()
        if mode == "analytic" and fast and not return_kl and head.kappa_min >= 1.0:
            token_params, offset = head.token_params(mask_toks_sel)
            mu, var, logits = self._analytic_inference(upscaled, token_params, offset)
            return DecoderOutput(
                logits=logits,
                iou_pred=iou_pred,
                object_score_logits=object_score_logits,
                logit_mean=mu,
                logit_var=var,
                kl=None,
            )
        lam_z, k_z = head.pixel_params(upscaled, fast=fast)
        # (B, 1, h, w) Gamma-function factors of the pixel shapes; lgamma is a scalar loop on CPU
        fast_shapes = fast and head.kappa_min >= 1.0  # the polynomial covers kappa >= 1
        shape_factors = (weibull_shape_factors_fast if fast_shapes else weibull_shape_factors)(k_z)
        token_params, offset = head.token_params(mask_toks_sel)
        lam_fg, k_fg, lam_bg, k_bg = token_params
        kl = None
        if return_kl or mode == "sample":
            kl = self.kl_divergence(lam_z, k_z, token_params)

        if mode == "mc":
            return self._monte_carlo(
                lam_z, k_z, shape_factors, token_params, offset, samples, generator, iou_pred,
                object_score_logits, kl,
            )

        mu, var = self._analytic_moments(lam_z, shape_factors, token_params)
        mu = mu + offset[..., None, None]
        prob_logit = probit_logit(mu, var)
        if mode == "sample":
            z = weibull_sample(lam_z, k_z, generator)
            w_fg = weibull_sample(lam_fg, k_fg, generator)
            w_bg = weibull_sample(lam_bg, k_bg, generator)
            logits = torch.einsum("bkc,bchw->bkhw", w_fg - w_bg, z) + offset[..., None, None]
        else:
            logits = prob_logit
        return DecoderOutput(
            logits=logits,
            iou_pred=iou_pred,
            object_score_logits=object_score_logits,
            logit_mean=mu,
            logit_var=var,
            kl=kl,
            # a sampled logit is not the predictive one: the maps come from the probit logit
            _probability=torch.sigmoid(prob_logit) if mode == "sample" else None,
            _uncertainty=binary_entropy_from_logit(prob_logit) if mode == "sample" else None,
        )

    # ------------------------------------------------------------------ Bayesian pieces
    @staticmethod
    def _analytic_moments(lam_z, shape_factors, token_params) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``logit = <z, w_fg - w_bg>`` with all factors independent.

        ``d = w_fg - w_bg``: ``E d = E fg - E bg``, ``Var d = Var fg + Var bg``;
        ``Var(z d) = Var z Var d + Var z (E d)^2 + (E z)^2 Var d``; channels add up. With one
        kappa per pixel, ``E z_c = g1 lam_c`` and ``Var z_c = g1^2 r lam_c^2`` where
        ``g1 = Gamma(1 + 1/kappa)`` and ``r = Gamma(1 + 2/kappa) / g1^2 - 1``, so
        ``mu = g1 <lam, E d>`` and ``var = g1^2 (r <lam^2, Var d + (E d)^2> + <lam^2, Var d>)``;
        ``shape_factors`` is ``(g1, r)`` of the pixel shapes (see :func:`weibull_shape_factors`).
        """
        lam_fg, k_fg, lam_bg, k_bg = token_params
        g1, r = shape_factors
        efg, vfg = weibull_moments(lam_fg, k_fg)
        ebg, vbg = weibull_moments(lam_bg, k_bg)
        ed = efg - ebg
        vd = vfg + vbg
        lam2 = lam_z.square()
        mu = g1 * torch.einsum("bkc,bchw->bkhw", ed, lam_z)
        var = g1.square() * (
            r * torch.einsum("bkc,bchw->bkhw", vd + ed.square(), lam2) + torch.einsum("bkc,bchw->bkhw", vd, lam2)
        )
        return mu, var

    def _analytic_inference(self, upscaled, token_params, offset) -> tuple[torch.Tensor, ...]:
        """The analytic mode without autograd: ``(mu, var, probit logit)``, each (B, K, h, w).

        The same computation as the general path (pixel parameters, shape factors, moments,
        probit), but over :data:`HEAD_CHUNK` prompt sets at a time, writing into the outputs:
        for an automatic-segmentation batch (64 prompt sets x 8 channels x 64x64 for micro) the
        per-pixel tensors of a whole pass are 8 MB each and stream through memory several times,
        a chunk's stay in the CPU's caches. The two variance products share one pass over
        ``lam_z^2``.
        """
        head = self.weibull_head
        b, c, h, w = upscaled.shape
        lam_fg, k_fg, lam_bg, k_bg = token_params
        efg, vfg = weibull_moments(lam_fg, k_fg)
        ebg, vbg = weibull_moments(lam_bg, k_bg)
        ed = efg - ebg  # (B, K, C)
        vd = vfg + vbg
        k = ed.shape[1]
        var_rows = torch.cat([vd + ed.square(), vd], dim=1)  # (B, 2K, C)
        hw = h * w
        mu = upscaled.new_empty(b, k, hw)
        var = upscaled.new_empty(b, k, hw)
        logits = upscaled.new_empty(b, k, hw)
        one = upscaled.new_ones(())
        # per-chunk scratch, reused by every chunk
        n = min(b, HEAD_CHUNK)
        raw_buf, lam_buf, parts_buf = (upscaled.new_empty(n, rows, hw) for rows in (c + 1, c, 2 * k))
        for s in range(0, b, HEAD_CHUNK):
            e = min(b, s + HEAD_CHUNK)
            q = e - s
            lam_z, k_z = head.pixel_params_into(upscaled[s:e], raw_buf[:q], lam_buf[:q])
            g1, r = weibull_shape_factors_fast(k_z)
            # fused multiply-adds (addcmul) wherever two passes over a map would do one's work
            m = torch.bmm(ed[s:e], lam_z, out=mu[s:e])
            torch.addcmul(offset[s:e, :, None], m, g1, out=m)
            parts = torch.bmm(var_rows[s:e], lam_z.square_(), out=parts_buf[:q])  # (q, 2K, hw)
            v = torch.addcmul(parts[:, k:], parts[:, :k], r, out=var[s:e]).mul_(g1.square_())
            torch.add(one, v, alpha=math.pi / 8.0, out=logits[s:e]).rsqrt_().mul_(m)
        return mu.view(b, k, h, w), var.view(b, k, h, w), logits.view(b, k, h, w)

    def kl_divergence(self, lam_z, k_z, token_params) -> torch.Tensor:
        """Mean KL per element of each granularity, summed over the two granularities."""
        lam_fg, k_fg, lam_bg, k_bg = token_params
        a, b = self.prior_alpha, self.prior_beta
        kl_pixels = kl_weibull_gamma(lam_z, k_z, a, b).mean()
        kl_tokens = 0.5 * (kl_weibull_gamma(lam_fg, k_fg, a, b).mean() + kl_weibull_gamma(lam_bg, k_bg, a, b).mean())
        return kl_pixels + kl_tokens

    def _monte_carlo(self, lam_z, k_z, shape_factors, token_params, offset, samples, generator, iou_pred,
                     obj_logits, kl):
        """S samples of the head; total = H(mean p), aleatoric = mean H(p_s), epistemic = MI.

        Pixels whose logit stays far from zero in every plausible sample (``|mu| > 8 + 6 sd`` by
        the analytic moments, so every sample has ``|logit| > 8``, entropy < 0.005 bits) take
        the analytic values and only the remaining band is sampled: on a trained model most of
        an image is confidently background, so this is most of the MC cost saved. Without a
        ``generator`` the noise is fixed (seed 0 / a fixed bank), so a repeated click gives the
        same map. ``self.mc_pixels`` picks how the pixel factor ``z`` enters each sample; see
        :data:`MC_PIXEL_ESTIMATORS`.
        """
        if self.mc_pixels not in MC_PIXEL_ESTIMATORS:
            raise ValueError(f"unknown mc_pixels {self.mc_pixels!r}; expected one of {MC_PIXEL_ESTIMATORS}")
        mu, var = self._analytic_moments(lam_z, shape_factors, token_params)
        mu = mu + offset[..., None, None]
        analytic_logit = probit_logit(mu, var)
        p = torch.sigmoid(analytic_logit)
        total = binary_entropy_from_logit(analytic_logit)
        aleatoric = total.clone()
        b, k, h, w = mu.shape
        band = (mu.abs() <= 8.0 + 6.0 * var.sqrt()).any(1).flatten(1)  # (B, h*w)
        if not self.mc_band:
            band = torch.ones_like(band)
        sampler = self._mc_integrated if self.mc_pixels == "integrate" else self._mc_sampled
        for i in range(b):
            idx = band[i].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            # (nearly) all pixels in the band: sampling all of them is cheaper than a gather
            every = idx.numel() >= self.mc_band_below * h * w
            p_i, h_i = sampler(
                i, None if every else idx, lam_z, k_z, shape_factors, token_params, offset, samples, generator
            )
            if every:
                p[i], aleatoric[i] = p_i.view(k, h, w), h_i.view(k, h, w)
                total[i] = binary_entropy(p[i])
            else:
                p.view(b, k, -1)[i][:, idx] = p_i
                total.view(b, k, -1)[i][:, idx] = binary_entropy(p_i)
                aleatoric.view(b, k, -1)[i][:, idx] = h_i
        epistemic = (total - aleatoric).clamp_min(0.0)
        aleatoric = torch.minimum(aleatoric, total)
        eps = 1e-6
        logits = torch.logit(p.clamp(eps, 1 - eps))
        return DecoderOutput(
            logits=logits,
            iou_pred=iou_pred,
            object_score_logits=obj_logits,
            epistemic=epistemic,
            aleatoric=aleatoric,
            kl=kl,
            _probability=p,
            _uncertainty=total,
        )

    @staticmethod
    def _token_samples(i, token_params, s, generator):
        """``s`` draws of ``d = w_fg - w_bg`` for prompt set ``i``: (s, K, C)."""
        lam_fg, k_fg, lam_bg, k_bg = token_params
        u_fg = _uniform_like(lam_fg[i], generator, s)
        u_bg = _uniform_like(lam_bg[i], generator, s)
        return weibull_transform(lam_fg[i], k_fg[i], u_fg) - weibull_transform(lam_bg[i], k_bg[i], u_bg)

    def _mc_integrated(self, i, idx, lam_z, k_z, shape_factors, token_params, offset, samples, generator):
        """Rao-Blackwellised MC: sample the token factors, integrate the pixel factor.

        Given ``d_s`` the logit ``<z, d_s> + b`` has mean ``<E z, d_s> + b`` and variance
        ``<Var z, d_s^2>`` (channels independent), and ``p_s`` is MacKay's probit of those:
        two (S*K, C) x (C, n) products per prompt set instead of ``S * C * n`` Weibull draws.
        Returns the mean of ``p_s`` and of ``H(p_s)`` over samples, each (K, n).
        """
        g1, r = (f[i].flatten(1) for f in shape_factors)  # (1, h*w)
        lam = lam_z[i].flatten(1)  # (C, h*w)
        if idx is not None:
            g1, r, lam = g1[:, idx], r[:, idx], lam[:, idx]
        ez = lam * g1  # E z
        # Var z with MacKay's pi/8 folded in, so the probit needs one add and one rsqrt per draw
        vz = ez.square().mul_(r * (math.pi / 8.0))
        token_gen = generator or torch.Generator(device=lam.device).manual_seed(0)
        d = self._token_samples(i, token_params, samples, token_gen)  # (S, K, C)
        n_k = d.shape[1] * lam.shape[1]
        p_sum = lam.new_zeros(d.shape[1], lam.shape[1])
        h_sum = torch.zeros_like(p_sum)
        chunk = max(1, min(samples, (1 << 21) // max(n_k, 1)))  # ~8 MB per temporary
        for start in range(0, samples, chunk):
            d_s = d[start : start + chunk]
            mean = torch.matmul(d_s, ez).add_(offset[i][:, None])  # (s, K, n)
            scaled_var = torch.matmul(d_s.square(), vz)  # pi/8 * Var(logit | d_s)
            p_s, h_s = sigmoid_and_entropy(mean.mul_(scaled_var.add_(1.0).rsqrt_()))  # probit_logit
            p_sum += p_s.sum(0)
            h_sum += h_s.sum(0)
        return p_sum / samples, h_sum / samples

    def _mc_sampled(self, i, idx, lam_z, k_z, shape_factors, token_params, offset, samples, generator):
        """Plain MC: every Weibull factor (pixel ``z`` and token ``w``) drawn S times."""
        lam_fg = token_params[0]
        token_gen = generator or torch.Generator(device=lam_fg.device).manual_seed(0)
        log_k = torch.log(k_z[i]).flatten(1)  # (1, h*w)
        lam_i = lam_z[i].flatten(1)  # (C, h*w)
        if idx is None:
            idx = torch.arange(lam_i.shape[1], device=lam_i.device)
        inv_k = torch.exp(-log_k[:, idx])  # (1, n)
        lam_i = lam_i[:, idx]
        k = lam_fg.shape[1]
        p_sum = lam_i.new_zeros(k, idx.numel())
        h_sum = torch.zeros_like(p_sum)
        done = 0
        while done < samples:
            s = min(self.mc_chunk, samples - done)
            log_e = self._log_exponential_noise(s, lam_i.shape[0], idx, generator, done, lam_i)
            z = lam_i * torch.exp(log_e * inv_k)  # (s, C, n)
            d = self._token_samples(i, token_params, s, token_gen)
            logit_s = torch.bmm(d, z) + offset[i][:, None]  # (s, K, n)
            p_sum += torch.sigmoid(logit_s).sum(0)
            h_sum += binary_entropy_from_logit(logit_s).sum(0)
            done += s
        return p_sum / samples, h_sum / samples

    _NOISE_SLOTS = 16384

    def _log_exponential_noise(self, s, c, idx, generator, offset, like):
        """``log E`` with ``E ~ Exp(1)`` for s samples, c channels and the pixels ``idx``.

        With a generator: fresh noise. Without: slices of a fixed bank of ``_NOISE_SLOTS``
        pixel slots (pixel i uses slot i mod slots), built once per (samples, channels, device);
        this skips the uniform draws and two logarithms per element on every click.
        """
        if generator is not None:
            u = torch.rand((s, c, idx.numel()), generator=generator, device=like.device, dtype=like.dtype)
            return log_exponential(u)
        key = (c, like.device, like.dtype)
        bank = self._noise_banks.get(key)
        if bank is None or bank.shape[0] < offset + s:
            g = torch.Generator(device="cpu").manual_seed(0)
            n_samples = max(offset + s, 64)
            u = torch.rand((n_samples, c, self._NOISE_SLOTS), generator=g, dtype=torch.float32)
            bank = log_exponential(u).to(like.device, like.dtype)
            self._noise_banks[key] = bank
        return bank[offset : offset + s][:, :, idx % self._NOISE_SLOTS]


def two_way_shared_image(transformer, image: torch.Tensor, image_pe: torch.Tensor,
                         tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM2's ``TwoWayTransformer.forward`` for B prompt sets, with its attentions re-associated
    so that the work per image token is small.

    ``image`` (1 or B, D, h, w), ``image_pe`` (1, D, h, w); ``tokens`` (B, N, D). Returns the
    same as ``transformer(image.expand(B, ...), image_pe.expand(B, ...), tokens)`` (to float
    rounding): tokens (B, N, D) and image tokens (B, h*w, D).

    * One image shared by all prompt sets: until the first image-to-token attention writes into
      them, the image tokens are identical for every set, so the first layer projects them once:
      the keys and values its token-to-image attention reads, and the queries of its
      image-to-token attention.
    * Per-set image tokens (the later layers, or one image per set): each set has only N ~ 8
      tokens, far fewer than the attention width, so the projections are folded into the
      tokens' side (:func:`_tokens_to_image`, :func:`_image_to_tokens`) and each image token
      meets N-wide rather than D-wide matrices. For micro (D 64, attention width 32, one head)
      that is about 4.5x fewer multiply-adds per image token in the later layers.
    """
    n = tokens.shape[0]
    keys = image.flatten(2).transpose(1, 2)  # (1 or B, hw, D)
    key_pe = image_pe.flatten(2).transpose(1, 2)  # (1, hw, D)
    queries = tokens
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        attn_out = _tokens_to_image(layer.cross_attn_token_to_image, queries + tokens, keys, key_pe)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(_image_to_tokens(layer.cross_attn_image_to_token, keys, key_pe, queries + tokens, queries))
    attn_out = _tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys, key_pe)
    queries = transformer.norm_final_attn(queries + attn_out)
    if keys.shape[0] != n:
        keys = keys.expand(n, -1, -1)
    return queries, keys


def _heads(attn) -> tuple[int, int]:
    return attn.num_heads, attn.internal_dim // attn.num_heads


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """``softmax`` over the last axis. At inference, for the few (N ~ 8) tokens an image token
    attends to, four vectorised in-place passes: torch's kernel handles such short rows one at a
    time (0.58 vs 0.12 ms for 16 prompt sets x 256 pixels x 8 tokens, one AVX2 core)."""
    if torch.is_grad_enabled() or x.shape[-1] > 64:
        return torch.softmax(x, dim=-1)
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def _tokens_to_image(attn, q: torch.Tensor, keys: torch.Tensor, key_pe: torch.Tensor) -> torch.Tensor:
    """SAM2 ``Attention(q, keys + key_pe, keys)`` of (B, N, D) token queries to the image tokens
    ``keys`` (1 or B, hw, D), without a copy of ``keys + key_pe`` per prompt set.

    Image shared by all sets (1, hw, D): its keys and values are projected once and the B*N
    queries attend as one sequence (each query row attends on its own, so this equals B
    separate attentions). Per-set image tokens: no projection of the hw image tokens at all.
    Per head ``q Wq (k Wk + bk)^T = (q Wq Wk) k^T + const``: the key projection is folded into
    the N queries, its bias, constant along each query's row, cancels in the softmax, and
    ``k = keys + key_pe`` enters as two products with the folded queries. And
    ``P (v Wv + bv) = (P v) Wv + bv`` since each row of P sums to 1: the value projection is
    applied to the N attended rows instead of the hw image tokens.
    """
    b, t, _ = q.shape
    heads, dh = _heads(attn)
    if keys.shape[0] != b:  # one image shared by every prompt set
        qp = attn._separate_heads(attn.q_proj(q).reshape(1, b * t, -1), heads)
        kp = attn._separate_heads(attn.k_proj(keys + key_pe), heads)
        vp = attn._separate_heads(attn.v_proj(keys), heads)
        out = F.scaled_dot_product_attention(qp, kp, vp)
        return attn.out_proj(attn._recombine_heads(out).reshape(b, t, -1))
    qp = attn.q_proj(q).view(b, t, heads, dh)
    qk = torch.einsum("bnhe,hed->bhnd", qp, attn.k_proj.weight.view(heads, dh, -1)) * dh**-0.5
    qk = qk.reshape(b, heads * t, -1)
    scores = torch.baddbmm(torch.matmul(qk, key_pe.transpose(1, 2)), qk, keys.transpose(1, 2))
    pv = torch.bmm(_softmax(scores), keys).view(b, heads, t, -1)  # (B, H, N, D)
    out = torch.einsum("bhnd,hed->bnhe", pv, attn.v_proj.weight.view(heads, dh, -1))
    out = out + attn.v_proj.bias.view(heads, dh)
    return attn.out_proj(out.reshape(b, t, heads * dh))


def _image_to_tokens(attn, keys: torch.Tensor, key_pe: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
    """``keys + Attention(keys + key_pe, k, v)``: SAM2's image-to-token attention of the image
    tokens ``keys`` (1 or B, hw, D) to each set's (B, N, D) tokens, with the residual, -> (B, hw, D).

    With N tokens far fewer than the attention width, the output projection is folded into the
    values (``P (V Wv) Wo = P (V Wv Wo)``) and its bias too (each head's weights sum to 1), so
    one batched product adds the attention into the residual. An image shared by all sets has
    its queries projected once. Per-set image tokens are not projected at all: per head
    ``(q Wq + bq)(k Wk + bk)^T = q (Wq kp^T) + bq kp^T``, a (D, N) matrix and an N-vector per
    set, with ``q = keys + key_pe`` entering as two products. Per image token that is D*N
    rather than D*d_attn + d_attn*N multiply-adds for the scores (micro: 4.5x fewer overall).
    """
    b, t, _ = k.shape
    heads, dh = _heads(attn)
    scale = dh**-0.5
    kp = attn.k_proj(k).view(b, t, heads, dh)
    hw = keys.shape[1]
    if keys.shape[0] != b:  # one image shared by every prompt set: project its queries once
        qp = attn._separate_heads(attn.q_proj(keys + key_pe), heads)  # (1, H, hw, dh)
        scores = torch.matmul(qp * scale, kp.permute(0, 2, 3, 1))  # (B, H, hw, N)
        weights = _softmax(scores).transpose(1, 2).reshape(b, hw, heads * t)
    else:
        kp = kp * scale
        a = torch.einsum("bnhe,hed->bdhn", kp, attn.q_proj.weight.view(heads, dh, -1)).reshape(b, -1, heads * t)
        c = torch.einsum("bnhe,he->bhn", kp, attn.q_proj.bias.view(heads, dh)).reshape(b, 1, heads * t)
        scores = torch.baddbmm(torch.baddbmm(c, key_pe.expand(b, -1, -1), a), keys, a)
        weights = _softmax(scores.view(b, hw, heads, t)).view(b, hw, heads * t)
    vp = attn.v_proj(v).view(b, t, heads, dh)
    vo = torch.einsum("bnhe,hed->bhnd", vp, attn.out_proj.weight.t().reshape(heads, dh, -1))
    vo = vo.reshape(b, heads * t, -1) + attn.out_proj.bias / heads
    return torch.baddbmm(keys, weights, vo)


def _upscale_channels_last(upscaling: nn.Sequential, src: torch.Tensor,
                           feat_s0: torch.Tensor, feat_s1: torch.Tensor) -> torch.Tensor:
    """SAM2's high-resolution output upscaling, ``act2(dc2(act1(ln1(dc1(src) + feat_s1))) +
    feat_s0)``, computed channels-last: (B, D, h, w) ``src`` -> (B, C, 4h, 4w).

    A 2x2-stride-2 transposed convolution maps each input pixel to a 2x2 block of output
    pixels. Channels-last, output row ``2i + di`` of image ``b`` is one contiguous run of
    ``2w C_out`` values, ``x[b, i] @ kernel[di]`` with the kernel's ``(dj, C_out)`` as
    columns, so each convolution is two matrix products (``(B h w, C_in) @ (C_in, 2 C_out)``,
    one per ``di``) whose results land, plus the high-resolution features, in their rows of the
    output without a reshuffle; SAM2's ``LayerNorm2d`` is one ``F.layer_norm`` over the last
    axis. Everything stays in one layout, so no pass reads memory across strides: CPU
    convolution kernels handle these thin layers badly (16 -> 8 channels for micro), and with
    NCHW outputs the feature additions and the layer norm mixed layouts. At inference the
    sums are written straight into the output and the GELUs run in place, so the upscaling
    allocates its output and two intermediates only (fresh memory costs page faults under
    glibc's default allocator). For the 16 prompt sets of an automatic-segmentation chunk of
    micro, one core: SAM2's modules 3.2 ms, this 1.9 ms (AMD AVX-512; 5.6 -> 3.1 ms on an AVX2
    machine before the sums were written in place). Results agree to float rounding
    (~1e-6) and gradients flow (tested against SAM2's modules). ``feat_s*`` have batch B or 1
    (one image shared by all prompt sets). The output is a channels-last strided NCHW tensor:
    its ``reshape(B, C, h*w)`` is a view, which the pointwise head and the mask product take
    as is.
    """
    dc1, ln1, act1, dc2, act2 = upscaling
    inference = not torch.is_grad_enabled()
    x = src.permute(0, 2, 3, 1).contiguous()
    for conv, feat in ((dc1, feat_s1), (dc2, feat_s0)):
        if not _is_2x2_upsampler(conv):
            raise ValueError(f"output upscaling expects 2x2 stride-2 transposed convolutions, got {conv}")
        b, h, w, c = x.shape
        o = conv.weight.shape[1]
        # bias folded into the (usually shared, batch-1) features; (Bf, h, di, w, (dj, C_out))
        addend = (feat.permute(0, 2, 3, 1) + conv.bias).reshape(-1, h, 2, w, 2 * o)
        out = x.new_empty(b, h, 2, w, 2 * o) if inference else None
        rows = []
        for di in range(2):
            kernel = conv.weight[:, :, di].transpose(1, 2).reshape(c, 2 * o)  # (C_in, (dj, C_out))
            y = torch.matmul(x.reshape(-1, c), kernel).view(b, h, w, 2 * o)
            if inference:
                torch.add(y, addend[:, :, di], out=out[:, :, di])
            else:
                rows.append(y + addend[:, :, di])
        x = (out if inference else torch.stack(rows, dim=2)).view(b, 2 * h, 2 * w, o)
        if conv is dc1:
            x = _activation(act1, F.layer_norm(x, (o,), ln1.weight, ln1.bias, ln1.eps), inference)
    return _activation(act2, x, inference).permute(0, 3, 1, 2)


def _activation(act: nn.Module, x: torch.Tensor, inference: bool) -> torch.Tensor:
    """``act(x)``, in place on ``x`` when that is a GELU at inference (a fresh map saved)."""
    if inference and type(act) is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


def _is_2x2_upsampler(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.ConvTranspose2d) and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
            and conv.padding == (0, 0) and conv.output_padding == (0, 0) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.bias is not None)


def _pointwise_conv(conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1 ``conv`` of (B, C, h, w) features as one batched matrix product, (B, C_out, h, w).

    Same result (to float rounding) and gradients as ``conv(x)``, but CPU convolution kernels
    handle this shape (C = 8 in, 9 out for micro) badly: for the 64 prompt sets of an automatic
    segmentation batch at 64x64, 24 ms as a convolution against 1.6 ms as ``baddbmm``. ``out``
    (B, C_out, h*w) takes the result without autograd.
    """
    b, c, h, w = x.shape
    weight = conv.weight.view(1, -1, c).expand(b, -1, -1)
    res = torch.baddbmm(conv.bias.view(1, -1, 1), weight, x.reshape(b, c, h * w), out=out)
    return res.view(b, -1, h, w)


def _softplus_inference(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``softplus(x) = log(1 + exp(x))`` from vectorised ``exp``/``log`` only.

    ``exp``'s argument is clamped at 20, where ``log(1 + e^20)`` rounds to 20 in float32, and
    ``max(., x)`` restores ``softplus(x) = x`` above it; below about -17 ``1 + e^x`` rounds
    to 1 and the result to 0 (the true value is < 4e-8). Absolute error below 1e-6 (tested),
    nothing next to the ``1e-4`` floor of lambda. Five passes over the map: on CPU about 3x
    faster than ``F.softplus`` (a scalar ``log1p``) and than the seven passes of
    ``max(x, 0) + log(1 + exp(-|x|))`` this replaced (0.21 / 0.37 / 0.68 ms for 8 x 8 x 64^2
    values, one AVX-512 core).
    """
    y = torch.clamp_max(x, 20.0, out=out).exp_().add_(1.0).log_()
    return torch.maximum(y, x, out=y)


def _uniform_like(t: torch.Tensor, generator: torch.Generator | None, samples: int | None = None):
    shape = t.shape if samples is None else (samples, *t.shape)
    return torch.rand(shape, generator=generator, device=t.device, dtype=t.dtype)

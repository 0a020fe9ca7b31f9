"""The image model: SAM2's Hiera encoder and prompt encoder with the Bayesian mask decoder.

Only the parts of SAM2 an image model needs are built (no memory attention / memory encoder);
their keys in official checkpoints are ignored on load. Inputs may be any multiple of 32 in
each dimension: positional encodings are computed for the actual grid, so models trained on
fixed-scale crops can run at the image's native pixel scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from torch import nn

from .config import ModelConfig
from .mask_decoder import BayesianMaskDecoder, DecoderMode, DecoderOutput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_MULTIPLE = 32  # Hiera's coarsest stride; inputs are padded to a multiple of it
BACKBONE_STRIDE = 16

# labels of prompt points, as in SAM: padding, negative, positive, box corners
LABEL_PAD, LABEL_NEG, LABEL_POS, LABEL_BOX_TL, LABEL_BOX_BR = -1, 0, 1, 2, 3


@dataclass
class ImageEmbedding:
    """Encoder outputs for a batch of images (prompt-independent, so cached by the predictor).

    ``image_embed`` (B, D, H/16, W/16); ``high_res`` [(B, D/8, H/4, W/4), (B, D/4, H/8, W/8)];
    ``input_size`` the (H, W) of the model input in pixels.
    """

    image_embed: torch.Tensor
    high_res: list[torch.Tensor]
    input_size: tuple[int, int]

    def to(self, device) -> "ImageEmbedding":
        return ImageEmbedding(
            self.image_embed.to(device), [f.to(device) for f in self.high_res], self.input_size
        )

    def prompt_sets_per_pass(self, token_bytes: int) -> int:
        """How many prompt sets one decoder pass over this embedding should take: all of them
        on a GPU; on a CPU about ``token_bytes`` of image tokens (each prompt set carries its
        own copy through the two-way transformer and the upscaling, and a pass that outgrows
        the caches slows down), but at least two, because prompt sets in one pass share the
        image's side of the first transformer layer."""
        image = self.image_embed
        if image.device.type != "cpu":
            return 1 << 30
        return max(2, token_bytes // (image[0].numel() * image.element_size()))

    def select(self, index) -> "ImageEmbedding":
        return ImageEmbedding(self.image_embed[index], [f[index] for f in self.high_res], self.input_size)

    @staticmethod
    def cat(embeddings: list["ImageEmbedding"]) -> "ImageEmbedding":
        """Embeddings of images of one input size -> one embedding of all of them, in order."""
        if len(embeddings) == 1:
            return embeddings[0]
        if len({e.input_size for e in embeddings}) != 1:
            raise ValueError("embeddings of different input sizes cannot be batched")
        return ImageEmbedding(
            torch.cat([e.image_embed for e in embeddings]),
            [torch.cat(fs) for fs in zip(*(e.high_res for e in embeddings))],
            embeddings[0].input_size,
        )


class _Hiera(Hiera):
    """SAM2's Hiera trunk (same parameters and keys) whose positional embedding is kept per
    token grid at inference: it is a bicubic resize of a learned table, ~1.5 ms of every 256²
    encoding on a 2-core CPU, and the same for every window. Recomputed whenever autograd is on
    (training) and whenever the tables change (the key holds their storage and version)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def _get_pos_embed(self, hw):
        if torch.is_grad_enabled():
            return super()._get_pos_embed(hw)
        tables = (self.pos_embed, self.pos_embed_window)
        key = (tuple(hw), *((t.data_ptr(), t._version, t.dtype, t.device) for t in tables))
        hit = self._pos_cache.get(key)
        if hit is None:
            if len(self._pos_cache) >= 8:
                self._pos_cache.clear()
            hit = self._pos_cache[key] = super()._get_pos_embed(hw)
        return hit


class RuacSam(nn.Module):
    """SAM2 image model with a RUAC Bayesian decoder.

    State-dict keys follow SAM2 (``image_encoder.*``, ``sam_prompt_encoder.*``,
    ``sam_mask_decoder.*``, ``no_mem_embed``), so official checkpoints load into it.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        trunk = _Hiera(
            embed_dim=config.embed_dim,
            num_heads=config.num_heads,
            stages=tuple(config.stages),
            global_att_blocks=tuple(config.global_att_blocks),
            window_pos_embed_bkg_spatial_size=tuple(config.window_pos_embed_bkg_spatial_size),
            window_spec=tuple(config.window_spec),
        )
        neck = FpnNeck(
            position_encoding=PositionEmbeddingSine(num_pos_feats=d, normalize=True, temperature=10000),
            d_model=d,
            backbone_channel_list=config.backbone_channel_list,
            fpn_top_down_levels=list(config.fpn_top_down_levels),
            fpn_interp_model="nearest",
        )
        self.image_encoder = ImageEncoder(trunk=trunk, neck=neck, scalp=1)
        grid = config.image_size // BACKBONE_STRIDE
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=d,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        )
        self.sam_mask_decoder = BayesianMaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=d,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_heads,
            ),
            transformer_dim=d,
            iou_head_depth=3,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
            use_high_res_features=True,
            iou_prediction_use_sigmoid=config.iou_prediction_use_sigmoid,
            pred_obj_scores=config.pred_obj_scores,
            pred_obj_scores_mlp=config.pred_obj_scores_mlp,
            kappa_range=tuple(config.kappa_range),
            prior_alpha=config.prior_alpha,
            prior_beta=config.prior_beta,
        )
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.no_mem_embed, std=0.02)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.no_mem_embed.device

    @property
    def default_mode(self) -> DecoderMode:
        return "deterministic" if self.config.head == "deterministic" else "analytic"

    # ------------------------------------------------------------------ encoder
    def encode(self, images: torch.Tensor) -> ImageEmbedding:
        """(B, 3, H, W) float images in [0, 1], H and W multiples of 32 -> ImageEmbedding."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
            raise ValueError(f"model input {h}x{w} is not a multiple of {INPUT_MULTIPLE}")
        x = (images - self.pixel_mean) / self.pixel_std
        out = self.image_encoder(x)
        fpn = out["backbone_fpn"]
        dec = self.sam_mask_decoder
        feat_s0 = dec.conv_s0(fpn[0])
        feat_s1 = dec.conv_s1(fpn[1])
        # SAM2 image mode: the "no memory" embedding is added to the lowest-resolution features
        embed = fpn[-1] + self.no_mem_embed.view(1, -1, 1, 1)
        return ImageEmbedding(embed, [feat_s0, feat_s1], (int(h), int(w)))

    # ------------------------------------------------------------------ prompts
    def dense_pe(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, D, gh, gw) positional encoding of the image-embedding grid."""
        return self.sam_prompt_encoder.pe_layer(grid).unsqueeze(0)

    def embed_prompts(
        self, coords: torch.Tensor, labels: torch.Tensor, input_size: tuple[int, int]
    ) -> torch.Tensor:
        """Sparse prompt embeddings (B, N + 1, D).

        ``coords`` (B, N, 2) in model-input pixels, (x, y) order; ``labels`` (B, N) with
        -1 padding, 0 negative, 1 positive, 2/3 box top-left/bottom-right. A padding point is
        appended, as SAM2's image predictor does.
        """
        pe = self.sam_prompt_encoder
        b = coords.shape[0]
        coords = torch.cat([coords.float() + 0.5, coords.new_zeros(b, 1, 2).float()], dim=1)
        labels = torch.cat([labels, labels.new_full((b, 1), LABEL_PAD)], dim=1)
        emb = pe.pe_layer.forward_with_coords(coords, input_size)
        lab = labels.unsqueeze(-1)
        emb = torch.where(lab == LABEL_PAD, pe.not_a_point_embed.weight.expand_as(emb), emb)
        for value in (LABEL_NEG, LABEL_POS, LABEL_BOX_TL, LABEL_BOX_BR):
            emb = torch.where(lab == value, emb + pe.point_embeddings[value].weight, emb)
        return emb

    # ------------------------------------------------------------------ decoder
    def decode(
        self,
        embedding: ImageEmbedding,
        coords: torch.Tensor,
        labels: torch.Tensor,
        image_index: torch.Tensor | None = None,
        multimask_output: bool = False,
        mode: DecoderMode | None = None,
        samples: int = 20,
        return_kl: bool = False,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput:
        """Decode B prompt sets; ``image_index`` (B,) says which embedded image each uses
        (default: all use image 0 when there is one image, else prompt set i uses image i)."""
        mode = mode or self.default_mode
        if self.config.head == "deterministic" and mode != "deterministic":
            # a deterministic model has no Bayesian head to run: its uncertainty is the
            # entropy of its own sigmoid (the usual softmax-entropy baseline)
            mode = "deterministic"
        b = coords.shape[0]
        n_img = embedding.image_embed.shape[0]
        if image_index is None:
            if n_img == 1:
                image_index = torch.zeros(b, dtype=torch.long, device=coords.device)
            elif n_img != b:
                raise ValueError(f"{b} prompt sets for {n_img} images: pass image_index")
        sparse = self.embed_prompts(coords, labels, embedding.input_size)
        grid = tuple(embedding.image_embed.shape[-2:])
        # no mask prompt: the same dense embedding for every prompt set and pixel (broadcast, so
        # prompt sets on one image still share it and the decoder can share the image's work)
        dense = self.sam_prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1)
        return self.sam_mask_decoder(
            image_embeddings=embedding.image_embed,
            image_pe=self.dense_pe(grid),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_res_features=embedding.high_res,
            image_index=image_index,
            mode=mode,
            samples=samples,
            return_kl=return_kl,
            generator=generator,
        )


def tie_query_key(attentions, scale: float = 1.0) -> None:
    """Give each attention's query and key projections the same scaled random weight (no bias),
    so a query attends most to the keys whose inputs (positional encodings) match its own."""
    with torch.no_grad():
        for attn in attentions:
            fan_in = attn.q_proj.weight.shape[1]
            weight = torch.randn_like(attn.q_proj.weight) * (scale / math.sqrt(fan_in))
            attn.q_proj.weight.copy_(weight)
            attn.k_proj.weight.copy_(weight)
            attn.q_proj.bias.zero_()
            attn.k_proj.bias.zero_()


def align_prompt_attention(model: RuacSam, scale: float = 1.0) -> None:
    """Initialise token->image cross-attention so prompt and image positions match at step 0.

    Query and key projections get the same scaled random projection; then a point's positional
    encoding attends most to the image positions it encodes. Trained from scratch without it,
    small decoders learned to ignore the prompt (DESIGN.md).
    """
    transformer = model.sam_mask_decoder.transformer
    attns = [layer.cross_attn_token_to_image for layer in transformer.layers]
    attns.append(transformer.final_attn_token_to_image)
    tie_query_key(attns, scale)

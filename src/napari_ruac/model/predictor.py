"""Interactive prediction: an image, prompts in napari's (row, col) order -> Prediction.

The predictor caches image embeddings keyed by the plane's content, so returning to a plane
(or re-setting the same array) costs a hash, not an encoder pass.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io.normalize import to_rgb_float, validate_plane
from .mask_decoder import DecoderOutput
from .frame import Frame, check_zoom, frame_for, to_model_input
from .sam import LABEL_BOX_BR, LABEL_BOX_TL, ImageEmbedding, RuacSam


class PromptError(ValueError):
    """Prompts that cannot be used (outside the image, malformed, missing)."""


# image tokens (bytes) one CPU decoder pass should carry; see Predictor.decoder_chunk
CPU_DECODER_BYTES = 4 * 2**20


@dataclass
class Prediction:
    """One object's result, at the input image's size (H, W).

    ``mask`` bool; ``probability`` and ``uncertainty`` float32 (uncertainty = binary entropy of
    the probability in bits, 0..1); ``epistemic``/``aleatoric`` only in MC mode;
    ``iou_score`` the decoder's predicted IoU; ``object_score`` the probability that an object
    is present at the prompt. With multimask output, ``alternatives`` holds the other masks.
    """

    mask: np.ndarray
    probability: np.ndarray
    uncertainty: np.ndarray
    iou_score: float
    object_score: float = 1.0
    epistemic: np.ndarray | None = None
    aleatoric: np.ndarray | None = None
    mode: str = "analytic"
    alternatives: list["Prediction"] = field(default_factory=list)

    @property
    def mean_uncertainty(self) -> float:
        """Mean uncertainty inside the mask (0 for an empty mask)."""
        if not self.mask.any():
            return 0.0
        return float(self.uncertainty[self.mask].mean())


@dataclass
class Prompt:
    """One object's prompts: points as (row, col) with labels 1/0, and/or a box
    (row0, col0, row1, col1)."""

    points: Sequence[Sequence[float]] | None = None
    labels: Sequence[int] | None = None
    box: Sequence[float] | None = None


class Predictor:
    """Prompted segmentation with uncertainty for one image at a time.

    >>> predictor = Predictor(load_model("micro"))
    >>> predictor.set_image(plane)
    >>> pred = predictor.predict(points=[(120, 87)], labels=[1])

    ``zoom`` resizes the image before a native-scale model (ours) sees it, so objects appear at
    the size the model learned: 0.5 for nuclei twice as large as the training ones (e.g. a
    confocal stack at high magnification), 2 for tiny ones. Prompts and outputs stay in the
    image's own pixels. Models that resize every image to a fixed input (official SAM2.1)
    ignore it.
    """

    def __init__(self, model: RuacSam, cache_size: int = 16, zoom: float = 1.0) -> None:
        self.model = model.eval()
        self.cache_size = cache_size
        self._zoom = check_zoom(zoom)
        self._cache: OrderedDict[str, tuple[ImageEmbedding, Frame]] = OrderedDict()
        self._embedding: ImageEmbedding | None = None
        self._frame: Frame | None = None
        self.image_key: str | None = None

    # ------------------------------------------------------------------ image
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    def set_image(self, image) -> bool:
        """Embed ``image`` ((H, W) or (H, W, C), any numeric dtype and size), or reuse its
        cached embedding. Returns True when the embedding came from the cache."""
        arr = validate_plane(image)
        key = self._key(arr)
        hit = self._cache.get(key)
        cached = hit is not None
        if hit is None:
            hit = self._encode(arr)
            self._cache[key] = hit
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        self._embedding, self._frame = hit
        self.image_key = key
        return cached

    def is_cached(self, image) -> bool:
        return self._key(validate_plane(image)) in self._cache

    def _key(self, arr: np.ndarray) -> str:
        # an embedding is of the image at one zoom
        return content_key(arr) if self._zoom == 1.0 else f"{content_key(arr)}@{self._zoom:g}"

    @property
    def zoom(self) -> float:
        return self._zoom

    @zoom.setter
    def zoom(self, value: float) -> None:
        """A new zoom needs a new embedding: the current image is forgotten (set it again)."""
        value = check_zoom(value)
        if value != self._zoom:
            self._zoom = value
            self._embedding, self._frame, self.image_key = None, None, None

    def clear_cache(self) -> None:
        self._cache.clear()

    def _encode(self, arr: np.ndarray) -> tuple[ImageEmbedding, Frame]:
        rgb = to_rgb_float(arr)
        frame = self._frame_for(rgb.shape[:2])
        x = to_model_input(torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(self.device), frame)
        with torch.inference_mode():
            emb = self.model.encode(x)
        return emb, frame

    def _frame_for(self, shape: tuple[int, int]) -> Frame:
        return frame_for(self.model.config, shape, zoom=self._zoom)

    # ------------------------------------------------------------------ prompts
    def predict(
        self,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        mode: str | None = None,
        samples: int = 20,
        multimask: bool = False,
        seed: int | None = None,
    ) -> Prediction:
        """Segment one object. Points are (row, col) in image pixels; labels 1 = object,
        0 = background (default all 1); box = (row0, col0, row1, col1). ``seed`` draws fresh
        Monte-Carlo noise; by default MC mode uses a fixed noise bank, so the same click always
        gives the same uncertainty map."""
        return self.predict_batch([Prompt(points, labels, box)], mode, samples, multimask, seed)[0]

    def predict_batch(
        self,
        prompts: Sequence[Prompt | dict],
        mode: str | None = None,
        samples: int = 20,
        multimask: bool = False,
        seed: int | None = None,
    ) -> list[Prediction]:
        """Segment several objects in one decoder pass (one prompt set per object)."""
        if self._embedding is None:
            raise RuntimeError("no image set: call set_image() before predict()")
        if not prompts:
            return []
        prompts = [p if isinstance(p, Prompt) else Prompt(**p) for p in prompts]
        encoded = [self._encode_prompt(i, p) for i, p in enumerate(prompts)]
        mode = mode or self.model.default_mode
        used_mode = "deterministic" if self.model.config.head == "deterministic" else mode
        # SAM's padding tokens take part in attention, so prompt sets are decoded in groups of
        # equal length: batched results then equal one-at-a-time results exactly
        groups: dict[int, list[int]] = {}
        for i, (pts, _) in enumerate(encoded):
            groups.setdefault(len(pts), []).append(i)
        results: list[Prediction | None] = [None] * len(prompts)
        chunk = self.decoder_chunk()
        for group in groups.values():
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(seed)
            for start in range(0, len(group), chunk):
                idx = group[start : start + chunk]
                coords = torch.tensor([encoded[i][0] for i in idx], dtype=torch.float32, device=self.device)
                labels = torch.tensor([encoded[i][1] for i in idx], dtype=torch.long, device=self.device)
                with torch.inference_mode():
                    out = self.model.decode(
                        self._embedding,
                        coords,
                        labels,
                        multimask_output=multimask,
                        mode=mode,
                        samples=samples,
                        generator=generator,
                    )
                for i, pred in zip(idx, self._postprocess(out, used_mode, multimask)):
                    results[i] = pred
        return results

    def decoder_chunk(self) -> int:
        """How many prompt sets one decoder pass takes.

        On a GPU: all of them. On a CPU the decoder is bound by memory traffic: each prompt set
        carries its own copy of the image tokens through the two-way transformer and the
        upscaling, and once a pass holds more than a few MB of them it falls out of the caches.
        Measured at 1024^2 on 2 cores, 8 objects: Hiera-T (4 MB of tokens per prompt set)
        478 ms one by one, 519 in pairs, 650 in fours, 831 all at once; micro (1 MB) 110 / 86 /
        86 / 121 ms. So a pass holds about :data:`CPU_DECODER_BYTES` of image tokens.
        """
        if self.device.type != "cpu" or self._embedding is None:
            return 1 << 30
        per_set = self._embedding.image_embed[0].numel() * self._embedding.image_embed.element_size()
        return max(1, CPU_DECODER_BYTES // per_set)

    def _encode_prompt(self, i: int, p: Prompt) -> tuple[list[tuple[float, float]], list[int]]:
        """Object ``i``'s prompts as model-input (x, y) coordinates and SAM labels."""
        frame = self._frame
        pts, labs = [], []
        if p.points is not None and len(p.points):
            points = np.asarray(p.points, dtype=np.float64)
            if points.ndim != 2 or points.shape[1] != 2:
                raise PromptError(f"object {i}: points must be a list of (row, col), got shape {points.shape}")
            lab = np.ones(len(points), dtype=np.int64) if p.labels is None else np.asarray(p.labels)
            if lab.shape != (len(points),):
                raise PromptError(f"object {i}: {len(points)} points but {lab.size} labels")
            if not np.isin(lab, (0, 1)).all():
                raise PromptError(f"object {i}: point labels must be 1 (object) or 0 (background), got {lab}")
            for (r, c), l in zip(points, lab):
                self._check_inside(i, "point", r, c)
                pts.append((c * frame.scale, r * frame.scale))
                labs.append(int(l))
        if p.box is not None:
            box = np.asarray(p.box, dtype=np.float64).ravel()
            if box.shape != (4,):
                raise PromptError(f"object {i}: box must be (row0, col0, row1, col1), got {p.box}")
            r0, r1 = sorted((box[0], box[2]))
            c0, c1 = sorted((box[1], box[3]))
            self._check_inside(i, "box corner", r0, c0, edge=True)
            self._check_inside(i, "box corner", r1, c1, edge=True)
            pts += [(c0 * frame.scale, r0 * frame.scale), (c1 * frame.scale, r1 * frame.scale)]
            labs += [LABEL_BOX_TL, LABEL_BOX_BR]
        if not pts:
            raise PromptError(f"object {i} has no prompt: give at least one point or a box")
        return pts, labs

    def _check_inside(self, i: int, what: str, r: float, c: float, edge: bool = False) -> None:
        h, w = self._frame.shape
        ok = (0 <= r <= h and 0 <= c <= w) if edge else (0 <= r < h and 0 <= c < w)
        if not (math.isfinite(r) and math.isfinite(c) and ok):
            raise PromptError(
                f"object {i}: {what} at (row={r:g}, col={c:g}) lies outside the image of shape {h}x{w}"
            )

    # ------------------------------------------------------------------ outputs
    def _postprocess(self, out: DecoderOutput, mode: str, multimask: bool) -> list[Prediction]:
        # One prompt set at a time: full-resolution maps of several objects at once (8 x 4 MB
        # per map at 1024 px) fall out of the CPU caches, which made a batched call slower than
        # a loop of single calls; the decoder itself still runs batched.
        iou_np = out.iou_pred.float().cpu().numpy()
        obj_np = torch.sigmoid(out.object_score_logits[:, 0].float()).cpu().numpy()
        results = []
        for b in range(out.logits.shape[0]):
            part = {k: None if t is None else t[b : b + 1] for k, t in (
                ("logits", out.logits), ("uncertainty", out.uncertainty), ("aleatoric", out.aleatoric)
            )}
            maps = self._full_resolution_maps(**part, present=bool(out.object_score_logits[b, 0] > 0))
            candidates = [
                Prediction(
                    mask=maps["mask"][k],
                    probability=maps["probability"][k],
                    uncertainty=maps["uncertainty"][k],
                    iou_score=float(iou_np[b, k]),
                    object_score=float(obj_np[b]),
                    epistemic=None if maps["epistemic"] is None else maps["epistemic"][k],
                    aleatoric=None if maps["aleatoric"] is None else maps["aleatoric"][k],
                    mode=mode,
                )
                for k in range(out.logits.shape[1])
            ]
            candidates.sort(key=lambda p: -p.iou_score)
            best = candidates[0]
            if multimask:
                best.alternatives = candidates[1:]
            results.append(best)
        return results

    def _full_resolution_maps(self, logits, uncertainty, aleatoric, present: bool) -> dict:
        """One prompt set's (1, M, h, w) decoder maps -> (M, H, W) numpy maps at the image size.

        Full-resolution work dominates a click on large images, so only the logits and the
        uncertainty maps are upsampled (entropy is computed at decoder resolution, where it is
        16x cheaper); probability and mask follow from the upsampled logits, so
        mask == (probability > 0.5) exactly.
        """
        logits = self._to_image(logits)[0]
        prob = torch.sigmoid(logits)
        unc = self._to_image(uncertainty)[0].clamp_(0.0, 1.0)
        epistemic = None
        if aleatoric is not None:
            aleatoric = torch.minimum(self._to_image(aleatoric)[0], unc)
            epistemic = unc - aleatoric
        mask = logits > 0
        if not present:
            mask.zero_()

        def to_np(t):
            return None if t is None else t.detach().cpu().numpy()

        return {"mask": to_np(mask), "probability": to_np(prob), "uncertainty": to_np(unc),
                "aleatoric": to_np(aleatoric), "epistemic": to_np(epistemic)}

    def _to_image(self, t: torch.Tensor) -> torch.Tensor:
        """(B, M, h, w) decoder-resolution map -> (B, M, H, W) at the original image size."""
        frame = self._frame
        t = F.interpolate(t.float(), size=frame.input_size, mode="bilinear", align_corners=False)
        t = t[..., : frame.valid[0], : frame.valid[1]]
        if frame.valid != frame.shape:
            t = F.interpolate(t, size=frame.shape, mode="bilinear", align_corners=False)
        return t


def content_key(arr: np.ndarray) -> str:
    """A key for an array's content (dtype, shape and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).view(np.uint8).data)
    return h.hexdigest()


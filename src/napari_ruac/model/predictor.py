"""Interactive prediction: an image, prompts in napari's (row, col) order -> Prediction.

The predictor caches image embeddings keyed by the plane's content, so returning to a plane
(or re-setting the same array) costs a hash, not an encoder pass.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io.normalize import to_rgb_float, validate_plane
from .frame import ZOOM_LIMITS, Frame, frame_for, is_whole, parse_zoom, to_model_input
from .sam import LABEL_BOX_BR, LABEL_BOX_TL, ImageEmbedding, RuacSam
from .views import View, reflect_crop, resolve_scales, resolve_views
from .weibull import binary_entropy, sigmoid_and_entropy


class PromptError(ValueError):
    """Prompts that cannot be used (outside the image, malformed, missing)."""


# image tokens (bytes) one CPU decoder pass should carry; see Predictor.decoder_chunk
CPU_DECODER_BYTES = 4 * 2**20
# model-input pixels one CPU encoder pass takes (views of a window are encoded together)
ENCODER_BATCH_PIXELS = 4 * 512**2
# the size (model pixels) a box prompt's object is shown at: our models learned nuclei of 8-60 px;
# boxes scaled to 28-34 px scored best on DSB2018, the confocal and the StarDist 3D stacks
DEFAULT_BOX_SIZE = 32.0


@dataclass
class Prediction:
    """One object's result, at the input image's size (H, W).

    ``mask`` bool; ``probability`` and ``uncertainty`` float32 (uncertainty = binary entropy of
    the probability in bits, 0..1); ``epistemic``/``aleatoric`` only in MC mode;
    ``iou_score`` the decoder's predicted IoU, as the head computes it: for a model whose IoU
    head was never trained (our ``micro`` models) it is a number near the training mean whatever
    the mask, so show ``automatic.reported_iou(model, iou_score)`` (NaN there) to people;
    ``object_score`` the probability that an object is present at the prompt. With multimask
    output, ``alternatives`` holds the other masks.
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
    # the maps cover this (row0, col0, row1, col1) part of the image (Predictor.predict_regions);
    # None: the whole image
    region: tuple[int, int, int, int] | None = None
    # maps of the whole image that are zero (background, certain) outside this (row0, col0,
    # row1, col1) part of it (what predict decoded in); None: they may be non-zero anywhere.
    # A UI updates only this part of its layers (a whole 8192² plane costs ~100 ms a click).
    extent: tuple[int, int, int, int] | None = None

    def _inside(self) -> tuple[slice, slice] | tuple[()]:
        """Index of the part of the maps outside which they are zero (all of them: ``()``)."""
        if self.extent is None:
            return ()
        r0, c0, r1, c1 = self.extent
        return slice(r0, r1), slice(c0, c1)

    @property
    def area(self) -> int:
        """Pixels in the mask."""
        return int(np.count_nonzero(self.mask[self._inside()]))

    @property
    def mean_uncertainty(self) -> float:
        """Mean uncertainty inside the mask (0 for an empty mask)."""
        part = self._inside()
        mask = self.mask[part]
        if not mask.any():
            return 0.0
        return float(self.uncertainty[part][mask].mean())


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
    ignore it. ``"auto"``: each plane is seen at the zoom that shows its typical object at the
    size the model learned (:mod:`~napari_ruac.model.scale`: the scale of the plane's strongest
    blobs, brought to 28 px in quarter-octave steps within 0.25-4; 1 for a plane without blobs),
    as cellpose rescales to its mean diameter, so that one click takes a whole large cell or a
    whole tiny nucleus (one click, ``micro``: StarDist's 11 px nuclei mIoU 0.30 -> 0.52, the
    confocal stack's 40-55 px ones 0.50 -> 0.65; DSB2018's ~24 px nuclei stay at 1; 8-bit colour
    images, e.g. histology, stay at 1 too, see :func:`~napari_ruac.model.scale.plane_zoom`). The
    estimate costs ~0.16 s for a 512² plane on one core, at most ~0.35 s for larger ones (once
    per plane: it is cached with the plane's content), more than a click, so it is not the
    default here (the napari annotator starts with it, and estimates a plane with
    :meth:`plane_zoom` in a worker when it is shown). :attr:`zoom` is then the current plane's.

    ``window`` is the context a native-scale model sees around a prompt, in model-input pixels.
    Our models learned from crops of ``image_size`` (256 px for ``micro``); a whole 512-2048 px
    plane is outside what they saw (on DSB2018's 512 px image a whole-plane pass made masks
    spill into touching neighbours: median mask 2.1x the nucleus, against 1.2x in a 256 px
    window). So on a plane larger than the window, each prompt set is decoded in a window of
    that size around it (larger for a prompt that needs it, e.g. a big box), percentile
    normalised on its own as the training crops were, and encoded on first use; windows sit on
    a grid, so nearby clicks share an embedding. Outside its window an object's mask is empty,
    its probability and uncertainty 0. ``"auto"`` (default) is the model's ``image_size`` for
    native-scale models and off for models that resize every image (official SAM2.1); ``None``
    encodes the whole plane.

    ``box_size``: a box says how large its object is, so a prompt set with a box is seen at the
    zoom that makes the box's longer side ``box_size`` model pixels (rounded to quarter octaves,
    within 0.25-4x) instead of at ``zoom``; the window around it follows that zoom. ``"auto"``
    (default) is 32 px for native-scale models (measured best at 28-34 px: box mIoU of the
    confocal stack's 40-55 px nuclei 0.33 -> 0.52, StarDist's 12 px nuclei 0.30 -> 0.46, DSB2018's
    26 px ones 0.53 -> 0.52 with ``micro-det``) and off for models that resize every image;
    ``None`` uses ``zoom`` for boxes too.

    ``views``: each prompt set is decoded in this many test-time views of its window (1, 2, 4
    or 8: the token grid moved by half a token and the window mirrored; see
    :mod:`~napari_ruac.model.views`) and the probabilities averaged, so that masks do not follow
    the decoder's 16 px grid. ``"auto"`` (default) is 4 for native-scale models (DSB2018 box
    mIoU of ``micro`` 0.61 -> 0.68, one click 0.45 -> 0.47) and 1 for models that resize every
    image. Each view is one more encoder pass per window and one more decoder pass per click.

    The uncertainty map is the binary entropy of the probability map at every pixel of the
    image: the uncertainty of the decision (``mask``) made there. In MC mode ``aleatoric`` is
    the mean of the samples' entropies and ``epistemic`` the rest, which with several views
    includes their disagreement.

    ``recentre``: a prompt set of one positive click is decoded again from the innermost pixel
    of its mask (the part that holds the click), and the new mask is kept when it still holds
    the click; this repeats up to ``recentre_rounds`` times (default 3), and stops early when
    the centre no longer moves. A small model's mask for a click off an object's centre is the
    part of the object around the click; from the centre it is the whole object, and each round
    moves the click closer to it (DSB2018 one click, stage-1c ``micro``: mIoU 0.524 without,
    0.575 / 0.591 / 0.596 / 0.595 after 1 / 2 / 3 / 4 rounds). A prompt set of several points
    (no box), such as a click and its corrections, gets the centre its first positive click
    alone was re-centred to as one more positive point, so that corrections refine the mask the
    first click showed (as given, one correction left 81 of DSB2018's 125 nuclei worse than the
    click alone, mIoU 0.706 -> 0.639 for ``micro``; with the centre 0.732). ``"auto"`` (default):
    on for native-scale models (ours), off for models that resize every image.

    ``window_step``: windows start on a grid of this fraction of the window (default 1/2), and a
    prompt set takes the grid window whose centre is nearest its own, so each click lies at least
    a quarter of a window from the window's edges and nearby clicks share a window. On a half
    window grid a 512² plane has 9 windows a click can use (81 on a grid of 1/8, the default
    until 2026-12-07), few enough to encode them all ahead of the clicks
    (:meth:`click_windows`, :meth:`embed_window`; the annotator's *Precompute all planes*). The
    coarser grid cost no accuracy where measured (one click, held-out synthetic 512² images
    and DSB2018 resized 2x and 0.5x: -0.004 to +0.021 mIoU; DSB2018 at its own size 0.003-0.02
    better with every model and prompt; see the README).

    ``scales``: each prompt set is also decoded at zooms a quarter octave below and above its
    own (3: x2^-1/4, x1, x2^1/4; 5 adds half an octave each way), in all its views, and the
    probabilities averaged: the mask no longer hinges on how one grid of 16 px tokens happens to
    fall on the object, and where the scales disagree the probability is near 0.5, so the
    uncertainty marks it (DSB2018, one click, ``micro`` / ``micro-bayes``: mIoU 0.706 / 0.698
    -> 0.707 / 0.720, AUROC of uncertainty for error 0.765 / 0.752 -> 0.765 / 0.790; a box,
    ``micro``: 0.844 -> 0.853, ECE 0.029 -> 0.013). Each scale is one more set of encoder
    passes per window and of decoder passes per click (a first click on a new 512² plane 295 ms
    with 3 against 83 with 1 on 2 CPU cores), so 1 (off) is the default; ``"auto"`` is 3 for
    native-scale models and 1 for models that resize every image (there the zoom changes
    nothing).

    ``box_margin``: a box is drawn around its object, so the mask of a prompt set with a box
    ends at the box: pixels more than ``box_margin`` pixels outside it are background, with
    probability and uncertainty 0 (the prompt settles them). ``"auto"`` (default) is 0 (the
    box's own pixels); ``None`` keeps what the model predicts outside the box. The models
    learned from jittered boxes, so they treat a box as approximate and their masks of
    DSB2018's tight boxes spill over them (see the README's results for both numbers).
    """

    def __init__(self, model: RuacSam, cache_size: int = 16, zoom: float = 1.0,
                 window: int | str | None = "auto", box_size: float | str | None = "auto",
                 views: int | str = "auto", window_step: float = 0.5, recentre: bool | str = "auto",
                 box_margin: float | str | None = "auto", recentre_rounds: int = 3,
                 scales: int | str = 1) -> None:
        self.model = model.eval()
        self.box_margin = resolve_box_margin(box_margin)
        if not is_whole(cache_size) or cache_size < 0:
            raise ValueError(f"cache_size must be a whole number of planes (or windows) >= 0, got {cache_size!r}")
        self.cache_size = cache_size
        zoom = parse_zoom(zoom)
        self.auto_zoom = zoom == "auto"  # each plane's own zoom (see zoom)
        self._zoom = 1.0 if self.auto_zoom else zoom
        self._plane_zooms: OrderedDict[str, float] = OrderedDict()  # content -> its "auto" zoom
        self._zoom_lock = threading.Lock()  # plane_zoom may run on another thread
        self.window = resolve_window(model.config, window)
        self.box_size = resolve_box_size(model.config, box_size)
        self.views = resolve_views(model.config, views)
        self._scales = resolve_scales(model.config, scales)
        try:
            step = float(window_step)
        except (TypeError, ValueError):
            step = math.nan
        if not 0 < step <= 0.5:
            raise ValueError(f"window_step must be a fraction of the window in (0, 0.5], got {window_step!r}")
        self.window_step = step
        if recentre == "auto":
            recentre = model.config.input_scaling == "native"
        if not isinstance(recentre, bool):
            raise ValueError(f"recentre must be 'auto', True or False, got {recentre!r}")
        self.recentre = recentre
        if isinstance(recentre_rounds, bool) or not isinstance(recentre_rounds, int) or recentre_rounds < 1:
            raise ValueError(f"recentre_rounds must be a whole number >= 1, got {recentre_rounds!r}")
        self.recentre_rounds = recentre_rounds
        self._cache: OrderedDict[str, tuple[ImageEmbedding, Frame]] = OrderedDict()
        self._plane: np.ndarray | None = None
        self._content: str | None = None
        self.image_key: str | None = None
        self._checked_last: tuple | None = None  # (image, validated array, content key)
        # (plane, settings, click) -> the re-centred centre of that click alone, for its corrections
        self._centres: OrderedDict[tuple, tuple[int, int] | None] = OrderedDict()

    # ------------------------------------------------------------------ image
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        return self._plane is not None

    @property
    def windowed(self) -> bool:
        """Whether the current plane is decoded in windows around (point) prompts."""
        return self._plane is not None and self._needs_windows(self._plane.shape[:2], self._zoom)

    def set_image(self, image) -> bool:
        """Take ``image`` ((H, W) or (H, W, C), any numeric dtype and size) and embed it, or reuse
        its cached embedding. Returns True when no encoder pass was needed: the embedding came
        from the cache, or the plane is decoded in windows (embedded on first use)."""
        arr, content = self._checked(image)
        self._zoom = self._zoom_of(arr, content)
        self._plane, self._content = arr, content
        self.image_key = self._cache_key(self._zoom)
        if self._needs_windows(arr.shape[:2], self._zoom):
            return True
        cached = all(key in self._cache for key in self._plane_keys(self._content))
        whole = self._whole_plane()
        for zoom in self._whole_plane_zooms(arr.shape[:2], self._zoom):
            self._window_embeddings(self._view_windows(whole, zoom), zoom)
        return cached

    def is_cached(self, image) -> bool:
        """Whether ``set_image(image)`` needs no encoder pass. A ``set_image`` of the same array
        object right after it reuses its check and hash (a UI asks this before every click)."""
        arr, content = _keyed(image)
        self._checked_last = (image, arr, content)
        zoom = self._zoom_of(arr, content)
        if self._needs_windows(arr.shape[:2], zoom):
            return True
        return all(key in self._cache for key in self._plane_keys(content, arr.shape[:2], zoom))

    def _checked(self, image) -> tuple[np.ndarray, str]:
        """``image`` validated and its content key, from the ``is_cached`` call just before when
        that was given the same array object (the remembered check is used once)."""
        last, self._checked_last = self._checked_last, None
        if last is not None and last[0] is image:
            return last[1], last[2]
        return _keyed(image)

    def plane_zoom(self, image) -> float:
        """The zoom ``image`` is (or would be) seen at, without embedding it: the predictor's, or
        with ``zoom="auto"`` the plane's own, estimated now and remembered with the plane's
        content. Safe to call from another thread while this predictor predicts, so that a UI
        can estimate a plane when it is shown, before the first click on it."""
        return self._zoom_of(*_keyed(image))

    def knows_zoom(self, image) -> bool:
        """Whether ``image``'s zoom is known without an estimate (fixed zoom, or remembered)."""
        if not self.auto_zoom:
            return True
        _, content = _keyed(image)  # hashing needs no lock
        with self._zoom_lock:
            return content in self._plane_zooms

    def _zoom_of(self, arr: np.ndarray, content: str) -> float:
        """The zoom plane ``arr`` is seen at: the predictor's, or its own with ``zoom="auto"``
        (estimated once per plane content; the estimate runs outside the lock, so a prefetch on
        another thread does not hold up a prediction)."""
        if not self.auto_zoom:
            return self._zoom
        with self._zoom_lock:
            if content in self._plane_zooms:
                self._plane_zooms.move_to_end(content)
                return self._plane_zooms[content]
        from .scale import plane_zoom

        zoom = plane_zoom(self.model.config, arr)
        with self._zoom_lock:
            self._plane_zooms[content] = zoom
            while len(self._plane_zooms) > 64 * self.cache_size:
                self._plane_zooms.popitem(last=False)
        return zoom

    def _plane_keys(self, content: str, shape: tuple[int, int] | None = None, zoom: float | None = None) -> list[str]:
        """Cache keys of a whole plane's embeddings in every view (at ``zoom``, default the
        current plane's)."""
        zoom = self._zoom if zoom is None else zoom
        whole = (0, 0, *(shape or self._plane.shape[:2]))
        return [self._cache_key(z, content, window, view, whole)
                for z in self._whole_plane_zooms(whole[2:], zoom) for window, view in self._view_windows(whole, z)]

    def _whole_plane_zooms(self, shape: tuple[int, int], zoom: float) -> list[float]:
        """The zooms of ``scales`` around ``zoom`` at which a ``shape`` plane is embedded whole
        (at the others it is decoded in windows)."""
        return [z for z in self._scale_zooms(zoom) if not self._needs_windows(shape, z)]

    def _scale_zooms(self, zoom: float) -> list[float]:
        """The distinct zooms the test-time scales see a prompt set at ``zoom`` at (``zoom``
        first; scales clamped at the zoom limits can coincide)."""
        return list(dict.fromkeys(_scaled(zoom, s) for s in self.scales))

    def _cache_key(self, zoom: float, content: str | None = None, window=None, view: View = View(),
                   whole=None) -> str:
        # an embedding is of one plane (or window of it, ``whole`` being the plane's own) at one
        # zoom, in one view
        key = content or self._content
        if zoom != 1.0:
            key += f"@{zoom:g}"
        if window is not None and window != whole:
            key += "[{}:{},{}:{}]".format(window[0], window[2], window[1], window[3])
        return key + view.tag

    def _needs_windows(self, shape: tuple[int, ...], zoom: float) -> bool:
        return self.window is not None and max(shape[0], shape[1]) * zoom > self.window

    @property
    def zoom(self) -> float:
        """The zoom the current plane is seen at (with ``zoom="auto"`` its own estimate; 1.0
        before a plane is set). Set a number or ``"auto"``."""
        return self._zoom

    @zoom.setter
    def zoom(self, value: float | str) -> None:
        """A new zoom needs a new embedding: the current image is forgotten (set it again)."""
        value = parse_zoom(value)
        auto = value == "auto"
        if auto != self.auto_zoom or (not auto and value != self._zoom):
            self.auto_zoom = auto
            self._zoom = 1.0 if auto else value
            self._plane, self._content, self.image_key = None, None, None

    @property
    def scales(self) -> tuple[float, ...]:
        """The zoom factors each prompt set is decoded at (1 first). Set 1, 3, 5 or "auto";
        embeddings already computed at a zoom are reused."""
        return self._scales

    @scales.setter
    def scales(self, value: int | str) -> None:
        self._scales = resolve_scales(self.model.config, value)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _embeddings_for(self, keys: list[str], crops: list, zoom: float) -> list[tuple[ImageEmbedding, Frame]]:
        """The cached embedding under each key, the missing ones encoded from ``crops`` (a
        callable per key giving its model-input image) in as few encoder passes as they allow."""
        missing = [k for k, key in enumerate(keys) if key not in self._cache]
        if missing:
            encoded = self._encode([crops[k]() for k in missing], zoom)
            for k, hit in zip(missing, encoded):
                self._cache[keys[k]] = hit
        for key in keys:  # this request's embeddings are the most recently used
            self._cache.move_to_end(key)
        out = [self._cache[key] for key in keys]
        # cache_size counts planes (or windows) in all their views; what this request uses is
        # taken out before evicting, so a request larger than the cache still gets all of it
        while len(self._cache) > self.cache_size * len(self.views) * len(self.scales):
            self._cache.popitem(last=False)
        return out

    def _encode(self, images: list[np.ndarray], zoom: float) -> list[tuple[ImageEmbedding, Frame]]:
        """Normalised (H, W, 3) images -> their embeddings. Images of one model-input size are
        encoded together, up to :data:`ENCODER_BATCH_PIXELS` a pass (on 2 CPU cores four 256²
        views cost 92 ms together and 125 ms one by one)."""
        frames = [self._frame_for(rgb.shape[:2], zoom) for rgb in images]
        out: list = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, frame in enumerate(frames):
            by_size.setdefault(frame.input_size, []).append(k)
        for (h, w), members in by_size.items():
            per_pass = max(1, ENCODER_BATCH_PIXELS // (h * w)) if self.device.type == "cpu" else len(members)
            for start in range(0, len(members), per_pass):
                idx = members[start : start + per_pass]
                x = torch.cat([
                    to_model_input(torch.from_numpy(images[k]).permute(2, 0, 1).unsqueeze(0).to(self.device), frames[k])
                    for k in idx
                ])
                with torch.inference_mode():
                    emb = self.model.encode(x)
                for j, k in enumerate(idx):
                    out[k] = (emb.select(slice(j, j + 1)), frames[k])
        return out

    def _frame_for(self, shape: tuple[int, int], zoom: float | None = None) -> Frame:
        return frame_for(self.model.config, shape, zoom=self._zoom if zoom is None else zoom)

    def zoom_for(self, points: np.ndarray, labels: Sequence[int]) -> float:
        """The zoom a prompt set is seen at: with a box and ``box_size``, the one that scales the
        box's longer side to ``box_size`` px (on a grid of quarter octaves, so similar boxes
        share embeddings); otherwise the predictor's ``zoom``."""
        if self.box_size is None or LABEL_BOX_TL not in labels:
            return self._zoom
        i = list(labels).index(LABEL_BOX_TL)
        (r0, c0), (r1, c1) = points[i], points[i + 1]
        side = max(r1 - r0, c1 - c0, 1.0)
        octaves = round(4 * math.log2(self.box_size / side)) / 4
        return float(min(max(2.0**octaves, BOX_ZOOM_RANGE[0]), BOX_ZOOM_RANGE[1]))

    def window_of(self, extent: tuple[float, float, float, float], zoom: float | None = None) -> tuple[int, int, int, int]:
        """The window (row0, col0, row1, col1) in image pixels for prompts spanning ``extent``
        (rmin, cmin, rmax, cmax) on the current plane seen at ``zoom`` (default: the
        predictor's); the whole plane when it fits."""
        zoom = self._zoom if zoom is None else zoom
        h, w = self._plane.shape[:2]
        if not self._needs_windows((h, w), zoom):
            return self._whole_plane()
        side, margin, step = self._window_grid(zoom)
        r0, r1 = _window_1d(extent[0], extent[2], h, side, margin, step)
        c0, c1 = _window_1d(extent[1], extent[3], w, side, margin, step)
        return (r0, c0, r1, c1)

    def _window_grid(self, zoom: float) -> tuple[float, float, int]:
        """(side, margin, step) of the windows at ``zoom``, in image pixels: a window's side,
        the context kept on every side of its prompts, and the grid its starts snap to."""
        side = self.window / zoom
        return side, side / 4, max(1, int(side * self.window_step))

    # ------------------------------------------------------------------ encoding ahead of clicks
    def click_windows(self) -> list[tuple[float, tuple[int, int, int, int]]]:
        """``(zoom, window)`` of every window a click on the current plane can be decoded in, at
        each test-time scale: the whole plane where it fits the window, else every window of the
        grid (``window_step``). With all of them encoded (:meth:`embed_window`) a click costs
        only its decoder passes; a box (seen at its own zoom) or points spread over more than
        half a window may still need a window of their own."""
        if self._plane is None:
            raise RuntimeError("no image set: call set_image() first")
        h, w = self._plane.shape[:2]
        out = []
        for zoom in self._scale_zooms(self._zoom):
            if not self._needs_windows((h, w), zoom):
                out.append((zoom, self._whole_plane()))
                continue
            grid = self._window_grid(zoom)
            rows = sorted({_window_1d(r, r, h, *grid) for r in range(h)})
            cols = sorted({_window_1d(c, c, w, *grid) for c in range(w)})
            out.extend((zoom, (r0, c0, r1, c1)) for r0, r1 in rows for c0, c1 in cols)
        return out

    def prompt_windows(self, points: Sequence[Sequence[float]] | None = None, labels: Sequence[int] | None = None,
                       box: Sequence[float] | None = None) -> list[tuple[float, tuple[int, int, int, int]]]:
        """``(zoom, window)`` a :meth:`predict` of these prompts decodes in first, at each
        test-time scale (its re-centring rounds reuse them while they hold the new click), so
        that a caller can encode them one at a time (:meth:`embed_window`) and stop in between."""
        if self._plane is None:
            raise RuntimeError("no image set: call set_image() first")
        pts, labs = self._check_prompt(0, Prompt(points, labels, box))
        zoom = self.zoom_for(pts, labs)
        return [(z, self.window_of(_extent(pts), z)) for z in self._scale_zooms(zoom)]

    def is_encoded(self, points: Sequence[Sequence[float]] | None = None, labels: Sequence[int] | None = None,
                   box: Sequence[float] | None = None) -> bool:
        """Whether every window :meth:`prompt_windows` names is encoded in every view, so that a
        :meth:`predict` of these prompts costs decoder passes only (unless a re-centred click
        leaves its window)."""
        return all(key in self._cache for zoom, window in self.prompt_windows(points, labels, box)
                   for key in self._window_keys(self._view_windows(window, zoom), zoom))

    def embed_window(self, zoom: float, window: tuple[int, int, int, int]) -> None:
        """Encode ``window`` of the current plane seen at ``zoom`` in every test-time view, as
        a prediction there would (nothing is encoded again that is cached). The cache keeps
        ``cache_size`` windows per view and scale: raise it to keep many."""
        if self._plane is None:
            raise RuntimeError("no image set: call set_image() first")
        from .frame import check_zoom

        zoom = check_zoom(zoom)
        h, w = self._plane.shape[:2]
        try:
            r0, c0, r1, c1 = (int(v) for v in window)
            ok = tuple(window) == (r0, c0, r1, c1) and 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"window must be (row0, col0, row1, col1) whole pixels of a non-empty part of the "
                             f"{h}x{w} plane (as click_windows() gives), got {window!r}")
        self._window_embeddings(self._view_windows((r0, c0, r1, c1), zoom), zoom)

    @property
    def cache_bytes(self) -> int:
        """Memory the cached embeddings take (bytes)."""
        return sum(t.numel() * t.element_size()
                   for emb, _ in self._cache.values() for t in (emb.image_embed, *emb.high_res))

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
        """Segment several objects in one decoder pass per window (one prompt set per object)."""
        results: list[Prediction | None] = [None] * len(prompts)
        for i, pred in self.predict_regions(prompts, mode, samples, multimask, seed):
            results[i] = self._pasted(pred)
        return results

    def predict_regions(
        self,
        prompts: Sequence[Prompt | dict],
        mode: str | None = None,
        samples: int = 20,
        multimask: bool = False,
        seed: int | None = None,
    ) -> Iterator[tuple[int, Prediction]]:
        """Like :meth:`predict_batch`, for many objects on a large plane: yields ``(index,
        prediction)`` as the objects of each context window are done, with maps that cover only
        ``prediction.region`` (row0, col0, row1, col1) of the plane (outside it the probability
        is 0). Memory then holds one window's objects at a time, not a plane per object."""
        prompts = _prompt_sets(prompts)
        _check_sampling(samples, seed)
        if not self.recentre:
            for i, pred, _ in self._regions(prompts, mode, samples, multimask, seed):
                yield i, pred
            return
        if self._plane is None:
            raise RuntimeError("no image set: call set_image() before predict()")
        for i, p in enumerate(prompts):  # a bad prompt is reported by its own index
            self._check_prompt(i, p)
        prompts = self._with_centres(prompts, mode, samples, seed)
        for i, pred in self._recentred(prompts, mode, samples, multimask, seed):
            click = _single_click(prompts[i]) if len(prompts) == 1 else None
            if click is not None:  # a user's click: remembered for the corrections that may follow
                self._remember_centre(self._centre_key(click, mode, samples, seed), _recentred_click(prompts[i], pred))
            yield i, pred

    def _recentred(self, prompts: list[Prompt], mode, samples, multimask, seed) -> Iterator[tuple[int, Prediction]]:
        """predict_regions with re-centring: single clicks decoded again from their centres."""
        pending: list[tuple[int, Prediction, tuple[int, int], tuple]] = []
        for i, pred, base in self._regions(prompts, mode, samples, multimask, seed):
            centre = _recentred_click(prompts[i], pred)
            if centre is None:
                yield i, pred
                continue
            pending.append((i, pred, centre, base))
            if len(pending) >= RECENTRE_BATCH:
                yield from self._recentre(pending, prompts, mode, samples, multimask, seed)
                pending = []
        yield from self._recentre(pending, prompts, mode, samples, multimask, seed)

    def _centre_key(self, click: tuple[float, float], mode, samples, seed) -> tuple:
        return (self.image_key, self._zoom, mode or self.model.default_mode, samples, seed, self.scales,
                len(self.views), self.recentre_rounds, self.window_step, self.box_margin, click)

    def _remember_centre(self, key: tuple, centre: tuple[int, int] | None) -> None:
        self._centres[key] = centre
        self._centres.move_to_end(key)
        while len(self._centres) > CENTRES_KEPT:
            self._centres.popitem(last=False)

    def _with_centres(self, prompts: list[Prompt], mode, samples, seed) -> list[Prompt]:
        """Prompt sets of several points (no box) with one more positive point first: where the
        set's first positive click alone was re-centred to (the innermost pixel of its mask).
        Corrections then refine the mask the first click gave, not the off-centre part a small
        model gives for the raw click (DSB2018, ``micro``, one correction click: mIoU 0.639
        without, 0.732 with, against 0.706 for the first click alone; see the README). The
        centre is remembered from the first click's own prediction, or found now."""
        firsts = {i: _first_positive(p) for i, p in enumerate(prompts)}
        keys = {i: self._centre_key(c, mode, samples, seed) for i, c in firsts.items() if c is not None}
        if not keys:
            return prompts
        missing = sorted({k[-1] for k in keys.values() if k not in self._centres})
        if missing:
            singles = [Prompt(points=[c]) for c in missing]
            for j, pred in self._recentred(singles, mode, samples, False, seed):
                self._remember_centre(self._centre_key(missing[j], mode, samples, seed),
                                      _recentred_click(singles[j], pred))
        out = list(prompts)
        for i, key in keys.items():
            centre = self._centres.get(key)
            if centre is None:
                continue
            p = prompts[i]
            out[i] = Prompt(points=[centre, *[tuple(q) for q in p.points]], labels=[1, *_point_labels(p)])
        return out

    def _recentre(self, pending, prompts, mode, samples, multimask, seed) -> Iterator[tuple[int, Prediction]]:
        """Decode ``pending`` (index, prediction, centre, window) again from their centres, in the
        window of the first pass (already encoded), for up to ``recentre_rounds`` rounds: a new
        mask that still holds the user's click replaces the last one and gives the next centre;
        a prompt set leaves the rounds with its last kept mask when the new mask loses the click
        or the centre stops moving."""
        for round_ in range(self.recentre_rounds):
            if not pending:
                return
            again = [Prompt(points=[centre]) for _, _, centre, _ in pending]
            bases = [base for _, _, _, base in pending]
            new = {k: pred for k, pred, _ in self._regions(again, mode, samples, multimask, seed, bases)}
            still = []
            for k, (i, last, centre, base) in enumerate(pending):
                click = prompts[i].points[0]
                if not _mask_holds(new[k], click):
                    yield i, last
                    continue
                nxt = None if round_ + 1 == self.recentre_rounds else _recentred_click(prompts[i], new[k])
                if nxt is None or nxt == centre:
                    yield i, new[k]
                    continue
                still.append((i, new[k], nxt, base))
            pending = still

    def _regions(self, prompts: list[Prompt], mode, samples, multimask, seed,
                 bases: list | None = None) -> Iterator[tuple[int, Prediction, tuple]]:
        """(index, prediction, (zoom, window, {scale: window})) per prompt set: the windows it was
        decoded in; ``bases``: such a triple per prompt set to decode it in again, in the same
        windows where they hold its prompts (re-centring)."""
        if self._plane is None:
            raise RuntimeError("no image set: call set_image() before predict()")
        checked = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
        mode = mode or self.model.default_mode
        used_mode = "deterministic" if self.model.config.head == "deterministic" else mode
        by_base: dict[tuple[float, tuple[int, int, int, int]], list[int]] = {}
        extents = []
        for i, (pts, labs) in enumerate(checked):
            zoom = self.zoom_for(pts, labs)
            extents.append(_extent(pts))
            key = (zoom, self.window_of(extents[i], zoom))
            if bases is not None and bases[i][0] == zoom and _holds(bases[i][1], extents[i]):
                key = bases[i][:2]
            by_base.setdefault(key, []).append(i)
        for (zoom, base), members in by_base.items():
            parts: dict[int, list[_ViewResult]] = {i: [] for i in members}
            used: dict[int, dict[float, tuple]] = {i: {} for i in members}
            for scale in self.scales:
                if scale == 1.0:
                    windows = {base: members}
                else:  # each prompt set in the window of its prompts at this scale's zoom
                    windows = {}
                    for i in members:
                        window = self.window_of(extents[i], _scaled(zoom, scale))
                        before = None if bases is None or bases[i][0] != zoom else bases[i][2].get(scale)
                        if before is not None and _holds(before, extents[i]):
                            window = before
                        windows.setdefault(window, []).append(i)
                for window, holders in windows.items():
                    for i in holders:
                        used[i][scale] = window
                    self._decode_views(_scaled(zoom, scale), window, holders, checked, extents, parts,
                                       mode, samples, multimask, seed)
            with torch.inference_mode():
                for i in members:
                    pred = self._combine(parts.pop(i), used_mode, multimask)
                    yield i, self._bounded_by_box(pred, *checked[i]), (zoom, base, used[i])

    def _decode_views(self, zoom: float, base: tuple[int, int, int, int], members: list[int], checked, extents,
                      parts: dict, mode, samples, multimask, seed) -> None:
        """Decode prompt sets ``members`` in window ``base`` seen at ``zoom``, in every view that
        holds their prompts, appending each view's result to ``parts[i]``."""
        by_view = []
        for view in self.views:
            window = self._view_window(base, zoom, view)
            # a moved window can lose the prompts at its bottom/right edge: that view is skipped
            holders = [i for i in members if view.identity or _holds(window, extents[i])]
            if holders:
                by_view.append((window, view, holders))
        # a prompt set's only result (one view holds it, one scale) is final: its entropy
        # comes from the logit, accurate where the probability rounds to 0 or 1
        only = {i: len(self.scales) == 1 and sum(i in holders for _, _, holders in by_view) == 1 for i in members}
        embeddings = self._window_embeddings([(window, view) for window, view, _ in by_view], zoom)
        # (view, prompt set) pairs, decoded together: one pass over all views of a window
        # costs 7 ms where four passes of one cost 18 (micro, 2 CPU cores)
        encoded = {}
        for v, (window, view, holders) in enumerate(by_view):
            shape = (window[2] - window[0], window[3] - window[1])
            frame = embeddings[v][1]
            for i in holders:
                local = checked[i][0] - np.array(window[:2], dtype=np.float64)
                encoded[v, i] = (model_coords(view.prompts(local, checked[i][1], shape), (0, 0), frame), checked[i][1])
        # SAM's padding tokens take part in attention, so prompt sets are decoded in
        # groups of equal length: batched results then equal one-at-a-time results exactly
        groups: dict[int, list[tuple[int, int]]] = {}
        for pair, (coords, _) in encoded.items():
            groups.setdefault(len(coords), []).append(pair)
        embedding = ImageEmbedding.cat([e for e, _ in embeddings])
        chunk = self.decoder_chunk(embeddings[0][0])
        for group in groups.values():
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(seed)
            for start in range(0, len(group), chunk):
                idx = group[start : start + chunk]
                coords = torch.tensor([encoded[p][0] for p in idx], dtype=torch.float32, device=self.device)
                labels = torch.tensor([encoded[p][1] for p in idx], dtype=torch.long, device=self.device)
                image_index = torch.tensor([v for v, _ in idx], dtype=torch.long, device=self.device)
                with torch.inference_mode():
                    out = self.model.decode(
                        embedding, coords, labels, image_index=image_index, multimask_output=multimask,
                        mode=mode, samples=samples, generator=generator,
                    )
                    for b, (v, i) in enumerate(idx):
                        window, view, _ = by_view[v]
                        parts[i].append(self._view_result(out, b, embeddings[v][1], window, view, only[i]))

    def _whole_plane(self) -> tuple[int, int, int, int]:
        return (0, 0, *self._plane.shape[:2])

    def _view_window(self, window: tuple[int, int, int, int], zoom: float, view: View) -> tuple[int, int, int, int]:
        """The window ``view`` encodes for prompts whose window is ``window``: moved up and left
        by the view's grid shift (model pixels, so ``shift / scale`` image pixels), beyond the
        plane's top/left edge if need be (:func:`reflect_crop`). It keeps its bottom/right edge
        when the model input keeps its size that way (a plane smaller than the input), else its
        size."""
        if view.shift == 0:
            return window
        r0, c0, r1, c1 = window
        frame = self._frame_for((r1 - r0, c1 - c0), zoom)
        s = max(1, round(view.shift / frame.scale))
        if self._frame_for((r1 - r0 + s, c1 - c0 + s), zoom).input_size == frame.input_size:
            return (r0 - s, c0 - s, r1, c1)
        return (r0 - s, c0 - s, r1 - s, c1 - s)

    def _view_windows(self, window: tuple[int, int, int, int],
                      zoom: float) -> list[tuple[tuple[int, int, int, int], View]]:
        """(window, view) for every test-time view of prompts whose window is ``window``."""
        return [(self._view_window(window, zoom, view), view) for view in self.views]

    def _window_keys(self, windows: list[tuple[tuple[int, int, int, int], View]], zoom: float) -> list[str]:
        """Cache keys of (window, view) pairs of the current plane seen at ``zoom``."""
        whole = self._whole_plane()
        return [self._cache_key(zoom, window=window, view=view, whole=whole) for window, view in windows]

    def _window_embeddings(self, windows: list[tuple[tuple[int, int, int, int], View]],
                           zoom: float) -> list[tuple[ImageEmbedding, Frame]]:
        """The embedding of each (window, view): a window is normalised once for all its views
        (mirroring does not change its percentiles), and missing views are encoded together."""
        keys = self._window_keys(windows, zoom)
        normalised: dict[tuple[int, int, int, int], np.ndarray] = {}

        def crop(window, view):
            if window not in normalised:
                normalised[window] = to_rgb_float(reflect_crop(self._plane, window))
            return view.apply(normalised[window])

        return self._embeddings_for(keys, [lambda w=w, v=v: crop(w, v) for w, v in windows], zoom)

    def decoder_chunk(self, embedding: ImageEmbedding | None = None) -> int:
        """How many prompt sets one decoder pass takes.

        On a GPU: all of them. On a CPU the decoder is bound by memory traffic: each prompt set
        carries its own copy of the image tokens through the two-way transformer and the
        upscaling, and once a pass holds more than a few MB of them it falls out of the caches.
        So a pass holds about :data:`CPU_DECODER_BYTES` of image tokens, but at least two prompt
        sets: prompt sets decoded together share the image's side of the first transformer
        layer (:func:`~napari_ruac.model.mask_decoder.two_way_shared_image`), which pays for a
        pair even when one set fills the budget. Measured at 1024^2 on 2 cores, 8 objects,
        passes of 1 / 2 / 4 / 8 prompt sets: Hiera-T (4 MB of tokens per prompt set) 448 (a
        loop of single clicks) / 355 / 391 / 533 ms; micro (1 MB) 107 / 95 / 80 / 94 ms.
        ``embedding`` defaults to the current plane's whole-plane embedding.
        """
        if embedding is None and self._plane is not None and not self.windowed:
            embedding = self._window_embeddings([(self._whole_plane(), View())], self._zoom)[0][0]
        if embedding is None:
            return 1 << 30
        return embedding.prompt_sets_per_pass(CPU_DECODER_BYTES)

    # ------------------------------------------------------------------ outputs
    def _view_result(self, out, b: int, frame: Frame, window: tuple[int, int, int, int], view: View,
                     only: bool) -> "_ViewResult":
        """Prompt set ``b`` of a decoder pass in one view -> its maps at image resolution, in the
        plane's orientation, on the part of its window inside the plane. ``only``: the prompt
        set's only view (its entropy map is final)."""
        logits = _to_image(out.logits[b : b + 1], frame)[0]
        if only:  # the probability and its entropy from the logit, in one pass, as one view
            prob, entropy = sigmoid_and_entropy(logits)
        else:
            prob, entropy = torch.sigmoid(logits), None
        maps = [prob, entropy, None if out.aleatoric is None else _to_image(out.aleatoric[b : b + 1], frame)[0]]
        r0, c0, r1, c1 = window
        dr, dc = max(-r0, 0), max(-c0, 0)  # rows/columns mirrored in from beyond the plane
        maps = [None if m is None else view.undo(m)[:, dr:, dc:] for m in maps]
        return _ViewResult(
            (r0 + dr, c0 + dc, r1, c1), *maps,
            out.iou_pred[b].float().cpu(), float(torch.sigmoid(out.object_score_logits[b, 0].float())),
        )

    def _combine(self, parts: list["_ViewResult"], mode: str, multimask: bool) -> Prediction:
        """One prompt set's views -> its Prediction: the mean probability over the views that
        see each pixel, the entropy of it, the mask where it exceeds 0.5 (empty when the views'
        mean object score says no object)."""
        unc = None
        if len(parts) == 1:
            rect, prob, unc, aleatoric = parts[0].rect, parts[0].probability, parts[0].entropy, parts[0].aleatoric
        else:
            rect = (min(p.rect[0] for p in parts), min(p.rect[1] for p in parts),
                    max(p.rect[2] for p in parts), max(p.rect[3] for p in parts))
            m = parts[0].probability.shape[0]
            size = (rect[2] - rect[0], rect[3] - rect[1])
            prob = torch.zeros((m, *size))
            count = torch.zeros(size)
            aleatoric = None if parts[0].aleatoric is None else torch.zeros((m, *size))
            for p in parts:
                sl = (slice(p.rect[0] - rect[0], p.rect[2] - rect[0]), slice(p.rect[1] - rect[1], p.rect[3] - rect[1]))
                prob[(slice(None), *sl)] += p.probability
                count[sl] += 1
                if aleatoric is not None:
                    aleatoric[(slice(None), *sl)] += p.aleatoric
            count.clamp_(min=1)
            prob /= count
            if aleatoric is not None:
                aleatoric /= count
        if unc is None:
            unc = binary_entropy(prob)
        unc = unc.clamp_(0.0, 1.0)
        epistemic = None
        if aleatoric is not None:
            aleatoric = torch.minimum(aleatoric, unc)
            epistemic = unc - aleatoric
        mask = prob > 0.5
        object_score = float(np.mean([p.object_score for p in parts]))
        if object_score <= 0.5:
            mask.zero_()
        iou = torch.stack([p.iou for p in parts]).mean(0).numpy()
        maps = {"mask": mask, "probability": prob, "uncertainty": unc, "aleatoric": aleatoric, "epistemic": epistemic}
        maps = {k: None if v is None else v.numpy() for k, v in maps.items()}
        candidates = [
            Prediction(
                mask=maps["mask"][k],
                probability=maps["probability"][k],
                uncertainty=maps["uncertainty"][k],
                iou_score=float(iou[k]),
                object_score=object_score,
                epistemic=None if maps["epistemic"] is None else maps["epistemic"][k],
                aleatoric=None if maps["aleatoric"] is None else maps["aleatoric"][k],
                mode=mode,
                region=rect,
            )
            for k in range(len(iou))
        ]
        candidates.sort(key=lambda p: -p.iou_score)
        best = candidates[0]
        if multimask:
            best.alternatives = candidates[1:]
        return best

    def _bounded_by_box(self, pred: Prediction, points: np.ndarray, labels: list[int]) -> Prediction:
        """``pred`` (maps of ``pred.region``) with everything more than ``box_margin`` pixels
        outside the prompt's box set to background, alternatives too; unchanged without a box."""
        if self.box_margin is None or LABEL_BOX_TL not in labels:
            return pred
        (r0, c0), (r1, c1) = points[labels.index(LABEL_BOX_TL)], points[labels.index(LABEL_BOX_BR)]
        m = self.box_margin
        # box corners are pixel edges: pixel k lies in [r0, r1) when r0 <= k < r1
        keep = (math.floor(r0 - m), math.floor(c0 - m), math.ceil(r1 + m), math.ceil(c1 + m))
        return _cut_to(pred, keep)

    def _check_prompt(self, i: int, p: Prompt) -> tuple[np.ndarray, list[int]]:
        """Object ``i``'s prompts as (N, 2) (row, col) image coordinates and SAM labels."""
        pts, labs = [], []
        if p.points is not None and len(p.points):
            try:
                points = np.asarray(p.points, dtype=np.float64)
            except (TypeError, ValueError):
                raise PromptError(f"object {i}: points must be a list of (row, col) numbers, got {p.points!r}") from None
            if points.ndim != 2 or points.shape[1] != 2:
                raise PromptError(f"object {i}: points must be a list of (row, col), got shape {points.shape}")
            lab = np.ones(len(points), dtype=np.int64) if p.labels is None else np.asarray(p.labels)
            if lab.ndim != 1:
                raise PromptError(f"object {i}: labels must be a list of one 1 or 0 per point, got shape {lab.shape}")
            if lab.shape != (len(points),):
                raise PromptError(f"object {i}: {len(points)} points but {lab.size} labels")
            if not np.isin(lab, (0, 1)).all():
                raise PromptError(f"object {i}: point labels must be 1 (object) or 0 (background), got {lab}")
            for (r, c), l in zip(points, lab):
                self._check_inside(i, "point", r, c)
                pts.append((r, c))
                labs.append(int(l))
        elif p.labels is not None and np.size(p.labels):
            raise PromptError(f"object {i}: 0 points but {np.size(p.labels)} labels (labels are for points only)")
        if p.box is not None:
            try:
                box = np.asarray(p.box, dtype=np.float64).ravel()
            except (TypeError, ValueError):
                box = None
            if box is None or box.shape != (4,):
                raise PromptError(f"object {i}: box must be (row0, col0, row1, col1), got {p.box}")
            r0, c0, r1, c1 = box
            self._check_inside(i, "box corner", r0, c0, edge=True)
            self._check_inside(i, "box corner", r1, c1, edge=True)
            if r0 > r1 or c0 > c1:
                raise PromptError(f"object {i}: box {tuple(float(v) for v in box)} has its corners swapped: give "
                                  "(row0, col0, row1, col1) with row0 <= row1 and col0 <= col1")
            if r1 - r0 < 1 or c1 - c0 < 1:
                raise PromptError(f"object {i}: box {tuple(float(v) for v in box)} has zero height or width "
                                  "(row0, col0, row1, col1: the corners must differ by at least one pixel)")
            pts += [(r0, c0), (r1, c1)]
            labs += [LABEL_BOX_TL, LABEL_BOX_BR]
        if not pts:
            raise PromptError(f"object {i} has no prompt: give at least one point or a box")
        return np.asarray(pts, dtype=np.float64), labs

    def _check_inside(self, i: int, what: str, r: float, c: float, edge: bool = False) -> None:
        h, w = self._plane.shape[:2]
        ok = (0 <= r <= h and 0 <= c <= w) if edge else (0 <= r < h and 0 <= c < w)
        if not (math.isfinite(r) and math.isfinite(c)):
            raise PromptError(f"object {i}: {what} at (row={r:g}, col={c:g}) is not a finite position: it lies "
                              f"outside the image of shape {h}x{w}")
        if not ok:
            raise PromptError(
                f"object {i}: {what} at (row={r:g}, col={c:g}) lies outside the image of shape {h}x{w}"
            )

    def _pasted(self, pred: Prediction) -> Prediction:
        """``pred`` (and its alternatives) with maps of the whole plane: zero outside its region."""
        h, w = self._plane.shape[:2]
        if pred.region is None or pred.region == (0, 0, h, w):
            return replace(pred, region=None, extent=pred.region,
                           alternatives=[self._pasted(a) for a in pred.alternatives])
        r0, c0, r1, c1 = pred.region
        maps = {}
        for name in ("mask", "probability", "uncertainty", "epistemic", "aleatoric"):
            m = getattr(pred, name)
            if m is not None:
                canvas = np.zeros((h, w), dtype=m.dtype)
                canvas[r0:r1, c0:c1] = m
                m = canvas
            maps[name] = m
        return replace(pred, **maps, region=None, extent=(r0, c0, r1, c1),
                       alternatives=[self._pasted(a) for a in pred.alternatives])


def _cut_to(pred: Prediction, keep: tuple[int, int, int, int]) -> Prediction:
    """``pred`` with its maps zero (background, certain) outside the image rectangle ``keep``
    (row0, col0, row1, col1); its alternatives alike."""
    r0, c0 = pred.region[:2]
    h, w = pred.mask.shape
    rows = slice(min(max(keep[0] - r0, 0), h), min(max(keep[2] - r0, 0), h))
    cols = slice(min(max(keep[1] - c0, 0), w), min(max(keep[3] - c0, 0), w))
    maps = {}
    for name in ("mask", "probability", "uncertainty", "epistemic", "aleatoric"):
        m = getattr(pred, name)
        if m is not None:
            inside = m[rows, cols].copy()
            m = np.zeros_like(m)
            m[rows, cols] = inside
        maps[name] = m
    return replace(pred, **maps, alternatives=[_cut_to(a, keep) for a in pred.alternatives])


# how many recentred clicks are decoded together (they share windows)
RECENTRE_BATCH = 64
# re-centred first clicks a predictor remembers for the corrections that follow them
CENTRES_KEPT = 256


def _prompt_sets(prompts) -> list[Prompt]:
    """``predict_batch``/``predict_regions``' prompts as a list of :class:`Prompt`, or a
    :class:`PromptError` that names the object whose prompt set is not a Prompt or a dict of
    ``points``, ``labels``, ``box``."""
    if isinstance(prompts, (Prompt, dict)):
        raise PromptError("prompts must be a list of prompt sets (one Prompt or dict per object), got one "
                          f"{type(prompts).__name__}: wrap it in a list, or use predict()")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Prompt):
            out.append(p)
            continue
        if not isinstance(p, dict):
            raise PromptError(f"object {i}: a prompt set must be a Prompt or a dict with points, labels and/or "
                              f"box, got {type(p).__name__} {p!r}")
        unknown = sorted(set(p) - {"points", "labels", "box"}, key=str)
        if unknown:
            raise PromptError(f"object {i}: unknown prompt key(s) {', '.join(map(repr, unknown))}; "
                              "expected points, labels, box")
        out.append(Prompt(**p))
    return out


def _check_sampling(samples, seed) -> None:
    """``samples`` (Monte-Carlo draws) and ``seed`` of a prediction: whole numbers (or seed None)."""
    if not is_whole(samples):
        raise ValueError(f"samples must be a whole number of Monte-Carlo draws, got {samples!r}")
    if seed is not None and not is_whole(seed):
        raise ValueError(f"seed must be a whole number or None, got {seed!r}")


def _point_labels(prompt: Prompt) -> list[int]:
    """The labels of a prompt set's points (all 1 when not given)."""
    if prompt.labels is None:
        return [1] * len(prompt.points)
    return [int(v) for v in np.asarray(prompt.labels).ravel()]


def _single_click(prompt: Prompt) -> tuple[float, float] | None:
    """The click of a prompt set that is one positive click (else None)."""
    if prompt.box is not None or prompt.points is None or len(prompt.points) != 1:
        return None
    if _point_labels(prompt)[0] != 1:
        return None
    return tuple(float(v) for v in prompt.points[0])


def _first_positive(prompt: Prompt) -> tuple[float, float] | None:
    """The first positive click of a prompt set of several points and no box (else None)."""
    if prompt.box is not None or prompt.points is None or len(prompt.points) < 2:
        return None
    for point, label in zip(prompt.points, _point_labels(prompt)):
        if label == 1:
            return tuple(float(v) for v in point)
    return None


def _mask_holds(pred: Prediction, point) -> bool:
    """Whether the mask of ``pred`` (maps of ``pred.region``) holds the (row, col) ``point``."""
    r, c = (int(v) for v in np.asarray(point, dtype=np.float64))
    rr, cc = r - pred.region[0], c - pred.region[1]
    return 0 <= rr < pred.mask.shape[0] and 0 <= cc < pred.mask.shape[1] and bool(pred.mask[rr, cc])


def _recentred_click(prompt: Prompt, pred: Prediction) -> tuple[int, int] | None:
    """Where a one-click prompt set is decoded again: the innermost pixel of the part of its
    mask that holds the click (None: not one positive click, or the mask misses the click)."""
    if _single_click(prompt) is None:
        return None
    from scipy import ndimage as ndi

    if not _mask_holds(pred, prompt.points[0]):
        return None
    r0, c0 = pred.region[:2]
    r, c = (int(v) for v in np.asarray(prompt.points[0], dtype=np.float64))
    mask = pred.mask
    rr, cc = r - r0, c - c0
    # distances to the nearest background pixel of the region, computed on the mask's bounding
    # box plus a background border where the region continues (the region's own edges are not
    # background: a mask cut by the region's edge keeps its centre towards that edge, which
    # found small nuclei better: StarDist one click 0.19 vs 0.11 with the edges as background)
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    a0, a1, b0, b1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    pads = ((int(a0 > 0), int(a1 < h)), (int(b0 > 0), int(b1 < w)))
    crop = np.pad(mask[a0:a1, b0:b1], pads)
    parts, _ = ndi.label(crop)
    dist = ndi.distance_transform_edt(parts == parts[rr - a0 + pads[0][0], cc - b0 + pads[1][0]])
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (r0 + a0 + int(i) - pads[0][0], c0 + b0 + int(j) - pads[1][0])


@dataclass
class _ViewResult:
    """One prompt set decoded in one view: (M, h, w) maps on ``rect`` (plane pixels)."""

    rect: tuple[int, int, int, int]
    probability: torch.Tensor
    entropy: torch.Tensor | None  # only when this is the prompt set's only view
    aleatoric: torch.Tensor | None
    iou: torch.Tensor
    object_score: float


def embedding_budget(device: torch.device | str, fraction: float = 0.25) -> int:
    """Bytes of embeddings worth keeping ahead of clicks on ``device``: ``fraction`` of its free
    memory now (host memory for the CPU, the GPU's own for CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(free * fraction)


def _scaled(zoom: float, scale: float) -> float:
    """``zoom`` times ``scale``, kept inside the zooms a frame allows."""
    return zoom if scale == 1.0 else float(min(max(zoom * scale, ZOOM_LIMITS[0]), ZOOM_LIMITS[1]))


def _extent(points: np.ndarray) -> tuple[float, float, float, float]:
    """(rmin, cmin, rmax, cmax) of (N, 2) prompt points."""
    return (points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max())


def _holds(window: tuple[int, int, int, int], extent: tuple[float, float, float, float]) -> bool:
    """Whether prompts spanning ``extent`` (rmin, cmin, rmax, cmax) lie inside ``window``."""
    return window[0] <= extent[0] and window[1] <= extent[1] and extent[2] <= window[2] and extent[3] <= window[3]


def _to_image(t: torch.Tensor, frame: Frame) -> torch.Tensor:
    """(B, M, h, w) decoder-resolution map -> (B, M, H, W) at the frame's image size."""
    t = F.interpolate(t.float(), size=frame.input_size, mode="bilinear", align_corners=False)
    t = t[..., : frame.valid[0], : frame.valid[1]]
    if frame.valid != frame.shape:
        t = F.interpolate(t, size=frame.shape, mode="bilinear", align_corners=False)
    return t


def model_coords(points: np.ndarray, window: Sequence[int], frame: Frame) -> list[tuple[float, float]]:
    """(N, 2) (row, col) image coordinates -> the model's (x, y) in the input frame of a window
    whose top-left corner is ``window[:2]``."""
    r0, c0 = window[:2]
    return [((c - c0) * frame.scale, (r - r0) * frame.scale) for r, c in points]


# box prompts are seen at zooms in this range (box_size / the box's longer side)
BOX_ZOOM_RANGE = (0.25, 4.0)


def resolve_box_size(config, box_size: float | str | None) -> float | None:
    """``Predictor(box_size=...)`` (or ``--box-size`` text) in model pixels, or None (boxes use
    the predictor's zoom)."""
    value = _auto_or_off(box_size)
    if value == "auto":
        return DEFAULT_BOX_SIZE if config.input_scaling == "native" else None
    if value is None:
        return None
    try:
        size = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"box_size must be 'auto', None/0 (use zoom) or a size in pixels, got {box_size!r}") from None
    if not (math.isfinite(size) and 4 <= size <= 512):
        raise ValueError(f"box_size must be between 4 and 512 pixels, got {box_size!r}")
    return size


def resolve_box_margin(box_margin: float | str | None) -> float | None:
    """``Predictor(box_margin=...)`` (or ``--box-margin`` text) in image pixels, or None (masks
    are not cut at the box)."""
    if isinstance(box_margin, str):
        text = box_margin.strip().lower()
        if text == "auto":
            return 0.0
        if text in ("none", "off"):
            return None
        box_margin = text
    if box_margin is None:
        return None
    try:
        margin = float(box_margin)
    except (TypeError, ValueError):
        raise ValueError(f"box_margin must be 'auto', 'off'/None or a number of pixels >= 0, got {box_margin!r}") from None
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"box_margin must be 'auto', 'off'/None or a number of pixels >= 0, got {box_margin!r}")
    return margin


def resolve_window(config, window: int | str | None) -> int | None:
    """``Predictor(window=...)`` (or ``--window`` text) as a side in model-input pixels, or None
    (whole plane)."""
    value = _auto_or_off(window)
    if value == "auto":
        return config.image_size if config.input_scaling == "native" else None
    if value is None:
        return None
    try:
        side = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"window must be 'auto', None/0 (whole plane) or a side in pixels, got {window!r}") from None
    if (not isinstance(value, str) and side != value) or side < 64:
        raise ValueError(f"window must be a whole number of pixels >= 64, got {window!r}")
    return side


def _auto_or_off(value):
    """A size option as given, with command-line text folded in: 'auto' stays 'auto'; None, 0
    and the words '0', 'none', 'off' become None; other text comes back stripped."""
    if isinstance(value, str):
        value = value.strip().lower()
        if value in ("0", "none", "off"):
            return None
        return value
    return None if value is None or value == 0 else value


def _window_1d(lo: float, hi: float, n: int, side: float, margin: float, step: int) -> tuple[int, int]:
    """[start, stop) of one axis of a window of ``side`` pixels (more if the prompts span
    more than ``side - 2 * margin``) holding [lo, hi] with ``margin`` on both sides, inside
    [0, n). Starts snap to a grid of ``step`` pixels so that nearby prompts share a window."""
    size = min(n, int(math.ceil(max(side, hi - lo + 2 * margin))))
    if size >= n:
        return 0, n
    centre = (lo + hi) / 2
    start = min(max(int(round((centre - size / 2) / step)) * step, 0), n - size)
    if lo < start + margin / 2 or hi > start + size - margin / 2:  # snapping must keep context
        start = min(max(int(math.floor(centre - size / 2)), 0), n - size)
    return start, start + size


def _keyed(image) -> tuple[np.ndarray, str]:
    """``image`` validated as a plane, and its content key."""
    arr = validate_plane(image)
    return arr, content_key(arr)


def content_key(arr: np.ndarray) -> str:
    """A key for an array's content (dtype, shape and bytes): XXH3-128, a non-cryptographic hash
    that runs at memory speed. A UI hashes the plane at every click (to find its embeddings):
    blake2b took ~40 ms for a 4096² uint16 plane and ~200 ms at 8192², XXH3 1-6 ms
    (``benchmarks/plane_hash.py``)."""
    import xxhash  # a dependency of ours (and of torch-geometric)

    h = xxhash.xxh3_128()
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).view(np.uint8).data)
    return h.hexdigest()


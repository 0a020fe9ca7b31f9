"""Planes larger than the model's input: overlapping tiles, stitched without seams or duplicates.

Each tile is segmented on its own (the image is normalised once for the whole plane first, so
tiles share one intensity scale). A mask that touches an edge a tile shares with a neighbour is
treated as cut off and dropped; the overlap (``halo``) guarantees that every object smaller
than the overlap lies whole inside some tile, whose copy survives. Copies of an object found
whole in two tiles are merged by box NMS (the copy farther from its tile's edges wins), and the
survivors are resolved into one label image by the same rule as a single pass
(:func:`~.automatic.resolve_labels`), so an object crossing a tile border is one label.

The tiler works with anything that maps an (h, w, 3) float tile to
:class:`~.automatic.MaskCandidate` objects: the model's :class:`~.automatic.AutomaticSegmenter`,
or :class:`ThresholdSegmenter`, a model-free baseline whose result does not depend on where a
tile starts, so stitched and single-pass results can be compared exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from .automatic import AutoResult, AutoStats, Box, MaskCandidate, box_nms, drop_cut_candidates, resolve_labels

CandidateFn = Callable[[np.ndarray], list[MaskCandidate]]


def tile_boxes(shape: tuple[int, int], tile_size: int, overlap: int) -> list[Box]:
    """Tiles (r0, c0, r1, c1) of at most ``tile_size`` covering ``shape``, neighbours overlapping
    by at least ``overlap`` pixels; evenly spread, so the last tile is not a sliver."""
    whole = (int, np.integer)
    if not isinstance(tile_size, whole) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive whole number of pixels, got {tile_size!r}")
    if not isinstance(overlap, whole) or not 0 <= overlap < tile_size:
        raise ValueError(f"tile overlap must be in [0, tile_size), got {overlap} for tiles of {tile_size}")
    if len(shape) != 2 or not all(isinstance(n, whole) and n >= 1 for n in shape):
        raise ValueError(f"shape must be a plane's (H, W), each at least 1 pixel, got {shape!r}")
    starts = [_starts(n, tile_size, overlap) for n in shape]
    return [
        (r, c, min(r + tile_size, shape[0]), min(c + tile_size, shape[1]))
        for r in starts[0]
        for c in starts[1]
    ]


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    count = int(math.ceil((n - overlap) / (tile - overlap)))
    step = (n - tile) / (count - 1)
    return [int(round(i * step)) for i in range(count)]


def tiled_candidates(
    candidates_fn: CandidateFn,
    rgb: np.ndarray,
    tile_size: int,
    overlap: int,
    nms_thresh: float = 0.7,
    edge_tolerance: int = 2,
) -> list[MaskCandidate]:
    """Candidates of a large (H, W, 3) image from overlapping tiles, in plane coordinates,
    de-duplicated across tiles."""
    h, w = rgb.shape[:2]
    found: list[MaskCandidate] = []
    for r0, c0, r1, c1 in tile_boxes((h, w), tile_size, overlap):
        tile_cands = candidates_fn(rgb[r0:r1, c0:c1])
        shifted = []
        for cand in tile_cands:
            cand = cand.shifted(r0, c0)
            # masks cut by a zoom crop inside the tile were dropped already; what is left to
            # test is the tile's own edges
            cand.source = (r0, c0, r1, c1)
            shifted.append(cand)
        found.extend(drop_cut_candidates(shifted, (h, w), edge_tolerance))
    return box_nms(found, nms_thresh, score=_centrality)


def _centrality(c: MaskCandidate) -> float:
    """Distance of a mask from its tile's edges (bigger is better), then its score: of two
    copies of one object, the one seen with more context wins."""
    s, b = c.source, c.box
    margin = min(b[0] - s[0], b[1] - s[1], s[2] - b[2], s[3] - b[3])
    return float(margin) + 1e-3 * (c.layer + c.rank())


def segment_tiled(
    candidates_fn: CandidateFn,
    rgb: np.ndarray,
    tile_size: int,
    overlap: int,
    min_area: int = 0,
    nms_thresh: float = 0.7,
) -> AutoResult:
    """Tile, stitch and resolve: an :class:`AutoResult` for a (H, W, 3) float image."""
    h, w = rgb.shape[:2]
    if max(h, w) <= tile_size:
        cands = candidates_fn(rgb)
    else:
        cands = tiled_candidates(candidates_fn, rgb, tile_size, overlap, nms_thresh)
    labels, unc, objects = resolve_labels(cands, (h, w), min_area)
    stats = AutoStats(n_after_nms=len(cands), n_objects=len(objects))
    return AutoResult(labels, unc, objects, stats)


class ThresholdSegmenter:
    """Model-free candidates: connected components of ``intensity > threshold``.

    Each component's logit is ``sharpness * (intensity - threshold)`` on the component grown by
    ``grow`` pixels (and nowhere on other components), so pixels near the threshold are
    uncertain. The result depends only on the pixels around each object, never on the tile it
    is found in: the reference against which tiling is checked, and a baseline.
    """

    def __init__(self, threshold: float = 0.5, sharpness: float = 20.0, grow: int = 2) -> None:
        self.threshold = threshold
        self.sharpness = sharpness
        self.grow = grow

    def __call__(self, rgb: np.ndarray) -> list[MaskCandidate]:
        """(h, w, 3) float image -> candidates in tile coordinates."""
        intensity = np.asarray(rgb, dtype=np.float32).mean(axis=-1)
        h, w = intensity.shape
        fg = intensity > self.threshold
        comps, n = ndi.label(fg)
        logit = self.sharpness * (intensity - self.threshold)
        out = []
        for idx, sl in enumerate(ndi.find_objects(comps), start=1):
            if sl is None:
                continue
            g = self.grow
            window = (max(0, sl[0].start - g), max(0, sl[1].start - g), min(h, sl[0].stop + g), min(w, sl[1].stop + g))
            r0, c0, r1, c1 = window
            own = comps[r0:r1, c0:c1] == idx
            region = ndi.binary_dilation(own, iterations=g) & ((comps[r0:r1, c0:c1] == 0) | own) if g else own
            win_logit = np.where(region, logit[r0:r1, c0:c1], -np.inf).astype(np.float32)
            win_logit = np.where(own, win_logit, np.minimum(win_logit, -1e-3))  # outside the component: background
            area = int(own.sum())
            box = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
            out.append(
                MaskCandidate(
                    window=window, logits=win_logit, box=box, area=area, iou_score=1.0,
                    stability=1.0, mean_uncertainty=0.0, source=(0, 0, h, w), layer=0,
                )
            )
        return out


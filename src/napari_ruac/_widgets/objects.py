"""Bookkeeping of committed objects (no Qt): per-object statistics for the proofreading table.

An object lives in the ``objects`` Labels volume (leading axes = planes, last two = rows/cols);
its statistics come from that volume and the uncertainty volume of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi


@dataclass
class ObjectRecord:
    """One committed object. ``planes``: the leading-axis indices it occupies (empty tuple in
    2D); ``mean_uncertainty`` over all its pixels; ``iou_score``: the decoder's predicted IoU
    (mean over planes for propagated objects); ``worst_plane``: where it is least certain."""

    id: int
    planes: tuple[tuple[int, ...], ...]
    area: int
    mean_uncertainty: float
    iou_score: float
    centroid: tuple[float, ...]  # data coordinates, all axes
    worst_plane: tuple[int, ...] = ()
    prompts: dict = field(default_factory=dict)  # plane -> (points, labels, box), for re-prompting

    @property
    def plane_text(self) -> str:
        """'-' in 2D, '3' for one plane, '2-9' for a range."""
        if not self.planes or self.planes == ((),):
            return "-"
        flat = [p[-1] if len(p) else 0 for p in self.planes]
        if len(self.planes) == 1:
            return ",".join(str(v) for v in self.planes[0])
        return f"{min(flat)}-{max(flat)}"


def measure_object(
    obj_id: int,
    labels: np.ndarray,
    uncertainty: np.ndarray,
    n_lead: int,
    iou_score: float = float("nan"),
    prompts: dict | None = None,
) -> ObjectRecord | None:
    """Statistics of ``obj_id`` in ``labels`` (int, shape (*lead, H, W)) with ``uncertainty``
    (float, same shape); None when the id is absent."""
    mask = labels == obj_id
    if not mask.any():
        return None
    coords = np.nonzero(mask)
    centroid = tuple(float(c.mean()) for c in coords)
    if n_lead:
        lead = np.stack(coords[:n_lead], axis=1)
        planes = tuple(sorted({tuple(int(v) for v in row) for row in lead}))
        per_plane = {p: float(uncertainty[p][mask[p]].mean()) for p in planes}
        worst = max(per_plane, key=per_plane.get)
    else:
        planes, worst = ((),), ()
    return ObjectRecord(
        id=int(obj_id),
        planes=planes,
        area=int(mask.sum()),
        mean_uncertainty=float(uncertainty[mask].mean()),
        iou_score=float(iou_score),
        centroid=centroid,
        worst_plane=worst,
        prompts=dict(prompts or {}),
    )


def plane_centroid(mask2d: np.ndarray) -> tuple[float, float]:
    """(row, col) centre of a bool (H, W) mask."""
    r, c = ndi.center_of_mass(mask2d)
    return float(r), float(c)


def next_uncertain(records: list[ObjectRecord], current: int | None) -> ObjectRecord | None:
    """The object after ``current`` in order of decreasing mean uncertainty (wrapping round);
    the most uncertain one when ``current`` is None or gone."""
    if not records:
        return None
    ranked = sorted(records, key=lambda r: (-r.mean_uncertainty, r.id))
    ids = [r.id for r in ranked]
    if current not in ids:
        return ranked[0]
    return ranked[(ids.index(current) + 1) % len(ranked)]

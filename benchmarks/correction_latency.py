"""What a correction click costs since corrections build on the first click's re-centred mask.

A prompt set of several points gets the centre its first positive click was re-centred to as
one more point (``Predictor``, ``recentre``). The centre is remembered from the click's own
prediction, so a correction right after its click costs one prompt set's decode; a correction
whose click the predictor has not seen (another predictor, the first click moved) decodes that
click and its re-centring rounds first. Side by side, in one run, on the bundled 2D nuclei
image (512², and tiled 2x2 to 1024²) with the shipped ``micro`` weights, embeddings cached:

* ``click``: the first click alone (with its re-centring rounds);
* ``as given``: the click and one correction decoded as given (``recentre=False``: what a
  correction cost before 2026-12-08, and how it was decoded);
* ``remembered``: the same set right after its click (the annotator's case);
* ``not seen``: the same set on a predictor that has not seen the click.

    python benchmarks/correction_latency.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import tifffile
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from napari_ruac import Predictor, load_model
    from napari_ruac._sample_data import SAMPLE_DIR
    from napari_ruac.evaluate import correction_click, random_point_inside

    model = load_model("micro")
    image = tifffile.imread(SAMPLE_DIR / "nuclei2d.tif")
    labels = tifffile.imread(SAMPLE_DIR / "nuclei2d_labels.tif")
    print(f"correction latency, micro, median of {args.repeats} nuclei, torch threads={args.threads}, ms")
    print(f"{'plane':<8} {'click':>8} {'as given':>10} {'remembered':>11} {'not seen':>10}")
    for tiles in (1, 2):
        plane, truth_ids = np.tile(image, (tiles, tiles)), np.tile(labels, (tiles, tiles))
        predictors = {name: Predictor(model, recentre=name != "as given", cache_size=64)
                      for name in ("as given", "remembered", "not seen")}
        for p in predictors.values():
            p.set_image(plane)
        rng = np.random.default_rng(0)
        ids = [int(i) for i in np.unique(labels) if i][: args.repeats]
        times: dict[str, list[float]] = {k: [] for k in ("click", "as given", "remembered", "not seen")}
        for obj in ids:
            truth = truth_ids == obj
            truth[image.shape[0]:, :] = False  # one copy of the nucleus
            truth[:, image.shape[1]:] = False
            click = random_point_inside(truth, rng)
            for p in predictors.values():  # every window the prompts use encoded beforehand
                p.predict(points=[click])
            t = time.perf_counter()
            first = predictors["remembered"].predict(points=[click])
            times["click"].append(time.perf_counter() - t)
            fix = correction_click(first.mask, truth)
            if fix is None:
                continue
            prompt = dict(points=[click, fix[0]], labels=[1, fix[1]])
            for name, p in predictors.items():
                if name == "not seen":
                    p._centres.clear()  # (what another predictor, or a moved first click, starts from)
                t = time.perf_counter()
                p.predict(**prompt)
                times[name].append(time.perf_counter() - t)
        size = f"{plane.shape[0]}²"
        print(f"{size:<8} " + " ".join(f"{1e3 * statistics.median(v):>{w}.1f}" for v, w in
                                       zip(times.values(), (8, 10, 11, 10))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

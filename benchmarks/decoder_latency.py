"""Per-click latency: SAM2's deterministic decoder vs RUAC analytic vs RUAC MC-20.

Random weights are fine for timing (the work done does not depend on the values). Each
repetition runs the three modes back to back, so machine noise hits them alike; the table
shows medians and the ratios to the deterministic decoder measured in this same run.

The decoder comparison embeds the whole plane (``window=None``) in one view (``views=1``) and
does not re-centre clicks (``recentre=False``), so every click decodes a 1024^2 plane once. The last columns are what a user of a native-scale
model (``micro``) gets by default: clicks are decoded in a context window of the model's input
size around the prompt, in four test-time views (see ``Predictor``), so a click in a new part
of the plane pays one window encoding per view and a click in a window already seen pays the
decoder only (analytic mode).

The second table is issue 6's latency target: ``set_image`` on a new 512^2 plane (the bundled
DSB2018 image) plus one click, with the shipped ``micro`` weights, in a context window (the
default: the click encodes its window) and with the whole plane encoded (``window=None``), in
1, 2, 4 (the default) and 8 views.

    python benchmarks/decoder_latency.py [--size 1024] [--reps 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings

import numpy as np
import torch

from napari_ruac import Predictor, load_model
from napari_ruac.model import build_model, resolve_spec

MODES = [("deterministic", "SAM2 decoder"), ("analytic", "RUAC analytic"), ("mc", "RUAC MC-20")]


def _sample_image(size: int) -> np.ndarray:
    """The bundled DSB2018 nuclei image tiled to size x size (real content for trained weights)."""
    from pathlib import Path

    import tifffile

    path = Path(__file__).resolve().parent.parent / "sample_data" / "nuclei2d.tif"
    tile = tifffile.imread(path)
    reps = (-(-size // tile.shape[0]), -(-size // tile.shape[1]))
    return np.tile(tile, reps)[:size, :size]


def bench(name: str, size: int, reps: int) -> dict:
    if name.endswith(":trained"):
        # the shipped weights: a trained model is confident away from the object, so MC mode
        # samples only a band of pixels (random weights are uncertain everywhere)
        model = load_model(name.split(":")[0])
    else:
        model = build_model(resolve_spec(name).config).eval()
    predictor = Predictor(model, window=None, views=1, recentre=False)  # one decoder pass a click
    img = _sample_image(size)
    t0 = time.perf_counter()
    predictor.set_image(img)
    set_image_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    times = {m: [] for m, _ in MODES}
    for m, _ in MODES:  # warm-up
        predictor.predict(points=[(size // 2, size // 2)], mode=m, samples=20)
    for _ in range(reps):
        point = [tuple(rng.integers(size // 4, 3 * size // 4, 2))]
        for m, _ in MODES:
            t0 = time.perf_counter()
            predictor.predict(points=point, mode=m, samples=20)
            times[m].append(time.perf_counter() - t0)
    # several objects: one batched call vs a loop of single calls (analytic mode)
    prompts = [{"points": [tuple(rng.integers(0, size, 2))]} for _ in range(8)]
    batch_t, loop_t = [], []
    for _ in range(max(3, reps // 3)):
        t0 = time.perf_counter()
        predictor.predict_batch(prompts)
        batch_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for p in prompts:
            predictor.predict(**p)
        loop_t.append(time.perf_counter() - t0)
    windowed = Predictor(model)
    new_t, seen_t = [], []
    if windowed.window is not None:
        windowed.set_image(img)
        for _ in range(reps):
            point = [tuple(rng.integers(0, size, 2))]
            windowed.clear_cache()
            t0 = time.perf_counter()
            windowed.predict(points=point)
            new_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            windowed.predict(points=point)
            seen_t.append(time.perf_counter() - t0)
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    return {"set_image": set_image_s, **{m: statistics.median(v) for m, v in times.items()},
            "batch8": statistics.median(batch_t), "loop8": statistics.median(loop_t),
            "window_new": med(new_t), "window_seen": med(seen_t)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["micro", "micro:trained", "sam2.1_hiera_tiny"],
                        help="registered names (random weights) or NAME:trained for the shipped weights")
    parser.add_argument("--first-click-only", action="store_true", help="only the set_image + click table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if not args.first_click_only:
        decoder_table(args)
    results = first_click("micro", args.reps)
    print("set_image + one click on a new 512x512 plane (DSB2018), shipped micro, target < 150 ms:")
    print()
    print("| predictor | views | re-centring rounds | set_image + click (ms) |")
    print("|---|---|---|---|")
    for (label, views, rounds), t in results.items():
        print(f"| {label} | {views} | {rounds} | {1e3 * t:.0f} |")


def decoder_table(args: argparse.Namespace) -> None:
    print(f"image {args.size}x{args.size}, {args.threads} threads, median of {args.reps} clicks, "
          "click = predict() incl. upsampling to full size")
    print()
    print("| model | set_image (s) | SAM2 decoder (ms) | RUAC analytic (ms) | RUAC MC-20 (ms) | analytic / SAM2 "
          "| MC-20 / SAM2 | 8 objects batched (ms) | 8 objects in a loop (ms) | loop / batch "
          "| default window: click in a new / a seen window (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = bench(name, args.size, args.reps)
        d = r["deterministic"]
        print(
            f"| {name} | {r['set_image']:.2f} | {1e3 * d:.1f} | {1e3 * r['analytic']:.1f} | {1e3 * r['mc']:.1f} "
            f"| {r['analytic'] / d:.2f}x | {r['mc'] / d:.2f}x | {1e3 * r['batch8']:.0f} | {1e3 * r['loop8']:.0f} "
            f"| {r['loop8'] / r['batch8']:.2f}x | {window_cell(r)} |"
        )
    print()


def first_click(model_name: str, reps: int) -> dict[tuple[str, int, int], float]:
    """Median seconds of ``set_image`` + one click on a plane the predictor has not seen.

    The default predictor (context window, four views, three re-centring rounds) also with one
    round and with none (0: ``recentre=False``), to show what the rounds cost, and with
    ``zoom="auto"`` (the plane's object size estimated first; DSB2018's nuclei keep zoom 1, so
    the difference is the estimate's cost), and with it estimated before the clock starts, as
    the annotator does when a plane is shown (``Predictor.plane_zoom``), and with three
    test-time scales (``scales=3``), and on a plane whose click windows were all encoded
    before the clock starts (the annotator's *Precompute all planes*; the time and memory that
    takes per plane are printed first).
    """
    model = load_model(model_name)
    img = _sample_image(512)
    rng = np.random.default_rng(2)
    out = {}
    precompute: dict[int, list] = {}  # scales -> (seconds, windows, bytes) per plane
    settings = [(label, window, views, 3, 1.0, 1) for (label, window), views in itertools.product(
        (("context window", "auto"), ("whole plane", None)), (1, 2, 4, 8))]
    settings[4:4] = [("context window", "auto", 4, 1, 1.0, 1), ("context window", "auto", 4, 0, 1.0, 1),
                     ("context window, zoom auto", "auto", 4, 3, "auto", 1),
                     ("context window, zoom auto estimated when shown", "auto", 4, 3, "auto", 1),
                     ("context window, 3 scales", "auto", 4, 3, 1.0, 3),
                     ("context window, 3 scales", "auto", 2, 3, 1.0, 3),
                     ("context window, plane precomputed", "auto", 4, 3, 1.0, 1),
                     ("context window, 3 scales, plane precomputed", "auto", 4, 3, 1.0, 3)]
    for label, window, views, rounds, zoom, scales in settings:
        ahead = label.endswith("when shown")
        precomputed = label.endswith("precomputed")
        predictor = Predictor(model, window=window, views=views, recentre=rounds > 0,
                              recentre_rounds=max(rounds, 1), zoom=zoom, scales=scales)
        predictor.set_image(img)  # warm-up
        predictor.predict(points=[(256, 256)])
        times = []
        for i in range(reps):
            # a new plane each time (a different array: nothing is reused from the last one)
            plane = np.roll(img, i + 1, axis=0).copy()
            point = [tuple(rng.integers(0, 512, 2))]
            if ahead:
                predictor.plane_zoom(plane)
            if precomputed:  # what the annotator's "Precompute all planes" leaves
                predictor.clear_cache()
                t_pre = time.perf_counter()
                predictor.set_image(plane)
                windows = predictor.click_windows()
                predictor.cache_size = len(windows)
                for zoom_window in windows:
                    predictor.embed_window(*zoom_window)
                precompute.setdefault(scales, []).append(
                    (time.perf_counter() - t_pre, len(windows), predictor.cache_bytes))
            t0 = time.perf_counter()
            predictor.set_image(plane)
            predictor.predict(points=point)
            times.append(time.perf_counter() - t0)
        out[label, views, rounds] = statistics.median(times)
    for scales, runs in precompute.items():
        secs, windows, size = zip(*runs)
        print(f"precomputing a 512x512 plane at {scales} scale(s): {max(windows)} windows "
              f"x 4 views, {statistics.median(secs):.2f} s, {statistics.median(size) / 2**20:.1f} MB of embeddings")
    print()
    return out


def window_cell(r: dict) -> str:
    if r["window_new"] != r["window_new"]:  # NaN: the model resizes every plane, no window
        return "whole plane"
    return f"{1e3 * r['window_new']:.0f} / {1e3 * r['window_seen']:.0f}"


if __name__ == "__main__":
    main()

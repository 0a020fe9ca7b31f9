"""How well one click plus propagation segments whole 3D objects of the real 3D targets.

    python scripts/evaluate_propagation.py [--models micro micro-bayes micro-det] [--targets nuclei3d stardist3d]

For every object of a target's 3D label stack: one click at the innermost pixel of its largest
section, propagated through the stack in both directions as the annotator's *Propagate* does
(the next plane's prompts are the last mask's box and innermost point), and the 3D IoU of the
result with the object. Three settings side by side: zoom 1 without the contrast stop rule (how
propagation worked before 2026-12-07), zoom 1 with it, and each plane at its own zoom with it
(what the annotator does now). Prints a markdown table; fetches the targets first
(scripts/fetch_targets.py, cache outside git). The measure is
napari_ruac.evaluate_propagation.propagation_ious (tested there).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SETTINGS = (("zoom 1, no contrast rule", 1.0, False), ("zoom 1", 1.0, True), ("zoom auto", "auto", True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["micro", "micro-bayes", "micro-det"])
    parser.add_argument("--targets", nargs="+", default=["nuclei3d", "stardist3d"])
    args = parser.parse_args()
    from napari_ruac.evaluate_propagation import objects_3d, propagation_ious
    from napari_ruac.io.imageio import read_image
    from napari_ruac.model import load_model
    from napari_ruac.model.propagation import StopRule

    from fetch_targets import default_cache, fetch  # scripts/, beside this one

    cache = default_cache()
    fetch(cache)
    print("| target | model | objects | " + " | ".join(f"3D IoU, {label}" for label, _, _ in SETTINGS) + " | seconds |")
    print("|---|---|---|" + "---|" * len(SETTINGS) + "---|")
    for target in args.targets:
        folder = cache / target
        for name in sorted(p.name for p in (folder / "images").iterdir()):
            image, labels = read_image(folder / "images" / name), read_image(folder / "masks" / name)
            objects = objects_3d(labels)  # the same clicks for every model and setting
            for model_name in args.models:
                model = load_model(model_name)
                t0 = time.perf_counter()
                means = [np.mean(propagation_ious(model, image, labels, objects, zoom=zoom,
                                                  rule=StopRule() if contrast else StopRule(min_contrast_ratio=None)))
                         for _, zoom, contrast in SETTINGS]
                print(f"| {target} | {model_name} | {len(objects)} | " + " | ".join(f"{m:.3f}" for m in means)
                      + f" | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

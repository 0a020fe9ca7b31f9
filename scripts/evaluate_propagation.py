"""How well one click plus propagation segments whole 3D objects of the real 3D targets.

    python scripts/evaluate_propagation.py [--models micro micro-bayes micro-det] [--targets nuclei3d stardist3d]

For every object of a target's 3D label stack: one click at the innermost pixel of its largest
section, propagated through the stack in both directions as the annotator's *Propagate* does
(the next plane's prompts are the last mask's box and innermost point), and the 3D IoU of the
result with the object. Three settings side by side: zoom 1 without the contrast stop rule (how
propagation worked before 2026-12-07), zoom 1 with it, and each plane at its own zoom with it
(what the annotator does now). Prints a markdown table; fetches the targets first
(scripts/fetch_targets.py, cache outside git).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage as ndi

SETTINGS = (("zoom 1, no contrast rule", 1.0, False), ("zoom 1", 1.0, True), ("zoom auto", "auto", True))


def objects_3d(labels: np.ndarray) -> list[tuple[int, int, tuple[int, int]]]:
    """(id, plane of its largest section, innermost pixel there) for every object."""
    out = []
    for i in (int(v) for v in np.unique(labels) if v):
        obj = labels == i
        z = int(np.argmax(obj.sum((1, 2))))
        dist = ndi.distance_transform_edt(obj[z])
        out.append((i, z, tuple(int(v) for v in np.unravel_index(int(np.argmax(dist)), dist.shape))))
    return out


def evaluate(model, image: np.ndarray, labels: np.ndarray, objects: list, zoom, contrast: bool) -> list[float]:
    from napari_ruac import Predictor
    from napari_ruac.model.propagation import StopRule, predictor_segmenter, propagate

    predictor = Predictor(model, zoom=zoom, cache_size=2 * len(image))
    segment = predictor_segmenter(predictor, lambda k: image[k])
    rule = StopRule() if contrast else StopRule(min_contrast_ratio=None)
    ious = []
    for i, z, point in objects:
        predictor.set_image(image[z])
        mask = predictor.predict(points=[point]).mask
        truth = labels == i
        if mask.sum() < rule.min_area:
            ious.append(0.0)
            continue
        result = propagate(segment, len(image), z, mask, rule=rule, get_plane=lambda k: image[k])
        vol = result.to_volume(len(image), image.shape[1:])
        ious.append(float((vol & truth).sum() / (vol | truth).sum()))
    return ious


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["micro", "micro-bayes", "micro-det"])
    parser.add_argument("--targets", nargs="+", default=["nuclei3d", "stardist3d"])
    args = parser.parse_args()
    from napari_ruac.io.imageio import read_image
    from napari_ruac.model import load_model

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
                means = [np.mean(evaluate(model, image, labels, objects, zoom, contrast))
                         for _, zoom, contrast in SETTINGS]
                print(f"| {target} | {model_name} | {len(objects)} | " + " | ".join(f"{m:.3f}" for m in means)
                      + f" | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Real screenshots of the annotator for the README (run under an X server):

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshots.py

Opens the sample data through the plugin, clicks nuclei (at ground-truth centroids, as a user
would click their centres), commits them, leaves one object in progress so the current-object
mask and its uncertainty map show, thresholds the uncertainty and selects the least certain
object in the proofreading table. A second shot propagates a nucleus through the 3D stack.
Writes docs/images/annotator.png and docs/images/propagation.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

try:  # triton after napari's OpenGL context segfaults (see DESIGN.md)
    import triton  # noqa: F401
except Exception:
    pass

import numpy as np
import torch
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parent.parent


def centroids(labels: np.ndarray, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """Interior points (distance-transform maxima) of ``n`` random objects of a 2D label image."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(ids, size=min(n, len(ids)), replace=False)
    points = []
    for obj in chosen:
        dist = ndi.distance_transform_edt(labels == obj)
        points.append(tuple(int(v) for v in np.unravel_index(int(np.argmax(dist)), dist.shape)))
    return points


def annotate(viewer, widget, points, plane=()):
    """Click each point, wait for its mask, commit it."""
    from napari_ruac._widgets._testing import wait_for

    for p in points:
        n = widget.predictions_applied
        widget.add_point((*plane, *p))
        wait_for(lambda: widget.predictions_applied > n and not widget.predict_runner.busy, 300)
        widget.commit()


def setup(viewer, sample, model, checkpoint):
    from napari_ruac._widgets._testing import wait_for

    viewer.open_sample("napari-ruac", sample)
    _, widget = viewer.window.add_plugin_dock_widget("napari-ruac", "RUAC annotator")
    if checkpoint:
        widget.model_picker.path_edit.setText(str(checkpoint))
    widget.model_picker.model_combo.setCurrentText(model)
    widget.image_combo.setCurrentText(sample)
    wait_for(lambda: False, 0.5)
    return widget


def shot_annotator(napari, args, out: Path) -> Path:
    from napari_ruac._widgets._testing import wait_for

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    widget = setup(viewer, "nuclei2d", args.model, args.checkpoint)
    truth = viewer.layers["nuclei2d ground truth"].data
    points = centroids(truth, args.objects + 1)
    annotate(viewer, widget, points[:-1])
    # one object left in progress: its mask and uncertainty show in the current layers
    n = widget.predictions_applied
    widget.add_point(points[-1])
    wait_for(lambda: widget.predictions_applied > n and not widget.predict_runner.busy, 300)
    widget.threshold_slider.setValue(50)
    widget.overlay.visible = False  # the thresholded pixels are shown in the second shot
    widget.object_table.sortItems(3, order=widget.object_table.horizontalHeader().sortIndicatorOrder().DescendingOrder)
    widget.next_uncertain_object()
    viewer.camera.center = (256, 256)
    viewer.camera.zoom = 1.4
    wait_for(lambda: False, 1.0)
    path = out / "annotator.png"
    from skimage.io import imsave

    imsave(path, viewer.screenshot(canvas_only=False, flash=False), check_contrast=False)
    widget.overlay.visible = True
    widget.uncertainty.visible = False
    wait_for(lambda: False, 0.5)
    imsave(out / "uncertain_pixels.png", viewer.screenshot(canvas_only=False, flash=False), check_contrast=False)
    viewer.close()
    return path


def shot_propagation(napari, args, out: Path) -> Path:
    from napari_ruac._widgets._testing import wait_for

    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 950)
    widget = setup(viewer, "nuclei3d", args.model, args.checkpoint)
    truth = viewer.layers["nuclei3d ground truth"].data
    z = truth.shape[0] // 2
    viewer.dims.set_point(0, z)
    point = centroids(truth[z], 1, seed=1)[0]
    n = widget.predictions_applied
    widget.add_point((z, *point))
    wait_for(lambda: widget.predictions_applied > n and not widget.predict_runner.busy, 300)
    widget.propagate()
    wait_for(lambda: not widget.task_runner.busy, 600)
    widget.go_to_worst_plane()
    wait_for(lambda: False, 1.0)
    path = out / "propagation.png"
    from skimage.io import imsave

    imsave(path, viewer.screenshot(canvas_only=False, flash=False), check_contrast=False)
    viewer.close()
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="micro")
    parser.add_argument("--checkpoint", default=None, help="weights file (a checkpoint of ours or SAM2.1)")
    parser.add_argument("--objects", type=int, default=8, help="nuclei to commit in the 2D shot")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    import napari

    for path in (shot_annotator(napari, args, args.out), shot_propagation(napari, args, args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

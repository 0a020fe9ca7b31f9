"""A rendered screenshot of the annotator with its layers is not blank (real OpenGL under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_screenshot_with_mask_uncertainty_and_table(make_napari_viewer, qtbot):
    torch.set_num_threads(1)
    viewer = make_napari_viewer(show=True)
    # the random-weight test model gives a non-empty mask for this small image (seeded, fixed)
    r, c = np.ogrid[:48, :64]
    image = ((r - 15) ** 2 + (c - 18) ** 2 <= 64).astype(np.float32)
    image += ((r - 32) ** 2 + (c - 45) ** 2 <= 81)
    image += 0.05 * np.random.default_rng(0).random(image.shape, dtype=np.float32)
    viewer.add_image(image, name="cells", scale=(3, 3))
    _, widget = viewer.window.add_plugin_dock_widget("napari-ruac", "RUAC annotator")
    widget.model_picker.model_combo.setCurrentText("test-tiny")
    widget.add_point((15, 18))
    qtbot.waitUntil(lambda: widget.predictions_applied >= 1 and not widget.predict_runner.busy, timeout=60_000)
    assert widget.commit() == 1
    widget.threshold_slider.setValue(90)
    qtbot.wait(100)

    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.ndim == 3 and shot.shape[2] == 4 and shot.shape[0] > 200 and shot.shape[1] > 300
    rgb = shot[..., :3].reshape(-1, 3)
    assert rgb.std(axis=0).max() > 20, "screenshot looks blank"
    assert len(np.unique(rgb[:: 7], axis=0)) > 100

    canvas = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    # the canvas shows more than the grey image: the label/uncertainty colours are rendered
    colour = np.abs(canvas.astype(int) - canvas.mean(axis=2, keepdims=True)).max(axis=2)
    assert (colour > 30).mean() > 0.01

    grab = widget.grab().toImage()
    assert grab.width() > 100 and grab.height() > 200
    assert widget.object_table.rowCount() == 1

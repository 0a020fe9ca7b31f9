"""What the annotator's widget tests share: a small stack, the docked widget and waits."""

from __future__ import annotations

import numpy as np

WAIT_MS = 60_000


def stack(n=4, shape=(48, 64)):
    """A small float32 stack with two bright blobs."""
    z, r, c = np.ogrid[:n, : shape[0], : shape[1]]
    out = np.zeros((n, *shape), np.float32)
    for cz, cr, cc, rad in [(n // 2, 15, 18, 8), (n // 2, 32, 45, 9)]:
        out += (4 * (z - cz) ** 2 + (r - cr) ** 2 + (c - cc) ** 2 <= rad**2)
    return out + 0.05 * np.random.default_rng(0).random(out.shape, dtype=np.float32)


def dock(viewer, qtbot):
    """The annotator docked via the manifest, set to the tiny test model."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-ruac", "RUAC annotator")
    widget.model_picker.model_combo.setCurrentText("test-tiny")
    return widget


def wait_predictions(qtbot, widget, n):
    qtbot.waitUntil(lambda: widget.predictions_applied >= n and not widget.predict_runner.busy, timeout=WAIT_MS)


def clicked_object(viewer, qtbot, widget, z):
    """A click on the first blob of plane ``z``, its mask shown (the widget's first prediction)."""
    viewer.dims.set_point(0, z)
    widget.add_point((z, 15, 18))
    wait_predictions(qtbot, widget, 1)

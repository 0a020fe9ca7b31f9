"""Helpers that drive the widgets like a user does (tests, screenshot script, benchmark).

Clicks go through napari's real mouse machinery: a vispy ``mouse_press``/``mouse_release`` pair
on the canvas at the screen position of a world coordinate, so the active layer's mode callbacks
(e.g. the Points layer's add mode) run exactly as for a hand-made click.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def world_to_canvas(viewer, world_rc) -> np.ndarray:
    """Canvas pixel (x, y) of a 2D-displayed world position (row, col)."""
    canvas = viewer.window._qt_viewer.canvas
    view = canvas.view
    transform = view.transform * view.scene.transform
    x_y = transform.map([float(world_rc[-1]), float(world_rc[-2])])
    return np.asarray(x_y[:2], dtype=float)


def click(viewer, world_rc, modifiers: tuple[str, ...] = ()) -> None:
    """A left click at a world (row, col) on the current plane; ``modifiers`` e.g. ("Shift",)."""
    from vispy.util import keys

    mods = tuple(getattr(keys, m.upper()) for m in modifiers)
    pos = world_to_canvas(viewer, world_rc)
    scene = viewer.window._qt_viewer.canvas._scene_canvas
    scene.events.mouse_press(pos=pos, modifiers=mods, button=1)
    scene.events.mouse_release(pos=pos, modifiers=mods, button=1)


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Process Qt events until ``condition()`` holds; False on timeout."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        QApplication.processEvents()
        if condition():
            return True
        time.sleep(0.002)
    QApplication.processEvents()
    return condition()

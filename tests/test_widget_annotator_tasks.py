"""The annotator's long tasks (Propagate, Precompute) against what the user does meanwhile:
switching or removing the bound image, deleting the object being propagated, a plane the model
cannot read. Real napari viewer (Xvfb) and the real `test-tiny` model (random weights: these
check bookkeeping, not mask quality)."""

from __future__ import annotations

import sys
import time
import traceback

import numpy as np
import pytest
import torch
from annotator_helpers import WAIT_MS, clicked_object, dock, stack, wait_predictions
from napari.utils.notifications import notification_manager

from napari_ruac.model.predictor import Prediction, Prompt
from napari_ruac.model.propagation import iter_propagate, propagate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def excs(monkeypatch):
    """Tracebacks raised in Qt slots (signal handlers) during the test."""
    got = []

    def hook(t, v, tb):
        got.append("".join(traceback.format_exception(t, v, tb)))

    monkeypatch.setattr(sys, "excepthook", hook)
    return got





def idle(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.predict_runner.busy and not widget.task_runner.busy, timeout=WAIT_MS)
    qtbot.wait(50)  # signals the finished worker sent are delivered


def messages(since):
    return [f"{n.severity}: {n.message}" for n in notification_manager.records[since:]]



# ---------------------------------------------------------------- A: the bound image changes
def test_switching_the_image_stops_a_running_propagation(make_napari_viewer, qtbot, excs):
    viewer = make_napari_viewer()
    viewer.add_image(stack(12, (48, 48)), name="a")
    viewer.add_image(stack(5, (40, 40)), name="b")
    widget = dock(viewer, qtbot)
    widget.image_combo.setCurrentText("a")
    clicked_object(viewer, qtbot, widget, 6)
    before = len(notification_manager.records)
    widget.propagate()
    a_objects = viewer.layers["a objects"]
    written = a_objects.data.copy()  # (only the start plane: the worker's planes arrive later)
    widget.image_combo.setCurrentText("b")  # before any of the worker's planes arrived
    assert widget.image_layer.name == "b"
    assert "propagation stopped: the image changed" in widget.status.text()
    assert not widget.cancel_button.isEnabled()
    assert widget.progress.value() == widget.progress.maximum()
    idle(qtbot, widget)
    assert excs == []
    assert not [m for m in messages(before) if "failed" in m or "error" in m.lower()]
    assert not viewer.layers["b objects"].data.any()  # a's planes never landed on b
    np.testing.assert_array_equal(a_objects.data, written)  # nor on a, after the switch
    assert "propagation stopped: the image changed" in widget.status.text()
    # the next task runs normally on the new image
    clicked_object(viewer, qtbot, widget, 2)
    widget.propagate()
    idle(qtbot, widget)
    assert "spans planes" in widget.status.text() and excs == []


def test_removing_the_image_stops_a_running_propagation(make_napari_viewer, qtbot, excs):
    viewer = make_napari_viewer()
    viewer.add_image(stack(12, (48, 48)), name="a")
    widget = dock(viewer, qtbot)
    clicked_object(viewer, qtbot, widget, 6)
    before = len(notification_manager.records)
    widget.propagate()
    viewer.layers.remove("a")
    assert widget.image_layer is None
    assert "propagation stopped: the image was removed" in widget.status.text()
    idle(qtbot, widget)
    assert excs == []
    assert not [m for m in messages(before) if "failed" in m]
    assert not widget.cancel_button.isEnabled() and widget.progress.value() == widget.progress.maximum()
    assert "propagation stopped" in widget.status.text()


def test_switching_the_image_stops_precompute(make_napari_viewer, qtbot, excs):
    viewer = make_napari_viewer()
    viewer.add_image(stack(12, (48, 48)), name="a")
    viewer.add_image(stack(3, (32, 32)), name="b")
    widget = dock(viewer, qtbot)
    widget.image_combo.setCurrentText("a")
    before = len(notification_manager.records)
    widget.precompute_all()
    widget.image_combo.setCurrentText("b")
    idle(qtbot, widget)
    assert excs == []
    assert not [m for m in messages(before) if "failed" in m]
    assert "precompute stopped: the image changed" in widget.status.text()
    assert not widget.cancel_button.isEnabled()
    # a new precompute of b can start at once and embeds b's planes only
    widget.precompute_all()
    idle(qtbot, widget)
    assert "embedded 3 of 3 planes" in widget.status.text()


# ---------------------------------------------------------------- B: the bound image is removed
def test_removing_the_bound_image_binds_the_remaining_one(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(stack(3), name="a")
    viewer.add_image(stack(3), name="b")
    widget = dock(viewer, qtbot)
    widget.image_combo.setCurrentText("a")
    viewer.layers.remove("a")
    assert widget.image_combo.currentText() == "b"
    # an action at once works on the image the combo shows
    widget.add_point((1, 15, 18))
    assert widget.image_layer.name == "b"
    wait_predictions(qtbot, widget, 1)
    assert widget.commit() == 1

    # and without any action, the widget binds it by itself
    viewer.add_image(stack(2), name="c")
    widget.image_combo.setCurrentText("c")
    viewer.layers.remove("c")
    qtbot.waitUntil(lambda: widget.image_layer is not None and widget.image_layer.name == "b", timeout=5000)
    assert widget.image_combo.currentText() == "b"


def test_a_prediction_still_running_when_its_image_is_removed_is_dropped(make_napari_viewer, qtbot, excs):
    """A prediction job reads the image bound when its prompts changed, and its result is shown
    only while that image is bound. Here a is removed while a's mask waits for the model, and
    the job gets to it before the widget has bound b. (Before, the job read whatever image was
    bound when it got there: nothing, so "prediction failed: 'NoneType' object has no attribute
    'data'" was shown on b.)"""
    viewer = make_napari_viewer()
    viewer.add_image(stack(3), name="a")
    viewer.add_image(stack(3)[::-1, ::-1].copy(), name="b")
    widget = dock(viewer, qtbot)
    widget.image_combo.setCurrentText("a")
    widget.add_point((0, 15, 18))  # loads the model
    wait_predictions(qtbot, widget, 2)  # its mask, then its refinement at three scales
    shown = widget.predictions_applied
    before = len(notification_manager.records)
    with widget._model_lock:  # a's next job waits for the model, as behind a long embedding
        widget.add_point((1, 32, 45))
        qtbot.waitUntil(lambda: widget.predict_runner.busy, timeout=WAIT_MS)
        viewer.layers.remove("a")  # b is bound once this event is over
    time.sleep(1.0)  # the job runs meanwhile, with no Qt event handled (b not bound yet)
    qtbot.waitUntil(lambda: not widget.predict_runner.busy and widget.image_layer is not None, timeout=WAIT_MS)
    qtbot.wait(100)
    assert widget.image_layer.name == "b"
    assert widget.predictions_applied == shown  # a's mask was not shown on b
    assert not widget.current.data.any()
    assert "failed" not in widget.status.text() and messages(before) == []
    widget.add_point((1, 32, 45))  # and b predicts as usual
    wait_predictions(qtbot, widget, shown + 1)
    assert widget.current.data[1].any()


def test_with_no_image_left_the_buttons_ask_for_one(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(stack(3), name="a")
    widget = dock(viewer, qtbot)
    viewer.layers.remove("a")
    qtbot.wait(50)
    assert widget.image_layer is None and widget.object_table.rowCount() == 0
    for act in (widget.propagate, widget.precompute_all, widget.delete_selected, widget.next_uncertain_object):
        before = len(notification_manager.records)
        act()
        got = messages(before)
        assert got and all("choose an image" in m for m in got), (act.__name__, got)


# ---------------------------------------------------------------- C: the propagated object is deleted
def test_deleting_the_object_being_propagated_stops_it(make_napari_viewer, qtbot, excs):
    viewer = make_napari_viewer()
    viewer.add_image(stack(12, (48, 48)), name="a")
    widget = dock(viewer, qtbot)
    clicked_object(viewer, qtbot, widget, 6)
    widget.propagate()
    assert widget.task_runner.busy
    widget.object_table.selectRow(0)
    widget.delete_selected()  # before any propagated plane arrived
    idle(qtbot, widget)
    assert excs == []
    assert not (widget.objects.data == 1).any() and 1 not in widget.records
    assert widget.object_table.rowCount() == 0
    assert "propagation stopped: object 1 was deleted" in widget.status.text()
    assert not widget.cancel_button.isEnabled()


def test_stop_propagation_of_an_object_for_re_prompting(make_napari_viewer, qtbot, excs):
    viewer = make_napari_viewer()
    viewer.add_image(stack(12, (48, 48)), name="a")
    widget = dock(viewer, qtbot)
    clicked_object(viewer, qtbot, widget, 6)
    widget.propagate()
    assert not widget.stop_propagation_of(2)  # not the object being propagated: it runs on
    assert widget.cancel_button.isEnabled()
    assert widget.stop_propagation_of(1, "object 1 is re-prompted")
    assert "propagation stopped: object 1 is re-prompted" in widget.status.text()
    assert not widget.stop_propagation_of(1)  # stopped already
    written = widget.objects.data.copy()
    idle(qtbot, widget)
    np.testing.assert_array_equal(widget.objects.data, written)
    assert excs == []


# ---------------------------------------------------------------- D: a plane the model cannot read
def test_a_bad_plane_stops_one_direction_of_propagation():
    stack_ = np.zeros((7, 20, 20), np.float32)
    stack_[:, 5:15, 5:15] = 1

    def segment(index: int, prompt: Prompt) -> Prediction:
        if index == 5:
            raise ValueError("image contains NaN values")
        mask = stack_[index] > 0.5
        return Prediction(mask=mask, probability=mask.astype(np.float32),
                          uncertainty=np.full(mask.shape, 0.1, np.float32), iou_score=0.9)

    got = list(iter_propagate(segment, 7, 3, stack_[3] > 0.5))
    assert [(d, r.index if r else None, why) for d, r, why in got] == [
        (1, 4, None), (1, None, "stopped at plane 5: image contains NaN values"),
        (-1, 2, None), (-1, 1, None), (-1, 0, None)]
    result = propagate(segment, 7, 3, stack_[3] > 0.5)
    assert result.indices == [0, 1, 2, 3, 4]
    assert result.stop_reasons["forward"] == "stopped at plane 5: image contains NaN values"

    def broken(index, prompt):  # not a bad plane: a bug or out of memory fails the whole run
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError):
        list(iter_propagate(broken, 7, 3, stack_[3] > 0.5))


def test_a_nan_plane_stops_propagation_in_its_direction_only(make_napari_viewer, qtbot, excs):
    viewer = make_napari_viewer()
    s = stack(5, (48, 48))
    s[3] = np.nan  # the plane after the start: the forward direction meets it first
    viewer.add_image(s, name="a")
    widget = dock(viewer, qtbot)
    clicked_object(viewer, qtbot, widget, 2)
    before = len(notification_manager.records)
    widget.propagate()
    idle(qtbot, widget)
    assert excs == []
    assert not [m for m in messages(before) if "failed" in m]
    info = widget._propagation[1]
    assert any(s.startswith("stopped at plane 3:") and "NaN" in s for s in info["stops"]), info["stops"]
    # the other direction was tried: plane 1 was propagated to or gave a reason to stop
    assert 1 in info["planes"] or any(s.startswith("plane 1:") for s in info["stops"]), info
    status = widget.status.text()
    assert "spans planes" in status and "stopped at plane 3:" in status

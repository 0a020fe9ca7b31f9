"""The annotator widget in a real napari viewer (Xvfb), docked through the plugin manifest, with
the real `test-tiny` model (random weights: masks are arbitrary, so these tests check layers,
alignment, ids, undo, workers and navigation, not mask quality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from annotator_helpers import WAIT_MS, clicked_object, dock, stack, wait_predictions
from napari_ruac._widgets._testing import click

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)





def test_layers_follow_a_scaled_translated_stack(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image = viewer.add_image(stack(), name="cells", scale=(2.0, 0.5, 0.25), translate=(0, 10, -4))
    widget = dock(viewer, qtbot)
    names = [l.name for l in viewer.layers]
    for suffix in ("prompts", "box", "current object", "uncertainty", "objects", "uncertain pixels"):
        assert f"cells {suffix}" in names
    for layer in (widget.prompts, widget.boxes, widget.current, widget.uncertainty, widget.objects):
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    assert widget.current.data.shape == image.data.shape and widget.current.data.dtype == np.uint8
    assert widget.objects.data.dtype == np.uint32
    assert widget.uncertainty.data.dtype == np.float32
    assert tuple(widget.uncertainty.contrast_limits) == (0.0, 1.0)
    assert widget.uncertainty.colormap.name == "magma"

    viewer.dims.set_point(0, 2.0 * 1)  # world z = 2 -> plane 1
    assert widget.current_plane() == (1,)
    widget.add_point((1, 20, 30))  # through the Points layer's own add path
    wait_predictions(qtbot, widget, 1)
    # only plane 1 was predicted, and the layers agree with the prediction
    assert widget.current.data[1].any()
    assert not widget.current.data[[0, 2, 3]].any()
    unc = widget.uncertainty.data[1]
    assert 0.0 <= unc.min() and unc.max() <= 1.0 and unc.any()
    assert not widget.uncertainty.data[0].any()
    assert widget.last_latency_s is not None and widget.last_latency_s > 0


def test_the_predicted_iou_is_shown_only_for_a_model_whose_iou_head_was_trained(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image = stack(n=1)[0] * 1000
    r, c = np.ogrid[:48, :64]
    image[(r - 38) ** 2 + (c - 12) ** 2 <= 36] += 1000  # a third nucleus
    viewer.add_image(image, name="cells")
    widget = dock(viewer, qtbot)
    widget.model_picker.model_combo.setCurrentText("micro")  # IoU head never trained
    widget.add_point((32, 45))
    wait_predictions(qtbot, widget, 1)
    assert "px," in widget.status.text() and "predicted IoU" not in widget.status.text()
    assert np.isnan(widget.records[widget.commit()].iou_score)
    # a mask shown from `micro` keeps `micro`'s verdict when a job for another model has
    # already loaded that model (its result not yet applied) at the time of the commit
    widget.add_point((38, 12))
    wait_predictions(qtbot, widget, 2)
    widget.model_picker.model_combo.blockSignals(True)  # no re-prediction: only the model swap
    widget.model_picker.model_combo.setCurrentText("test-tiny")  # SAM2-style heads
    widget.model_picker.model_combo.blockSignals(False)
    widget._ensure_predictor(widget.model_picker.choice())  # what the newer job does first
    assert np.isnan(widget.records[widget.commit()].iou_score)
    n = widget.predictions_applied
    widget.add_point((15, 18))
    wait_predictions(qtbot, widget, n + 1)
    assert "predicted IoU" in widget.status.text()
    assert np.isfinite(widget.records[widget.commit()].iou_score)


def test_canvas_clicks_add_positive_and_negative_points(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(stack(n=1)[0], name="cells", scale=(0.5, 0.5), translate=(10, 5))
    widget = dock(viewer, qtbot)
    qtbot.wait(50)
    assert viewer.layers.selection.active.name == "cells prompts"
    # world (row, col) of data pixel (20, 30) is (10 + 0.5*20, 5 + 0.5*30)
    click(viewer, (20.0, 20.0))
    click(viewer, (15.0, 10.0), modifiers=("Shift",))
    data = widget.prompts.data
    np.testing.assert_allclose(data, [[20, 30], [10, 10]], atol=0.6)
    assert list(widget.prompts.features["label"]) == [1, 0]
    widget.negative_check.setChecked(True)
    click(viewer, (12.0, 12.0))
    assert list(widget.prompts.features["label"]) == [1, 0, 0]
    wait_predictions(qtbot, widget, 1)
    prompt = widget.prompts_by_plane()[()]
    assert widget._shown_prompts[()] == prompt and prompt.labels == (1, 0, 0)
    assert widget.current.data.shape == (48, 64)


def test_newest_prompt_supersedes_pending_ones(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(stack(n=1)[0], name="cells")
    widget = dock(viewer, qtbot)
    for k in range(6):  # six changes before the event loop runs: five are superseded
        widget.add_point((10 + k, 10 + 2 * k))
    wait_predictions(qtbot, widget, 1)
    qtbot.wait(100)
    assert widget.predictions_applied <= 2
    assert widget._shown_prompts[()] == widget.prompts_by_plane()[()]
    assert len(widget._shown_prompts[()].points) == 6


def test_box_prompt_commit_two_objects_undo_and_clear(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(stack(), name="cells")
    widget = dock(viewer, qtbot)
    viewer.dims.set_point(0, 1)
    widget.add_point((1, 15, 18))
    widget.add_box((1,), (5, 8, 25, 28))
    wait_predictions(qtbot, widget, 1)
    assert widget._shown_prompts[(1,)].box == (5.0, 8.0, 25.0, 28.0)
    assert widget.current.data[1].any()
    first = widget.commit()
    assert first == 1
    assert not widget.current.data.any() and len(widget.prompts.data) == 0 and len(widget.boxes.data) == 0
    assert (widget.objects.data[1] == 1).sum() > 0

    viewer.dims.set_point(0, 2)
    n = widget.predictions_applied
    widget.add_point((2, 32, 45))
    widget.add_point((2, 30, 40), positive=False)
    wait_predictions(qtbot, widget, n + 1)
    n = widget.predictions_applied
    widget.undo()  # removes the negative point and re-predicts with the positive one
    assert len(widget.prompts.data) == 1 and list(widget.prompts.features["label"]) == [1]
    wait_predictions(qtbot, widget, n + 1)
    assert widget._shown_prompts[(2,)].points == ((32.0, 45.0),)
    second = widget.commit()
    assert second == 2
    assert set(np.unique(widget.objects.data)) == {0, 1, 2}
    assert set(widget.records) == {1, 2}
    assert widget.records[2].planes == ((2,),) and widget.records[2].area == (widget.objects.data == 2).sum()
    assert widget.object_table.rowCount() == 2

    widget.add_point((2, 5, 5))
    widget.clear_prompts()
    qtbot.wait(200)  # a result arriving after Clear must not redraw the cleared object
    assert not widget.current.data.any()
    assert widget.commit() is None  # nothing to commit: no new id is used
    assert set(widget.records) == {1, 2}


def test_threshold_navigation_delete_and_reprompt(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image = viewer.add_image(stack(), name="cells", scale=(1.0, 2.0, 2.0))
    widget = dock(viewer, qtbot)
    for plane, point in ((0, (10, 10)), (3, (30, 40))):
        viewer.dims.set_point(0, plane)
        n = widget.predictions_applied
        widget.add_point((plane, *point))
        wait_predictions(qtbot, widget, n + 1)
        assert widget.commit() is not None
    # threshold overlay = uncertainty above the slider's value
    widget.threshold_slider.setValue(99)
    np.testing.assert_array_equal(widget.overlay.data.astype(bool), widget.uncertainty.data > 0.99)
    widget.threshold_slider.setValue(10)
    np.testing.assert_array_equal(widget.overlay.data.astype(bool), widget.uncertainty.data > 0.10)
    assert widget.overlay.visible

    # the table sorts by uncertainty; "next" visits objects from the least certain down
    ranked = sorted(widget.records.values(), key=lambda r: -r.mean_uncertainty)
    widget.object_table.sortItems(3)
    assert widget.next_uncertain_object() == ranked[0].id
    rec = ranked[0]
    expected_world = image.data_to_world((*rec.worst_plane, *np.argwhere(widget.objects.data[rec.worst_plane] == rec.id).mean(0)))
    np.testing.assert_allclose(viewer.camera.center[-2:], expected_world[-2:], atol=1e-3)
    assert widget.current_plane() == rec.worst_plane
    assert widget.objects.selected_label == rec.id
    assert widget.next_uncertain_object() == ranked[1].id
    assert widget.next_uncertain_object() == ranked[0].id  # wraps round

    # re-prompt: its prompts come back, it stays until a commit replaces it with its id
    widget.focus_object(ranked[1].id)
    target = ranked[1].id
    before = widget.objects.data.copy()
    n = widget.predictions_applied
    widget.reprompt_selected()
    np.testing.assert_array_equal(widget.objects.data, before)
    assert target in widget.records and len(widget.prompts.data) == 1
    wait_predictions(qtbot, widget, n + 1)
    assert widget.commit() == target
    plane = widget.records[target].worst_plane
    np.testing.assert_array_equal(widget.objects.data[plane] == target,
                                  (before[plane] == target) | ((before[plane] == 0) & (widget.objects.data[plane] == target)))
    widget.focus_object(target)
    widget.delete_selected()
    assert not (widget.objects.data == target).any() and target not in widget.records
    assert widget.object_table.rowCount() == 1


def test_propagate_through_a_small_stack(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(stack(n=5), name="cells")
    widget = dock(viewer, qtbot)
    viewer.dims.set_point(0, 2)
    widget.add_point((2, 15, 18))
    wait_predictions(qtbot, widget, 1)
    widget.propagate()  # commits the current object first, then carries it through z
    assert 1 in widget.records
    qtbot.waitUntil(lambda: not widget.task_runner.busy, timeout=WAIT_MS)
    curve = widget.propagation_curve(1)
    assert 2 in curve and all(0.0 <= v <= 1.0 for v in curve.values())
    # every plane the object occupies is in the per-plane record and table
    occupied = {int(i) for i in np.nonzero((widget.objects.data == 1).any(axis=(1, 2)))[0]}
    assert occupied == set(curve)
    assert widget.plane_table.rowCount() == len(curve)
    assert widget.records[1].planes == tuple((i,) for i in sorted(curve))
    assert "spans planes" in widget.status.text()
    worst = widget.go_to_worst_plane()
    assert worst == max(curve, key=curve.get) and widget.current_plane() == (worst,)


def test_precompute_all_planes_then_cancel(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(stack(n=3), name="cells")
    widget = dock(viewer, qtbot)
    widget.precompute_all()
    assert widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.task_runner.busy, timeout=WAIT_MS)
    assert "embedded 3 of 3 planes" in widget.status.text()
    assert all(widget._predictor.is_cached(widget._plane_array(widget.image_layer, (i,))) for i in range(3))
    assert widget.progress.value() == widget.progress.maximum()
    assert not widget.cancel_button.isEnabled()

    widget._predictor.clear_cache()
    with widget._model_lock:  # the worker cannot embed anything before the cancel lands
        widget.precompute_all()
        widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.task_runner.busy, timeout=WAIT_MS)
    assert "cancelled after embedding 0 of 3" in widget.status.text()
    assert not widget.cancel_button.isEnabled()
    assert not any(widget._predictor.is_cached(widget._plane_array(widget.image_layer, (i,))) for i in range(3))

    # whole planes count against the memory share too: it stops after the first
    widget.precompute_memory_fraction = 1e-12
    widget.precompute_all()
    qtbot.waitUntil(lambda: not widget.task_runner.busy, timeout=WAIT_MS)
    assert widget.status.text().startswith("embedded 0 of 3 planes: stopped at")
    assert [widget._predictor.is_cached(widget._plane_array(widget.image_layer, (i,))) for i in range(3)] == [True, False, False]


def test_precompute_embeds_every_click_window_of_planes_larger_than_the_window(make_napari_viewer, qtbot,
                                                                              monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(stack(n=2, shape=(200, 180)), name="big")  # test-tiny's window is 128 px
    widget = dock(viewer, qtbot)
    assert widget.scales_combo.currentText() == "1, then 3"
    values = []
    widget.progress.valueChanged.connect(values.append)
    widget.precompute_all()
    qtbot.waitUntil(lambda: not widget.task_runner.busy, timeout=WAIT_MS)
    assert widget.status.text() == "embedded 2 of 2 planes"
    # the bar moves through each plane's windows, not only from plane to plane
    assert values[-1] == 1 == widget.progress.maximum()  # the bar's "done" after the task
    steps = values[:-1]
    assert steps == sorted(steps) and steps[-1] == 200  # 2 planes x 100 steps
    assert any(0 < v < 100 for v in steps) and any(100 < v < 200 for v in steps)
    calls = []
    model = widget._predictor.model
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda x: calls.append(x.shape) or encode(x))
    viewer.dims.set_point(0, 1)
    applied = widget.predictions_applied
    widget.add_point((1, 150, 30))
    wait_predictions(qtbot, widget, applied + 1)
    # every window of the three scales is encoded: the click is decoded at three at once, with
    # nothing to encode and no refinement to follow
    shown = widget._current_preds[(1,)]
    assert shown.scales == 3 and not shown.refined and "(3 scales)" in widget.status.text()
    assert calls == [] and widget.current.data[1].any()
    qtbot.wait(200)
    assert widget.predictions_applied == applied + 1 and not widget.predict_runner.busy

    # past the memory share it may use, it stops and says so
    widget._predictor.clear_cache()
    widget.precompute_memory_fraction = 1e-12
    widget.precompute_all()
    qtbot.waitUntil(lambda: not widget.task_runner.busy, timeout=WAIT_MS)
    text = widget.status.text()
    assert text.startswith("embedded 0 of 2 planes: stopped at") and "embedded when clicked" in text
    assert 0 < len(calls) <= 2  # one window (in one or two encoder passes), then the budget


def test_errors_become_notifications(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    viewer.add_image(stack(n=1)[0], name="cells")
    widget = dock(viewer, qtbot)
    widget.model_picker.model_combo.setCurrentText("checkpoint file…")
    widget.model_picker.path_edit.setText(str(tmp_path / "missing.pt"))
    before = len(notification_manager.records)
    widget.add_point((10, 10))
    qtbot.waitUntil(lambda: not widget.predict_runner.busy, timeout=WAIT_MS)
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("missing.pt" in m for m in messages), messages
    assert not widget.current.data.any()  # nothing half-applied
    # an image the widget cannot take is refused with a message, not a crash
    plane = stack(n=1)[0]
    viewer.add_image([plane, plane[::2, ::2]], multiscale=True, name="pyramid")
    widget.image_combo.setCurrentText("pyramid")
    assert any("multiscale" in str(n.message) for n in notification_manager.records[before:])
    assert widget.image_layer.name == "cells"


def test_switching_images_and_recreating_deleted_layers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(stack(n=1)[0], name="a")
    viewer.add_image(stack(n=2), name="b")
    widget = dock(viewer, qtbot)
    assert widget.image_layer.name == "a"
    widget.image_combo.setCurrentText("b")
    assert widget.image_layer.name == "b" and widget.current.data.shape == (2, 48, 64)
    # points added to the old image's prompt layer no longer drive the widget
    viewer.layers["a prompts"].add(np.array([5.0, 5.0]))
    assert len(widget.prompts.data) == 0 and widget._history == []
    viewer.layers.remove("b uncertainty")
    widget.add_point((0, 10, 10))  # the next action makes the deleted layer again
    assert "b uncertainty" in viewer.layers and widget.uncertainty.name == "b uncertainty"
    wait_predictions(qtbot, widget, 1)
    assert widget.uncertainty.data[0].any()


def test_out_of_memory_message_gives_advice():
    from napari_ruac._widgets.runner import describe_error

    text = describe_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "out of memory" in text and "smaller model" in text and "Nothing was changed" in text
    assert describe_error(FileNotFoundError("x.pt")) == "FileNotFoundError: x.pt"


def test_propagate_along_time_keeps_z_fixed_and_hotkeys(make_napari_viewer, qtbot):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer(show=True)
    data = np.stack([stack(n=3), stack(n=3)])  # (t=2, z=3, 48, 64)
    viewer.add_image(data, name="movie")
    widget = dock(viewer, qtbot)
    viewer.dims.set_point(0, 1)
    viewer.dims.set_point(1, 1)
    assert widget.current_plane() == (1, 1)
    widget.add_point((1, 1, 15, 18))
    assert widget.predictions_applied == 0 and widget.predict_runner.busy  # not on the UI thread
    wait_predictions(qtbot, widget, 1)
    # "c" on the prompts layer commits, through napari's real key handling on the canvas
    viewer.layers.selection.active = widget.prompts
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, Qt.Key.Key_C)
    qtbot.waitUntil(lambda: 1 in widget.records, timeout=5_000)
    widget.axis_combo.setCurrentIndex(0)  # along t, with z fixed at 1
    widget.focus_object(1)
    widget.propagate()
    qtbot.waitUntil(lambda: not widget.task_runner.busy, timeout=WAIT_MS)
    curve = widget.propagation_curve(1)
    assert set(curve) <= {0, 1} and 1 in curve
    present = np.argwhere((widget.objects.data == 1).any(axis=(2, 3)))
    assert all(z == 1 for _, z in present)  # never spilled into other z planes
    assert {t for t, _ in present} == set(curve)


def test_a_torch_error_in_a_generator_job_is_a_notification_not_silence(qtbot):
    # superqt drops RuntimeErrors raised in generator workers ("worker deleted"); torch's
    # out-of-memory is one, so the runner must re-raise it as something that is reported
    from napari.utils.notifications import notification_manager

    from napari_ruac._widgets.runner import JobError, LatestOnlyRunner

    errors = []
    runner = LatestOnlyRunner(on_error=errors.append, name="precompute")

    def job():
        yield 1
        torch.empty(2**50)  # a real allocation failure: RuntimeError from DefaultCPUAllocator

    before = len(notification_manager.records)
    runner.submit(job)
    qtbot.waitUntil(lambda: not runner.busy, timeout=WAIT_MS)
    assert len(errors) == 1 and isinstance(errors[0], JobError)
    assert isinstance(errors[0].__cause__, RuntimeError)
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any(m.startswith("precompute failed: out of memory") for m in messages), messages


def test_refined_windows_stay_cached_for_a_click_back_on_them(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    viewer.add_image(stack(n=1, shape=(400, 400))[0], name="big")  # many of test-tiny's 128 px windows
    widget = dock(viewer, qtbot)
    spots = [(40, 40), (40, 360), (360, 40), (360, 360), (200, 200), (40, 200), (200, 40)]
    for k, spot in enumerate(spots):  # each click shown at one scale, then refined at three
        widget.clear_prompts()
        widget.add_point(spot)
        qtbot.waitUntil(lambda: widget._current_preds.get(()) is not None and widget._current_preds[()].refined
                        and not widget.predict_runner.busy, timeout=WAIT_MS)
    calls = []
    model = widget._predictor.model
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda x: calls.append(x.shape) or encode(x))
    widget.clear_prompts()
    widget.add_point(spots[0])  # back to the first: its windows at all three scales are still there
    qtbot.waitUntil(lambda: widget._current_preds.get(()) is not None and widget._current_preds[()].prompt.points
                    == (spots[0],) and not widget.predict_runner.busy, timeout=WAIT_MS)
    assert calls == [] and widget._current_preds[()].scales == 3


def test_an_interruptible_job_stops_at_its_next_yield_for_newer_work(qtbot):
    import threading

    from napari_ruac._widgets.runner import LatestOnlyRunner

    runner = LatestOnlyRunner(name="refinement")
    for interruptible, expected_steps in ((True, [1]), (False, [1, 2, 3])):
        go, steps, results = threading.Event(), [], []

        def slow():
            steps.append(1)
            go.wait(WAIT_MS / 1000)
            yield
            steps.append(2)
            yield
            steps.append(3)
            return "stale"

        runner.submit(slow, on_result=results.append, interruptible=interruptible)
        qtbot.waitUntil(lambda: steps == [1], timeout=WAIT_MS)
        runner.submit(lambda: "newer", on_result=results.append)
        go.set()
        qtbot.waitUntil(lambda: not runner.busy and bool(results), timeout=WAIT_MS)
        # stopped at its first yield, or (not interruptible) ran to its end; only the newer result is used
        assert steps == expected_steps and results == ["newer"]


def test_a_refinement_encodes_one_window_at_a_time_without_holding_the_model_lock(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(stack(n=1, shape=(200, 180))[0], name="big")  # larger than test-tiny's window
    widget = dock(viewer, qtbot)
    widget.scales_combo.setCurrentText("1")
    widget.add_point((150, 30))
    wait_predictions(qtbot, widget, 1)
    shown = widget._current_preds[()]
    job = widget._refine_job(widget.model_picker.choice(), [((), shown.prompt)], "analytic", 0.0, 3, widget.image_layer)
    windows = 0
    while True:
        try:
            next(job)
        except StopIteration as done:
            results = done.value
            break
        windows += 1
        assert widget._model_lock.acquire(blocking=False)  # free between the steps
        widget._model_lock.release()
    assert windows == 3  # one step per scale (the first scale's window is cached from the click)
    assert len(results) == 1 and results[0].refined and results[0].scales == 3
    assert results[0].prediction.mask.shape == (200, 180)


def one_clicked_plane(make_napari_viewer, qtbot):
    """A docked annotator on a 96x128 plane with one click predicted."""
    viewer = make_napari_viewer()
    plane = stack(n=1, shape=(96, 128))[0]
    viewer.add_image(plane, name="cells")
    widget = dock(viewer, qtbot)
    widget.add_point((30, 36))
    wait_predictions(qtbot, widget, 1)
    return widget, plane


def test_zoom_re_predicts_the_prompts_at_the_new_scale(make_napari_viewer, qtbot):
    from napari_ruac.model.scale import auto_zoom

    widget, plane = one_clicked_plane(make_napari_viewer, qtbot)
    # 'auto' to start: the plane is seen at the zoom of its objects' size
    assert widget.zoom_spin.text() == "auto" and widget._predictor.auto_zoom
    assert widget._predictor.zoom == auto_zoom(plane)
    for value, zoom in ((0.5, 0.5), (1.0, 1.0)):
        before = widget.predictions_applied
        widget.zoom_spin.setValue(value)  # no new prompt: the change alone re-predicts
        wait_predictions(qtbot, widget, before + 1)
        assert not widget._predictor.auto_zoom and widget._predictor.zoom == zoom
        assert widget._predictor._frame_for(plane.shape).scale == zoom
        assert widget.current.data.shape == plane.shape  # masks stay at the image's size
        assert widget.uncertainty.data.shape == plane.shape


def test_auto_zoom_estimates_a_shown_plane_before_it_is_clicked(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    data = stack(n=5, shape=(64, 64))
    data[3] = np.nan  # a bad plane: shown without a notification, reported when clicked
    viewer.add_image(data, name="cells")
    widget = dock(viewer, qtbot)
    assert widget.zoom_spin.text() == "auto"
    viewer.dims.set_point(0, 0)
    widget.add_point((0, 15, 18))  # the first click loads the model
    wait_predictions(qtbot, widget, 1)
    predictor = widget._predictor
    assert predictor.knows_zoom(data[0]) and not predictor.knows_zoom(data[2])
    for z in (1, 3, 2):  # scrolling: only the plane it stops at needs estimating
        viewer.dims.set_point(0, z)
    qtbot.waitUntil(lambda: not widget.zoom_runner.busy, timeout=WAIT_MS)
    assert predictor.knows_zoom(data[2]) and predictor.plane_zoom(data[2]) > 0
    # the first click on plane 2 is predicted at the zoom estimated while it was shown
    widget.add_point((2, 15, 18))
    wait_predictions(qtbot, widget, 2)
    assert widget._predictor is predictor and predictor.zoom == predictor.plane_zoom(data[2])
    assert widget.current.data[2].any()
    # with a fixed zoom there is nothing to estimate
    widget.zoom_spin.setValue(1.0)
    wait_predictions(qtbot, widget, 3)
    viewer.dims.set_point(0, 4)
    assert not widget.zoom_runner.busy and predictor.knows_zoom(data[4])


def test_views_setting_re_predicts_with_the_same_model(make_napari_viewer, qtbot):
    widget, plane = one_clicked_plane(make_napari_viewer, qtbot)
    assert len(widget._predictor.views) == 4  # auto, for a native-scale model
    model, shown = widget._predictor.model, widget.uncertainty.data.copy()
    before = widget.predictions_applied
    widget.views_combo.setCurrentText("1")  # no new prompt: the change alone re-predicts
    wait_predictions(qtbot, widget, before + 1)
    assert len(widget._predictor.views) == 1 and widget._predictor.model is model  # not reloaded
    assert widget.uncertainty.data.shape == plane.shape and not np.array_equal(widget.uncertainty.data, shown)


def test_a_click_is_shown_at_one_scale_then_refined_at_three(make_napari_viewer, qtbot):
    from napari_ruac import Predictor

    widget, plane = one_clicked_plane(make_napari_viewer, qtbot)
    predictor = widget._predictor
    assert widget.scales_combo.currentText() == "1, then 3"
    # the one-scale result came first (the latency reported), the three-scale one replaced it
    assert widget.predictions_applied == 2 and widget._current_preds[()].scales == 3
    assert widget._current_preds[()].refined and widget.last_latency_s is not None
    assert "(3 scales)" in widget.status.text()
    three = Predictor(predictor.model, scales=3)
    three.zoom = "auto"
    three.set_image(plane)
    np.testing.assert_allclose(widget.uncertainty.data, three.predict(points=[(30, 36)]).uncertainty, atol=1e-6)
    refined = widget.uncertainty.data.copy()
    # one scale only: re-predicted (same predictor, embeddings kept), not refined
    widget.scales_combo.setCurrentText("1")
    wait_predictions(qtbot, widget, 3)
    assert widget.predictions_applied == 3 and widget._current_preds[()].scales == 1
    assert widget._predictor is predictor and predictor.scales == (1.0,)
    assert not np.array_equal(widget.uncertainty.data, refined)
    widget.scales_combo.setCurrentText("3")  # three at once
    wait_predictions(qtbot, widget, 4)
    assert widget.predictions_applied == 4 and widget._current_preds[()].scales == 3
    assert not widget._current_preds[()].refined  # the response to the change itself
    np.testing.assert_array_equal(widget.uncertainty.data, refined)
    # back to "1, then 3" with the three scales' embeddings cached: decoded at three at once
    widget.scales_combo.setCurrentText("1, then 3")
    wait_predictions(qtbot, widget, 5)
    assert widget._current_preds[()].scales == 3 and not widget._current_preds[()].refined
    np.testing.assert_array_equal(widget.uncertainty.data, refined)
    qtbot.wait(200)
    assert widget.predictions_applied == 5  # no refinement followed
    # a newer click while a refinement is pending or running: the stale refinement is not shown
    predictor.clear_cache()  # (no job is running) so that the clicks are refined again
    widget.add_point((60, 90))
    widget.add_point((62, 92))
    wait_predictions(qtbot, widget, 6)
    shown = widget._current_preds[()]
    assert shown.scales == 3 and shown.refined and len(shown.prompt.points) == 3




def test_on_a_plane_larger_than_the_window_the_layers_hold_exactly_the_newest_maps(make_napari_viewer, qtbot):
    """Clicks on a plane larger than the model's window rewrite the layers only where the last
    maps and the new ones can be non-zero (their extents); the layers must still equal the new
    prediction everywhere: after a click far from the last one, and after the user painted on
    the current-object layer outside both extents (the next click covers the painted box too,
    and so does every later one: napari's undo and redo of the paint write there silently)."""
    viewer = make_napari_viewer()
    image = np.random.default_rng(0).random((640, 640), dtype=np.float32)
    viewer.add_image(image, name="big")
    widget = dock(viewer, qtbot)

    def shown():
        pred = widget._current_preds[()].prediction
        assert pred.extent is not None and pred.extent != (0, 0, 640, 640)  # decoded in a window
        np.testing.assert_array_equal(widget.current.data, pred.mask)
        np.testing.assert_array_equal(widget.uncertainty.data, pred.uncertainty)
        np.testing.assert_array_equal(widget.overlay.data, pred.uncertainty > widget.threshold)
        return pred

    widget.add_point((40, 40))
    wait_predictions(qtbot, widget, 1)
    first = shown()
    widget.clear_prompts()
    n = widget.predictions_applied
    widget.add_point((600, 600))
    wait_predictions(qtbot, widget, n + 1)
    second = shown()
    a, b = first.extent, second.extent
    assert a[2] <= b[0]  # the windows do not overlap, so the first one's maps had to be erased
    assert first.uncertainty[a[0]:a[2], a[1]:a[3]].any()

    row = (a[2] + b[0]) // 2  # between the two extents
    widget.current.paint((row, 5), 1)
    assert widget.current.data[row, 5] == 1
    assert widget._known  # a paint it can read keeps the writes regional
    n = widget.predictions_applied
    widget.add_point((590, 610))  # a second click on the same object: a new prediction
    wait_predictions(qtbot, widget, n + 1)
    third = shown()  # the painted pixel is gone too
    assert third.extent[0] > row
    widget.current.undo()
    widget.current.redo()  # the painted pixel is back, and no event said so
    assert widget.current.data[row, 5] == 1
    n = widget.predictions_applied
    widget.add_point((600, 590))
    wait_predictions(qtbot, widget, n + 1)
    assert shown().extent[0] > row


def test_commits_on_a_plane_larger_than_the_window_write_and_measure_exactly_the_current_object(
        make_napari_viewer, qtbot):
    """Commit looks only where the current object can be (its planes' extents), and measures a
    new object there: the objects layer and the table must be what a whole-plane commit gives,
    and a pixel the user painted far from any prediction is committed too."""
    from napari_ruac._widgets.objects import measure_object

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(1).random((640, 640), dtype=np.float32), name="big")
    widget = dock(viewer, qtbot)
    expected = np.zeros((640, 640), np.uint32)
    for k, point in enumerate([(40, 40), (600, 600), (60, 70)], start=1):
        n = widget.predictions_applied
        widget.add_point(point)
        wait_predictions(qtbot, widget, n + 1)
        if k == 3:  # painted far from every extent: commit looks there too
            widget.current.paint((320, 5), 1)
        current = widget.current.data > 0
        assert current.any()
        expected[current & (expected == 0)] = k
        assert widget.commit() == k
        np.testing.assert_array_equal(widget.objects.data, expected)
        assert not widget.current.data.any()
        full = measure_object(k, widget.objects.data, widget.uncertainty.data, 0)
        rec = widget.records[k]
        assert (rec.area, rec.planes) == (full.area, full.planes)
        np.testing.assert_allclose(rec.centroid, full.centroid)
        assert rec.mean_uncertainty == pytest.approx(full.mean_uncertainty)
    assert expected[320, 5] == 3


def test_painted_boxes_reads_every_kind_of_napari_paint():
    """The widget keeps its writes regional after a paint only if it knows where the paint went:
    brush, bucket fill, polygon and data_setitem, as a real Labels layer reports them."""
    from napari.layers import Labels

    from napari_ruac._widgets.annotator import painted_boxes

    layer = Labels(np.zeros((4, 40, 50), np.uint8))
    got = []
    layer.events.paint.connect(lambda e: got.append(painted_boxes(e.value, layer.data.shape, 1)))
    layer.brush_size = 5
    layer.paint((2, 10, 20), 1)
    layer.fill((1, 30, 30), 2)  # the whole (empty) plane 1
    layer.data_setitem((np.array([0, 3]), np.array([5, 7]), np.array([6, 9])), 3)
    layer.paint_polygon([(2, 30, 30), (2, 35, 30), (2, 35, 40)], 4)
    assert len(got) == 4
    for boxes, value in zip(got, (1, 2, 3, 4)):
        painted = np.argwhere(layer.data == value)
        for plane in np.unique(painted[:, 0]):  # every painted pixel lies in its plane's box
            (r0, c0, r1, c1), = [box for p, box in boxes if p == (plane,)]
            rows, cols = painted[painted[:, 0] == plane, 1:].T
            assert r0 <= rows.min() and rows.max() < r1 and c0 <= cols.min() and cols.max() < c1
    assert [p for p, _ in got[0]] == [(2,)] and got[1] == [((1,), (0, 0, 40, 50))]
    assert got[0][0][1][2] - got[0][0][1][0] <= 6  # the brush's box, not the plane
    assert painted_boxes([object()], layer.data.shape, 1) is None  # unreadable: assume the worst
    assert painted_boxes([((np.array([1]), np.array([2])), 0, 1)], layer.data.shape, 1) is None


def test_a_box_drawn_past_the_image_edge_ends_at_it(make_napari_viewer, qtbot):
    """Boxing a nucleus on the image border: the part past the edge is dropped, not refused
    (a refused box would fail every later click on the plane until deleted)."""
    viewer = make_napari_viewer()
    viewer.add_image(stack(), name="cells")
    widget = dock(viewer, qtbot)
    h, w = widget.spatial_shape[-2:]
    widget.add_box((0,), (-4, w - 20, 20, w + 6))
    wait_predictions(qtbot, widget, 1)
    assert widget._shown_prompts[(0,)].box == (0.0, w - 20.0, 20.0, float(w))
    assert widget._current_preds[(0,)].prediction.mask.shape == (h, w)
    widget.add_box((1,), (-30, 5, -10, 25))  # wholly outside: refused, naming what was drawn
    assert widget.prompts_by_plane()[(1,)].box == (-30.0, 5.0, -10.0, 25.0)
    wait_predictions(qtbot, widget, 2)
    assert "outside the image" in widget.status.text()


def test_clicks_the_mask_does_not_follow_are_counted_and_reported(make_napari_viewer, qtbot):
    """The small models often leave a negative click inside the mask (34 of DSB2018's 48
    negative corrections): the status says so instead of leaving the user to wonder."""
    from napari_ruac._widgets.annotator import ignored_clicks

    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:15] = True
    points = [(7, 7), (15, 20), (8, 12.4), (1, 1), (-3, 7), (7, 40)]
    assert ignored_clicks(mask, points, [1, 1, 0, 0, 1, 0]) == (1, 1)  # off-plane points not counted
    assert ignored_clicks(mask, points[:1], [1]) == (0, 0)

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(3).random((48, 64), dtype=np.float32), name="img")
    widget = dock(viewer, qtbot)
    widget.add_point((20, 30))
    widget.add_point((22, 34), positive=False)
    wait_predictions(qtbot, widget, 1)
    shown = widget._current_preds[()]
    outside, inside = ignored_clicks(shown.prediction.mask, shown.prompt.points, shown.prompt.labels)
    text = widget.status.text()
    assert inside == 1  # (test-tiny's random weights cover the plane: the report is exercised)
    assert ("did not follow" in text) == bool(outside or inside)
    assert ("negative click inside it" in text) == bool(inside)
    assert ("positive click outside the mask" in text) == bool(outside)


def test_result_layers_from_an_earlier_session_are_rewritten_whole(make_napari_viewer, qtbot):
    """Binding an image again reuses its result layers, whose content the widget does not know:
    a current-object layer, even an empty one, may have paint history that an undo replays, so
    the next clicks rewrite whole planes rather than the extents."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((48, 64), dtype=np.float32), name="img")
    widget = dock(viewer, qtbot)
    assert widget._known
    image = viewer.layers["img"]
    widget.current.paint((10, 10), 1)
    widget.current.paint((10, 10), 0)  # all zero again, with a history to undo
    assert not widget.current.data.any()
    widget.bind_image(image)
    assert not widget._known
    widget.current.undo()  # (what it guards against: the erased stroke comes back, silently)
    assert widget.current.data.any()


def test_reprompt_never_loses_the_object(make_napari_viewer, qtbot):
    """Re-prompting keeps the object until a commit replaces it, on the planes prompted only:
    Clear (or binding another image) leaves it as it was, and its id is not given to another."""
    viewer = make_napari_viewer()
    viewer.add_image(stack(n=5), name="cells")
    widget = dock(viewer, qtbot)
    clicked_object(viewer, qtbot, widget, 1)
    assert widget.commit() == 1
    widget.objects.data[3, 5:9, 5:9] = 1  # (as if propagated to another plane)
    widget._record(1, float("nan"), widget.records[1].prompts)
    before = widget.objects.data.copy()
    widget.focus_object(1)
    widget.reprompt_selected()
    wait_predictions(qtbot, widget, 2)
    widget.clear_prompts()  # changed one's mind
    np.testing.assert_array_equal(widget.objects.data, before)
    assert 1 in widget.records
    widget.focus_object(1)
    widget.reprompt_selected()
    widget.bind_image(viewer.layers["cells"])  # bound again (the same layers): not re-prompting
    assert widget._reprompt_id is None
    n = widget.predictions_applied
    widget.add_point((2, 30, 40))  # an unrelated object gets a new id
    wait_predictions(qtbot, widget, n + 1)
    assert widget.commit() == 2
    widget.focus_object(1)
    widget.reprompt_selected()
    n = widget.predictions_applied
    widget.add_point((1, 16, 19))
    wait_predictions(qtbot, widget, n + 1)
    current = widget.current.data[1] > 0
    assert widget.commit() == 1
    after = widget.objects.data
    np.testing.assert_array_equal(after[3], before[3])  # the plane not prompted stays
    assert not ((after[1] == 1) & ~current).any()  # the prompted plane is the new mask...
    assert ((after[1] == 1) == (current & ((before[1] == 0) | (before[1] == 1)))).all()  # ...where free
    assert (after == 2).sum() > 0  # the other object is untouched


def test_a_bad_plane_fails_alone_and_commit_waits_for_the_newest_mask(make_napari_viewer, qtbot):
    """A click outside the image (or on a NaN plane) fails that plane only: the other planes'
    prompts still predict, and the error is not repeated on every later click. Commit refuses
    while the newest prompts' mask is still being computed."""
    from napari.utils.notifications import notification_manager

    image = stack(n=4).astype(np.float32)
    image[3, 4, 4] = np.nan
    viewer = make_napari_viewer()
    viewer.add_image(image, name="cells")
    widget = dock(viewer, qtbot)
    start = len(notification_manager.records)
    widget.add_point((1, -3, 18))  # just above the image
    wait_predictions(qtbot, widget, 1)
    assert "no mask" in widget.status.text() and widget.progress.maximum() > 0
    widget.add_point((3, 15, 18))  # a NaN plane
    wait_predictions(qtbot, widget, 2)
    widget.add_point((2, 15, 18))  # a good plane
    wait_predictions(qtbot, widget, 3)
    assert widget.current.data[2].any() and not widget.current.data[1].any()
    errors = [str(r.message) for r in notification_manager.records[start:] if r.severity == "error"]
    assert len(errors) == 2, errors  # once per bad plane, not again on the good click
    assert any("plane (1,)" in e and "outside the image" in e for e in errors)
    assert any("plane (3,)" in e and "NaN" in e for e in errors)
    widget.add_point((2, 20, 22))
    assert widget.commit() is None  # its mask is not shown yet
    wait_predictions(qtbot, widget, 4)
    assert widget.commit() == 1


def test_propagate_right_after_a_commit_carries_the_committed_object(make_napari_viewer, qtbot):
    """Commit selects the new object, so Propagate (or Delete) right after acts on it instead
    of asking for a selection."""
    viewer = make_napari_viewer()
    viewer.add_image(stack(n=5), name="cells")
    widget = dock(viewer, qtbot)
    clicked_object(viewer, qtbot, widget, 2)
    assert widget.commit() == 1
    assert widget.selected_object() == 1 and widget.object_table.selectionModel().selectedRows()
    widget.propagate()
    qtbot.waitUntil(lambda: not widget.task_runner.busy, timeout=WAIT_MS)
    assert 2 in widget.propagation_curve(1)


def test_prompts_left_on_an_image_are_shown_again_when_it_is_bound_again(make_napari_viewer, qtbot):
    """Switching images and back: the first image's uncommitted prompts are predicted again (the
    mask shown is what a commit takes, not a click merged with an invisible leftover) and can
    be undone."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((48, 64), dtype=np.float32), name="a")
    viewer.add_image(np.random.default_rng(1).random((40, 40), dtype=np.float32), name="b")
    widget = dock(viewer, qtbot)
    widget.image_combo.setCurrentText("a")
    n = widget.predictions_applied
    widget.add_point((20, 30))
    wait_predictions(qtbot, widget, n + 1)
    shown = widget.current.data.copy()
    widget.image_combo.setCurrentText("b")
    assert widget.image_layer.name == "b"
    n = widget.predictions_applied
    widget.image_combo.setCurrentText("a")
    wait_predictions(qtbot, widget, n + 1)
    assert widget._shown_prompts[()].points == ((20.0, 30.0),)
    np.testing.assert_array_equal(widget.current.data, shown)
    widget.undo()
    assert len(widget.prompts.data) == 0

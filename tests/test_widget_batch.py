"""The batch widget (Plugins menu) running napari_ruac.batch.segment_files in a worker, on real
TIFF stacks, with the `test-tiny` model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FAST = dict(pred_iou_thresh=-1.0, stability_score_thresh=0.0, threads=1)
WAIT_MS = 120_000


def write_stacks(folder, n_files, shape=(3, 32, 40)):
    paths = []
    for i in range(n_files):
        rng = np.random.default_rng(i)
        paths.append(folder / f"stack{i}.tif")
        tifffile.imwrite(paths[-1], (rng.random(shape) * 1000).astype(np.uint16))
    return paths


def dock(viewer, out):
    _, widget = viewer.window.add_plugin_dock_widget("napari-ruac", "Batch segmentation")
    widget.model_picker.model_combo.setCurrentText("test-tiny")
    widget.points_spin.setValue(4)
    widget.max_unc_spin.setValue(1.0)
    widget.extra_options = dict(FAST)
    widget.output_edit.setText(str(out))
    return widget


def leftovers(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp") or ".ruac-work" in p.parts)


def test_batch_two_stacks_from_a_folder_and_open_results(make_napari_viewer, qtbot, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_stacks(src, 2)
    out = tmp_path / "out"
    viewer = make_napari_viewer()
    widget = dock(viewer, out)
    widget.add_inputs([src])
    assert [p.split("/")[-1] for p in widget.inputs()] == ["stack0.tif", "stack1.tif"]
    widget.zoom_spin.setValue(0.5)
    widget.run_button.click()
    assert widget.running and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.error is None, widget.error
    assert widget.summary.ok and len(widget.summary.succeeded) == 2
    # one progress report per plane, ending at the total
    assert [r.done_planes for r in widget.reports][-1] == 6 and widget.reports[-1].total_planes == 6
    assert widget.progress.value() == widget.progress.maximum()
    for stem in ("stack0", "stack1"):
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        unc = tifffile.imread(out / f"{stem}_uncertainty.tif")
        assert labels.shape == unc.shape == (3, 32, 40) and unc.dtype == np.float32
        assert f"{stem} labels" in viewer.layers and f"{stem} uncertainty" in viewer.layers
        layer = viewer.layers[f"{stem} uncertainty"]
        assert tuple(layer.contrast_limits) == (0.0, 1.0)
        np.testing.assert_array_equal(viewer.layers[f"{stem} labels"].data, labels)
        assert json.loads((out / f"{stem}_metadata.json").read_text())["parameters"]["zoom"] == 0.5
    assert leftovers(out) == []
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_zoom_starts_at_auto_the_lowest_zoom_setting_and_scales_are_passed_on(make_napari_viewer, qtbot, tmp_path):
    inputs = write_stacks(tmp_path, 1)
    out = tmp_path / "out"
    widget = dock(make_napari_viewer(), out)
    widget.add_inputs(inputs)
    assert widget.zoom_spin.value() == widget.zoom_spin.minimum() and widget.zoom_spin.text() == "auto"
    assert widget.scales_combo.currentText() == "1"
    widget.scales_combo.setCurrentText("3")
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.error is None and widget.summary.ok, widget.error
    parameters = json.loads((out / "stack0_metadata.json").read_text())["parameters"]
    assert parameters["zoom"] == "auto" and parameters["scales"] == 3


def test_cancel_midway_leaves_no_partial_files(make_napari_viewer, qtbot, tmp_path):
    inputs = write_stacks(tmp_path, 3, shape=(6, 48, 48))
    out = tmp_path / "out"
    viewer = make_napari_viewer()
    widget = dock(viewer, out)
    widget.add_inputs(inputs)
    # the user presses Cancel as soon as the first plane is reported
    widget._relay.report.connect(lambda _r: widget.cancel_button.click() if widget.cancel_button.isEnabled() else None)
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    summary = widget.summary
    assert summary is not None and summary.cancelled
    assert "cancelled" in widget.status.text()
    statuses = [f.status for f in summary.files]
    assert "cancelled" in statuses
    # every input has either its complete set of outputs or nothing at all
    for f in summary.files:
        stem = f.input.split("/")[-1][:-4]
        present = sorted(p.name for p in out.glob(f"{stem}_*"))
        if f.status == "done":
            assert len(present) == 4, present
        else:
            assert present == [], present
    assert leftovers(out) == []
    assert not any(name.endswith(" uncertainty") for name in viewer.layers)  # nothing opened


def test_bad_inputs_and_missing_output_are_notified(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    (tmp_path / "broken.tif").write_bytes(b"not a tiff at all")
    good = write_stacks(tmp_path, 1, shape=(2, 32, 32))
    viewer = make_napari_viewer()
    widget = dock(viewer, tmp_path / "out")
    before = len(notification_manager.records)
    widget.output_edit.setText("")
    widget.add_inputs([tmp_path / "broken.tif", *good])
    widget.run()
    assert not widget.running
    assert any("output folder" in str(n.message) for n in notification_manager.records[before:])
    widget.output_edit.setText(str(tmp_path / "out"))
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    messages = [str(n.message) for n in notification_manager.records[before:]]
    assert any("broken.tif" in m for m in messages), messages
    assert [f.status for f in widget.summary.files] == ["failed", "done"]
    assert not (tmp_path / "out" / "broken_labels.tif").exists()


def test_a_folder_lists_what_segment_would_take_and_a_zarr_store_is_one_input(make_napari_viewer, tmp_path):
    import zarr

    src = tmp_path / "in"
    src.mkdir()
    write_stacks(src, 1)
    z = zarr.open_array(str(src / "cells.zarr"), mode="w", shape=(2, 32, 32), chunks=(1, 32, 32), dtype="u2")
    z[:] = 7
    (src / "notes.txt").write_text("not an image")
    tifffile.imwrite(src / "big.btf", np.zeros((32, 32), np.uint16))
    widget = dock(make_napari_viewer(), tmp_path / "out")
    widget.add_inputs([src])
    assert [p.split("/")[-1] for p in widget.inputs()] == ["big.btf", "cells.zarr", "stack0.tif"]
    widget.file_list.clear()
    widget.add_inputs([src / "cells.zarr"])  # a store picked as a folder is one image, not a folder of them
    assert widget.inputs() == [str(src / "cells.zarr")]


def test_another_input_of_the_same_name_fails_unless_replacing_is_ticked(make_napari_viewer, qtbot, tmp_path):
    """Two days' `stack0.tif` into one output folder: the second run fails that input and keeps
    the first day's results, unless the widget's overwrite box is ticked."""
    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    day1.mkdir()
    day2.mkdir()
    write_stacks(day1, 1)
    tifffile.imwrite(day2 / "stack0.tif", (np.random.default_rng(9).random((3, 32, 40)) * 1000).astype(np.uint16))
    out = tmp_path / "out"
    viewer = make_napari_viewer()
    widget = dock(viewer, out)
    widget.open_check.setChecked(False)
    for folder, tick, ok in ((day1, False, True), (day2, False, False), (day2, True, True)):
        widget.file_list.clear()
        widget.add_inputs([folder / "stack0.tif"])
        widget.overwrite_check.setChecked(tick)
        widget.run_button.click()
        qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
        assert widget.error is None, widget.error
        assert widget.summary.ok == ok
        source = json.loads((out / "stack0_metadata.json").read_text())["input"]
        source = source.get("path") if isinstance(source, dict) else source
        assert str(day1 if not tick else day2) in str(source)
        if not ok:
            assert "same name" in widget.summary.failures[0].reason


def test_closing_napari_mid_batch_stops_it_after_the_current_plane(make_napari_viewer, qtbot, tmp_path):
    """napari asks every running worker to quit when its window closes; the batch (a function
    worker, which would ignore that) stops after the plane it is on, as with Cancel, instead of
    keeping the process alive without a window until every file is done."""
    inputs = write_stacks(tmp_path, 3, shape=(6, 48, 48))
    out = tmp_path / "out"
    viewer = make_napari_viewer()
    widget = dock(viewer, out)
    widget.add_inputs(inputs)
    first = []
    widget._relay.report.connect(lambda r: first.append(r))
    widget.run_button.click()
    worker = widget.worker
    qtbot.waitUntil(lambda: bool(first), timeout=WAIT_MS)
    assert viewer.window._task_status_manager.is_busy()  # napari knows of the batch
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=WAIT_MS)
    done = [p for p in inputs if (out / f"{p.stem}_labels.tif").exists()]
    assert len(done) < len(inputs)  # stopped early (3 stacks of 6 planes)
    for p in inputs:  # each input has its complete outputs or none at all
        present = sorted(q.name for q in out.glob(f"{p.stem}_*"))
        assert len(present) in (0, 4), present
    assert [x for x in leftovers(out) if x.endswith(".tmp")] == []

"""The fine-tune widget on a real napari viewer: trains the `test-tiny` model on an image layer
and its objects Labels layer in a child `napari-ruac train` process, reports every step, cancels,
exports a model file that loads; a failing or killed child leaves the viewer alive with a
notification and no model file; closing the viewer stops the child."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
import torch
from napari.utils.notifications import notification_manager

from napari_ruac.training.synthetic import SyntheticMicroscopy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
WAIT_MS = 150_000


@pytest.fixture
def annotated_viewer(make_napari_viewer):
    torch.set_num_threads(1)
    viewer = make_napari_viewer()
    gen = SyntheticMicroscopy(seed=5)
    planes = [gen.sample(i, 96, mode="fluorescence") for i in range(2)]
    viewer.add_image(np.stack([p.image for p in planes]), name="cells")
    labels = np.stack([p.labels for p in planes]).astype(np.uint32)
    labels[1] = 0  # only the first plane is annotated: the second must be skipped
    viewer.add_labels(labels, name="cells objects")
    return viewer


def make_widget(viewer, tmp_path, steps):
    from napari_ruac._widgets.finetune import FinetuneWidget

    widget = FinetuneWidget(viewer)
    widget.model_picker.model_combo.setCurrentText("test-tiny")
    widget.steps_spin.setValue(steps)
    widget.crop_spin.setValue(128)
    widget.batch_spin.setValue(1)
    widget.lr_spin.setValue(1e-3)
    widget.run_dir_edit.setText(str(tmp_path / "run"))
    widget.output_edit.setText(str(tmp_path / "tuned.pt"))
    widget.threads = 1  # the child's torch threads (tests share a small machine)
    return widget


def errors_since(start: int) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == "error"]


def assert_no_training_stack_here(before: bool):
    # the trainer (and torch_geometric, which imports triton) ran in the child only; ``before``:
    # whether an earlier test of the session had imported it in this process already
    if not before:
        assert "torch_geometric" not in sys.modules


def test_finetune_trains_reports_progress_and_exports_a_model(annotated_viewer, qtbot, tmp_path):
    tg_before = "torch_geometric" in sys.modules
    from napari_ruac import load_model

    widget = make_widget(annotated_viewer, tmp_path, steps=4)
    assert widget.image_combo.currentText() == "cells"
    assert widget.labels_combo.currentText() == "cells objects"
    assert widget.recipe(widget.model_picker.choice())["variant"] == "bayes"
    with qtbot.waitSignal(widget.checkpoint_ready, timeout=WAIT_MS) as ready:
        widget.run_button.click()
        assert widget.running and not widget.run_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.error is None, widget.error
    assert [r.step for r in widget.results] == [1, 2, 3, 4]
    assert widget.progress.value() == widget.progress.maximum() == 4
    assert "finished after 4 steps" in widget.status.text()
    assert ready.args == [str(tmp_path / "tuned.pt")]
    model = load_model(tmp_path / "tuned.pt")
    assert model.info["metadata"]["steps"] == 4
    assert model.config.image_size == 128  # test-tiny's architecture, now fine-tuned
    assert (tmp_path / "run" / "log.csv").is_file()
    # a child process trained: on the annotated plane only, from the recipe it was given
    assert widget.process.pid != os.getpid() and widget.process.returncode == 0
    assert sorted(p.name for p in (tmp_path / "run" / "data" / "images").iterdir()) == ["0000.tif"]
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    assert_no_training_stack_here(tg_before)


def test_full_ruac_trains_with_the_attackers_in_the_child(annotated_viewer, qtbot, tmp_path):
    tg_before = "torch_geometric" in sys.modules
    from napari_ruac import load_model
    from napari_ruac.training.trainer import read_log

    widget = make_widget(annotated_viewer, tmp_path, steps=3)
    widget.crop_spin.setValue(64)
    widget.variant_combo.setCurrentIndex(1)
    assert widget.recipe(widget.model_picker.choice())["variant"] == "ruac"
    with qtbot.waitSignal(widget.checkpoint_ready, timeout=WAIT_MS):
        widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.error is None, widget.error
    assert [r.step for r in widget.results] == [1, 2, 3]
    rows = read_log(tmp_path / "run" / "log.csv")
    assert [r["adv_seg"] != "" for r in rows] == [False, True, True]  # attackers from step 2 (adv_start 1)
    assert load_model(tmp_path / "tuned.pt").info["metadata"]["variant"] == "ruac"
    assert widget.process.pid != os.getpid()
    assert_no_training_stack_here(tg_before)


def test_cancel_stops_between_steps_and_keeps_what_was_learned(annotated_viewer, qtbot, tmp_path):
    widget = make_widget(annotated_viewer, tmp_path, steps=500)
    widget.run_button.click()
    qtbot.waitUntil(lambda: len(widget.results) >= 1, timeout=WAIT_MS)
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.error is None, widget.error
    done = widget.results[-1].step
    assert 1 <= done < 500
    assert f"cancelled after {done} steps" in widget.status.text()
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == done
    assert (tmp_path / "tuned.pt").is_file()


def test_a_failing_child_gives_a_notification_and_no_model(annotated_viewer, qtbot, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    widget = make_widget(annotated_viewer, tmp_path, steps=3)
    widget.model_picker.model_combo.setCurrentText("checkpoint file…")
    widget.model_picker.path_edit.setText(str(bad))
    seen = len(notification_manager.records)
    widget.run_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    errors = errors_since(seen)
    assert len(errors) == 1 and errors[0].startswith("fine-tune failed: the training process failed (exit code 1)")
    # the child's own message, from its stderr
    assert f"napari-ruac train: error: {bad} is not a PyTorch checkpoint" in errors[0]
    assert "failed:" in widget.status.text() and widget.run_button.isEnabled()
    assert not (tmp_path / "tuned.pt").exists() and widget.output_path is None
    annotated_viewer.add_points([[1, 1]])  # the viewer is alive and usable
    assert len(annotated_viewer.layers) == 3


def test_a_child_killed_midway_is_reported_and_leaves_no_model(annotated_viewer, qtbot, tmp_path):
    widget = make_widget(annotated_viewer, tmp_path, steps=500)
    seen = len(notification_manager.records)
    widget.run_button.click()
    qtbot.waitUntil(lambda: len(widget.results) >= 1, timeout=WAIT_MS)
    os.kill(widget.process.pid, signal.SIGKILL)
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    errors = errors_since(seen)
    assert len(errors) == 1 and "killed by SIGKILL" in errors[0], errors
    assert not (tmp_path / "tuned.pt").exists()
    assert widget.run_button.isEnabled() and annotated_viewer.layers["cells"].data.shape == (2, 96, 96)


def test_closing_the_viewer_stops_the_child(annotated_viewer, qtbot, tmp_path):
    widget = make_widget(annotated_viewer, tmp_path, steps=500)
    annotated_viewer.window.add_dock_widget(widget)
    seen = len(notification_manager.records)
    widget.run_button.click()
    qtbot.waitUntil(lambda: len(widget.results) >= 1, timeout=WAIT_MS)
    widget.close_grace_s = 60.0  # time enough, on a loaded machine, to stop gracefully
    process = widget.process
    annotated_viewer.close()
    qtbot.waitUntil(lambda: not process.alive, timeout=WAIT_MS)
    # asked to stop, the child stopped after a step and still exported what it learned
    assert process.returncode == 0 and process.stop_requested
    assert (tmp_path / "tuned.pt").is_file()
    assert errors_since(seen) == []  # stopping on close is not a failure to report


def test_unannotated_labels_are_refused_with_a_message(make_napari_viewer, tmp_path):
    from napari_ruac._widgets.finetune import annotated_planes

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.float32), name="img")
    viewer.add_labels(np.zeros((64, 64), np.uint32), name="img objects")
    widget = make_widget(viewer, tmp_path, steps=3)
    widget.run_button.click()
    assert not widget.running
    assert "holds no objects" in widget.status.text()
    assert not (tmp_path / "run").exists() and not (tmp_path / "tuned.pt").exists()
    with pytest.raises(ValueError, match="same shape"):
        annotated_planes(np.zeros((4, 5)), np.zeros((4, 6), np.uint8), rgb=False)

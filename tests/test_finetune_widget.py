"""The fine-tune widget on a real napari viewer: trains the `test-tiny` model on an image layer
and its objects Labels layer in a thread worker, reports every step, cancels, exports a model
file that loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    return widget


def test_finetune_trains_reports_progress_and_exports_a_model(annotated_viewer, qtbot, tmp_path):
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

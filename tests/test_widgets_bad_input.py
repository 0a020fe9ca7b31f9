"""Bad input at the napari end, with a real viewer: a float labels file beside an uncertainty
map (Fiji saves label images as 32-bit float), the fine-tune widget given a folder as its model
file or a file as its run folder (refused before training, not at the export after it), and a
multiscale image layer (its full resolution is what fits the labels)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from napari.utils.notifications import notification_manager

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
WAIT_MS = 150_000


def errors_since(start: int) -> list[str]:
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == "error"]


def test_a_float_labels_file_of_whole_numbers_opens_and_a_fractional_one_is_named(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = np.zeros((8, 8), np.float32)
    labels[2:4, 2:4] = 3
    tifffile.imwrite(tmp_path / "fiji_labels.tif", labels)
    tifffile.imwrite(tmp_path / "fiji_uncertainty.tif", np.full((8, 8), 0.5, np.float32))
    viewer.open(str(tmp_path / "fiji_uncertainty.tif"), plugin="napari-ruac")
    assert viewer.layers["fiji labels"].data.dtype.kind == "u"
    np.testing.assert_array_equal(viewer.layers["fiji labels"].data, labels)
    assert "fiji uncertainty" in viewer.layers

    tifffile.imwrite(tmp_path / "soft_labels.tif", labels / 2)  # 1.5: not a label
    tifffile.imwrite(tmp_path / "soft_uncertainty.tif", np.zeros((8, 8), np.float32))
    with pytest.raises(Exception, match=r"soft_labels.tif is not a labels image: its float32 values are not all whole"):
        viewer.open(str(tmp_path / "soft_uncertainty.tif"), plugin="napari-ruac")
    assert len(viewer.layers) == 2


def _finetune(viewer, tmp_path, steps=1):
    from napari_ruac._widgets.finetune import FinetuneWidget

    widget = FinetuneWidget(viewer)
    widget.model_picker.model_combo.setCurrentText("test-tiny")
    widget.steps_spin.setValue(steps)
    widget.crop_spin.setValue(64)
    widget.batch_spin.setValue(1)
    widget.run_dir_edit.setText(str(tmp_path / "run"))
    widget.output_edit.setText(str(tmp_path / "tuned.pt"))
    widget.threads = 1
    return widget


def _annotated(viewer, multiscale=False):
    rng = np.random.default_rng(1)
    image = (rng.random((96, 96)) * 200).astype(np.float32)
    labels = np.zeros((96, 96), np.uint32)
    labels[20:40, 20:40] = 1
    image[labels > 0] += 500
    viewer.add_image([image, image[::2, ::2]] if multiscale else image, name="cells", multiscale=multiscale)
    viewer.add_labels(labels, name="cells objects")


def test_finetune_refuses_a_folder_as_model_file_and_a_file_as_run_folder_before_training(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _annotated(viewer)
    widget = _finetune(viewer, tmp_path)
    (tmp_path / "models").mkdir()
    widget.output_edit.setText(str(tmp_path / "models"))
    seen = len(notification_manager.records)
    widget.run_button.click()
    assert not widget.running and widget.process is None  # no child was started
    assert errors_since(seen) == [f"fine-tune: 'save model to' {tmp_path / 'models'} is a folder: give a file name, "
                                  f"e.g. {tmp_path / 'models' / 'finetuned.pt'}"]
    assert not (tmp_path / "run").exists()

    (tmp_path / "notes").write_text("the user's notes")
    widget.output_edit.setText("")
    widget.run_dir_edit.setText(str(tmp_path / "notes" / "run"))
    seen = len(notification_manager.records)
    widget.run_button.click()
    assert not widget.running and widget.process is None
    assert errors_since(seen) == [f"fine-tune: the run folder {tmp_path / 'notes' / 'run'} cannot be created: "
                                  f"{tmp_path / 'notes'} is a file, not a folder"]
    assert (tmp_path / "notes").read_text() == "the user's notes"
    assert widget.run_button.isEnabled() and "is a file" in widget.status.text()


def test_finetune_trains_on_the_full_resolution_of_a_multiscale_image(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    _annotated(viewer, multiscale=True)
    widget = _finetune(viewer, tmp_path)
    seen = len(notification_manager.records)
    widget.run_button.click()
    assert widget.running, widget.status.text()  # not "the image (48, 48) and the labels (96, 96) ..."
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert errors_since(seen) == [] and widget.error is None, widget.error
    assert (tmp_path / "tuned.pt").is_file()
    assert tifffile.imread(tmp_path / "run" / "data" / "images" / "0000.tif").shape == (96, 96)


def test_batch_names_a_missing_or_unchosen_checkpoint_file_before_starting(make_napari_viewer, tmp_path):
    _, widget = make_napari_viewer().window.add_plugin_dock_widget("napari-ruac", "Batch segmentation")
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((32, 32), np.uint16))
    widget.add_inputs([tmp_path / "s.tif"])
    widget.output_edit.setText(str(tmp_path / "out"))
    widget.model_picker.model_combo.setCurrentText("checkpoint file…")
    for path, message in (("", "batch: choose a checkpoint file first"),
                          (str(tmp_path / "gone.pt"), f"batch: checkpoint file not found: {tmp_path / 'gone.pt'}")):
        widget.model_picker.path_edit.setText(path)
        seen = len(notification_manager.records)
        widget.run_button.click()
        assert not widget.running
        assert errors_since(seen) == [message]  # was "unknown model '...gone.pt': expected a checkpoint path or ..."
    assert not (tmp_path / "out").exists()

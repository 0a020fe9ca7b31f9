"""Choosing a model and a device (shared by the annotator and the batch widget)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit,
                            QPushButton, QWidget)

CHECKPOINT_ENTRY = "checkpoint file…"


@dataclass(frozen=True)
class ModelChoice:
    """What to pass to ``load_model``: a registered name or our checkpoint's path, an optional
    weights file for official SAM2.1 configs, and the device."""

    name_or_path: str
    checkpoint: str | None
    device: str

    def load(self):
        """Load the model (call from a worker thread: official models take seconds)."""
        from ..model import load_model

        if self.name_or_path == CHECKPOINT_ENTRY:
            raise FileNotFoundError("choose a checkpoint file first")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {self.checkpoint}")
        return load_model(self.name_or_path, device=self.device, checkpoint=self.checkpoint)


def model_names() -> list[str]:
    from ..model.config import MODEL_SPECS

    return list(MODEL_SPECS)


class ModelPicker(QWidget):
    """Model combo (our models, the official SAM2.1 configs, or a checkpoint file), a weights
    file field (required for a checkpoint, optional for SAM2.1: else the cache/download is used)
    and a device combo listing what this machine has."""

    def __init__(self, parent=None, default: str = "micro") -> None:
        super().__init__(parent)
        from ..model.build import available_devices

        self.model_combo = QComboBox()
        self.model_combo.addItems([*model_names(), CHECKPOINT_ENTRY])
        self.model_combo.setCurrentText(default)
        self.model_combo.setToolTip(
            "micro: our small trained model (default). sam2.1_*: Meta's SAM2.1 (needs its .pt file; "
            "its uncertainty head is untrained until fine-tuned). checkpoint file: a model saved by "
            "`napari-ruac train`."
        )
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("weights file (.pt) — optional for SAM2.1, required for a checkpoint")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse)
        self.device_combo = QComboBox()
        self.device_combo.addItems(available_devices())
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.path_edit)
        row.addWidget(browse)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("model", self.model_combo)
        form.addRow("weights", row)
        form.addRow("device", self.device_combo)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model weights", "", "PyTorch checkpoints (*.pt *.pth *.ckpt)")
        if path:
            self.path_edit.setText(path)
            if not self.model_combo.currentText().startswith("sam2"):
                self.model_combo.setCurrentText(CHECKPOINT_ENTRY)

    def choice(self) -> ModelChoice:
        name = self.model_combo.currentText()
        path = self.path_edit.text().strip() or None
        device = self.device_combo.currentText()
        if name == CHECKPOINT_ENTRY:
            return ModelChoice(path or CHECKPOINT_ENTRY, None, device)
        if name.startswith("sam2"):
            return ModelChoice(name, path, device)
        return ModelChoice(name, None, device)


def zoom_spin_box(auto: bool = False, boxes: bool = False, start: float | str = 1.0) -> QDoubleSpinBox:
    """The "zoom for the model" setting of the annotator and the batch widget (Predictor's and
    AutomaticSegmenter's ``zoom``), ``start`` to start. With ``auto`` its lowest value reads
    "auto" (each plane's zoom from the size of its objects); :func:`zoom_of` turns it into the
    option. ``boxes``: its tooltip says that boxes set their own zoom (prompted segmentation)."""
    spin = QDoubleSpinBox()
    spin.setRange(0.0 if auto else 0.1, 4.0)
    spin.setSingleStep(0.25)
    spin.setDecimals(2)
    spin.setValue(spin.minimum() if start == "auto" else start)
    tip = ("resize the image for the model so objects look like the ones it learned (micro: nuclei "
           "about 8-60 px across): 0.5 for objects twice as large, 2 for tiny ones. Masks stay at "
           "the image's size; each zoom needs its own embeddings. ")
    if auto:
        spin.setSpecialValueText("auto")
        tip += ("'auto' (the lowest value): each plane at the zoom that shows its typical object at "
                "the size the model learned, estimated from the plane. ")
    if boxes:
        tip += ("Objects prompted with a box are seen at the zoom their box sets (box scaled to "
                "~32 px), whatever this says.")
    spin.setToolTip(tip)
    return spin


def zoom_of(spin: QDoubleSpinBox) -> float | str:
    """A zoom box's value as the ``zoom`` option: "auto" at its special (lowest) value."""
    if spin.specialValueText() and spin.value() == spin.minimum():
        return "auto"
    return spin.value()

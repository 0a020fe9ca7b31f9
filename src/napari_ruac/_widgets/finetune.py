"""Fine-tune a model on the user's own annotations (image layer + objects Labels layer).

The training runs in a child process, ``napari-ruac train`` on the annotated planes written
into the run folder (:mod:`napari_ruac.training.process`), never inside the viewer: the full
RUAC trainer imports torch_geometric -> torch._dynamo -> triton, which segfaults once napari has
an OpenGL context, and a crash or out-of-memory kill in training must not close the viewer with
the user's unsaved annotations. A napari thread worker reads the child's per-step JSON events
and yields them to the UI (progress bar, loss, IoU). Cancel asks the child to stop between
steps; it still saves and exports what was learned. Closing the widget or the viewer stops the
child (terminating it if it does not stop in time). The result is a checkpoint file the
annotator loads through its model picker ("checkpoint file…"), so correcting masks,
fine-tuning and correcting again is a loop.
"""

from __future__ import annotations

import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Signal
from qtpy.QtGui import QCloseEvent
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..training.process import (RECIPE_FILE, StepProgress, TrainingProcess, TrainingProcessError, prepare_run,
                                 train_command)
from .model_picker import CHECKPOINT_ENTRY, ModelPicker
from .runner import describe_error, shield_runtime_errors, show_worker_warning

VARIANTS = {"Bayesian (fast)": "bayes", "full RUAC (adversaries, slower)": "ruac"}


def default_run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path.home() / ".napari-ruac" / "finetune" / stamp


def annotated_planes(image: np.ndarray, labels: np.ndarray, rgb: bool) -> tuple[list, list]:
    """Pairs of (image plane, label plane) that hold at least one object.

    Leading axes are planes (z, t, ...); an RGB image keeps its colour axis last. Raises
    ValueError naming the problem when the layers do not fit together or nothing is annotated.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    spatial = image.shape[:-1] if rgb else image.shape
    if spatial != labels.shape:
        raise ValueError(f"the image {image.shape} and the labels {labels.shape} do not have the same shape")
    if labels.ndim < 2:
        raise ValueError(f"labels of shape {labels.shape} are not an image")
    lead = labels.shape[:-2]
    img_planes = image.reshape(-1, *image.shape[len(lead):]) if lead else image[None]
    lab_planes = labels.reshape(-1, *labels.shape[-2:]) if lead else labels[None]
    pairs = [(i, l) for i, l in zip(img_planes, lab_planes) if l.max() > 0]
    if not pairs:
        raise ValueError("the labels layer holds no objects: annotate (or commit) some objects first")
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _full_resolution(layer) -> np.ndarray:
    """A layer's pixels; of a multiscale layer the full-resolution level (``np.asarray`` of a
    multiscale layer's data gives another level, which then 'does not fit' the labels)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def _check_paths(run_dir: Path, output: Path) -> None:
    """ValueError naming the problem when the run folder cannot be made or the model file
    cannot be written there (a file in the way, a folder where the file should go)."""
    from ..io.imageio import file_in_the_way

    blocker = file_in_the_way(run_dir)
    if blocker is not None:
        raise ValueError(f"the run folder {run_dir} cannot be created: {blocker} is a file, not a folder")
    if output.is_dir():
        raise ValueError(f"'save model to' {output} is a folder: give a file name, e.g. {output / 'finetuned.pt'}")
    blocker = file_in_the_way(output.parent)
    if blocker is not None:
        raise ValueError(f"the model file {output} cannot be written: {blocker} is a file, not a folder")


class FinetuneWidget(QWidget):
    """Pick an image and its objects Labels layer, a base model and a step budget; train."""

    checkpoint_ready = Signal(str)  # the exported model file, when a run ends

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.process: TrainingProcess | None = None  # the training child of the current run
        self.results: list[StepProgress] = []  # the current run's steps (tests, status)
        self.output_path: Path | None = None
        self.error: BaseException | None = None
        self.threads: int | None = None  # torch threads of the child (None: torch's default)
        # the child must not outlive the widget: stop it when the widget is destroyed (the viewer
        # closed) or the application quits; those slots hold the guard, never the widget
        self._guard = _ChildGuard()
        self.destroyed.connect(self._guard.stop)
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._guard.stop)

        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.model_picker = ModelPicker(self, default="micro")
        self.variant_combo = QComboBox()
        self.variant_combo.addItems(list(VARIANTS))
        self.variant_combo.setToolTip("Bayesian: the uncertainty head and the model learn your data. "
                                      "Full RUAC also trains against style/shape attackers (about 2-3x slower).")
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100000)
        self.steps_spin.setValue(200)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1e-2)
        self.lr_spin.setSingleStep(1e-5)
        self.lr_spin.setValue(1e-4)
        self.crop_spin = QSpinBox()
        self.crop_spin.setRange(64, 1024)
        self.crop_spin.setSingleStep(32)
        self.crop_spin.setValue(256)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 64)
        self.batch_spin.setValue(2)
        self.freeze_check = QComboBox()
        self.freeze_check.addItems(["train the whole model", "freeze the image encoder"])
        self.run_dir_edit = QLineEdit(str(default_run_dir()))
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("model file to write (default: <run folder>/finetuned.pt)")
        self.run_button = QPushButton("Fine-tune")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("objects (labels)", self.labels_combo)
        form.addRow(self.model_picker)
        form.addRow("training", self.variant_combo)
        form.addRow("steps", self.steps_spin)
        form.addRow("learning rate", self.lr_spin)
        form.addRow("crop size", self.crop_spin)
        form.addRow("images per step", self.batch_spin)
        form.addRow("encoder", self.freeze_check)
        form.addRow("run folder", self.run_dir_edit)
        form.addRow("save model to", self.output_edit)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # ------------------------------------------------------------------ layers
    def _refresh_layers(self, *_) -> None:
        for combo, kind in ((self.image_combo, Image), (self.labels_combo, Labels)):
            current = combo.currentText()
            combo.clear()
            names = [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
        # prefer the annotator's "<image> objects" layer for the chosen image
        objects = f"{self.image_combo.currentText()} objects"
        if self.labels_combo.findText(objects) >= 0:
            self.labels_combo.setCurrentText(objects)

    # ------------------------------------------------------------------ recipe
    def recipe(self, choice) -> dict:
        """The training config this widget runs (the same schema as training/*.yaml)."""
        checkpoint = None if choice.name_or_path == CHECKPOINT_ENTRY else choice.checkpoint
        return {
            "name": "finetuned",
            "variant": self._variant(choice),
            "model": {"spec": choice.name_or_path, "init": "pretrained", "checkpoint": checkpoint},
            # "source" becomes the folder the annotated planes are written to (prepare_run)
            "data": {"source": "layers", "batch_size": self.batch_spin.value(), "crop_size": self.crop_spin.value(),
                     "large_sizes": [], "p_large": 0.0, "p_small": 0.0, "workers": 0},
            "optim": {"steps": self.steps_spin.value(), "lr": self.lr_spin.value(),
                      "encoder_lr": 0.0 if self.freeze_check.currentIndex() == 1 else None,
                      "warmup": max(1, min(50, self.steps_spin.value() // 10))},
            # fine-tuning starts from a trained model: KL at once, attackers after a short warm-up
            "curriculum": {"kl_start": 0, "adv_start": max(1, self.steps_spin.value() // 5),
                           "adv_ramp": max(1, self.steps_spin.value() // 5), "gamma": 0.5},
            "train": {"checkpoint_every": max(10, self.steps_spin.value() // 4), "val_every": 0},
        }

    def _variant(self, choice) -> str:
        from ..model.config import MODEL_SPECS

        spec = MODEL_SPECS.get(choice.name_or_path)
        if spec is not None and spec.config.head == "deterministic":
            return "det"
        return VARIANTS[self.variant_combo.currentText()]

    # ------------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        return self.worker is not None

    def run(self) -> None:
        if self.running:
            show_error("fine-tune: a run is already going")
            return
        try:
            image_layer = self.viewer.layers[self.image_combo.currentText()]
            labels_layer = self.viewer.layers[self.labels_combo.currentText()]
        except KeyError:
            show_error("fine-tune: choose an image layer and a labels layer with your objects")
            return
        run_dir = Path(self.run_dir_edit.text().strip() or default_run_dir())
        output = Path(self.output_edit.text().strip() or run_dir / "finetuned.pt")
        try:
            # checked now: the child would find an unusable model path only at its end, after training
            _check_paths(run_dir, output)
            images, labels = annotated_planes(_full_resolution(image_layer), _full_resolution(labels_layer),
                                              bool(image_layer.rgb))
        except ValueError as exc:
            show_error(f"fine-tune: {exc}")
            self.status.setText(str(exc))
            return
        choice = self.model_picker.choice()
        recipe = self.recipe(choice)
        self.results, self.error, self.output_path = [], None, None
        self.progress.setRange(0, recipe["optim"]["steps"])
        self.progress.setValue(0)
        self.status.setText(f"preparing {len(images)} annotated plane(s); starting the training process…")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        # copies: the user may keep editing the layers while the planes are written
        images = [np.array(i) for i in images]
        labels = [np.array(l) for l in labels]
        command = train_command(run_dir / RECIPE_FILE, run_dir, output, choice.device, self.threads)
        self.process = self._guard.process = TrainingProcess(command, run_dir)
        # superqt drops RuntimeErrors raised in generator workers: shielded like every other job
        self.worker = create_worker(shield_runtime_errors(self._job), self.process, recipe, images, labels,
                                    bool(image_layer.rgb), _start_thread=False, _ignore_errors=True)
        self.worker.yielded.connect(self._on_step)
        self.worker.warned.connect(show_worker_warning)
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    @staticmethod
    def _job(process: TrainingProcess, recipe, images, labels, rgb):
        """Worker thread: write the planes and the recipe, start the child, yield its steps."""
        prepare_run(process.run_dir, recipe, images, labels, rgb)
        process.start()
        summary = None
        for event in process.events():
            kind = event.get("event")
            if kind == "step":
                yield StepProgress(int(event["step"]), int(event.get("total") or 0), event.get("row") or {})
            elif kind == "warning":
                warnings.warn(event.get("message", "warning"), UserWarning, stacklevel=1)
            elif kind == "done":
                summary = event
        return {"path": summary["path"], "steps": summary["steps"], "cancelled": bool(summary["stopped"]),
                "run_dir": str(process.run_dir)}

    def cancel(self) -> None:
        """Stop after the current step; what was learned is still saved and exported."""
        if self.process is not None and self.running:
            self.process.request_stop()
            self.status.setText("stopping after this step…")

    @property
    def close_grace_s(self) -> float:
        """On close, how long the child may take to stop (and export) before it is terminated."""
        return self._guard.grace_s

    @close_grace_s.setter
    def close_grace_s(self, seconds: float) -> None:
        self._guard.grace_s = float(seconds)

    def shutdown(self) -> None:
        """Stop the training child now (the widget or the viewer is closing)."""
        self._guard.stop()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        self.shutdown()
        super().closeEvent(event)

    def _on_step(self, result: StepProgress) -> None:
        self.results.append(result)
        self.progress.setValue(result.step)
        row = result.row
        parts = [f"step {result.step}/{self.progress.maximum()}", f"loss {_num(row.get('loss')):.3f}"]
        if "train_iou" in row:
            parts.append(f"IoU {_num(row['train_iou']):.2f}")
        parts.append(f"{_num(row.get('sec', 0)):.1f} s/step")
        self.status.setText(", ".join(parts))

    def _on_done(self, summary: dict) -> None:
        self.output_path = Path(summary["path"])
        how = "cancelled" if summary["cancelled"] else "finished"
        text = (f"{how} after {summary['steps']} steps: model saved to {summary['path']} "
                f"(load it in the annotator as 'checkpoint file…'); log in {summary['run_dir']}")
        self.status.setText(text)
        show_info(f"fine-tune {how}: {summary['path']}")
        self.checkpoint_ready.emit(summary["path"])

    def _on_error(self, exc: BaseException) -> None:
        self.error = exc
        if self.process is not None and self.process.abandoned:
            return  # stopped because the widget or viewer is closing: nobody to tell
        # the child's own message (its last stderr lines) says more than a generic OOM hint
        message = str(exc) if isinstance(exc, TrainingProcessError) else describe_error(exc)
        show_error(f"fine-tune failed: {message}")
        self.status.setText(f"failed: {message}")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


class _ChildGuard:
    """The current run's child, stoppable from Qt's destroyed/aboutToQuit signals, which may
    fire when the widget's Python side is already gone."""

    def __init__(self, grace_s: float = 5.0) -> None:
        self.process: TrainingProcess | None = None
        self.grace_s = grace_s

    def stop(self, *_) -> None:
        if self.process is not None and self.process.alive:
            self.process.stop(self.grace_s)


def wait_until_idle(widget: FinetuneWidget, timeout_s: float = 120.0) -> bool:
    """Process Qt events until the run ends (scripts); False on timeout."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout_s
    while widget.running and time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)
    return not widget.running

"""Batch segmentation from napari's Plugins menu.

A thin front end to :func:`napari_ruac.batch.segment_files` (the same function the
``napari-ruac segment`` command runs): it runs in a thread worker, reports each plane to a
progress bar, and its Cancel button sets the ``threading.Event`` the batch checks between planes
(a cancelled batch leaves no partial files). Results can be opened as layers when it finishes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .model_picker import CHECKPOINT_ENTRY, ModelPicker, zoom_of, zoom_spin_box
from .runner import describe_error, show_worker_warning

class _ProgressRelay(QObject):
    """Carries progress reports from the batch's worker thread to the UI thread (queued)."""

    report = Signal(object)


def inputs_in(folder: str | Path) -> list[Path]:
    """The images a folder stands for, as for ``napari-ruac segment FOLDER`` (TIFFs and zarr
    stores inside it, sorted), skipping the results of earlier runs."""
    from ..batch import earlier_run_output, images_in_folder

    return [p for p in images_in_folder(folder) if earlier_run_output(p) is None]


def _checkpoint_problem(choice, is_checkpoint: bool) -> str | None:
    """Why the model picker's weights file cannot be used (none chosen, not there), or None."""
    if choice.name_or_path == CHECKPOINT_ENTRY:
        return "choose a checkpoint file first"
    files = ([choice.name_or_path] if is_checkpoint else []) + ([choice.checkpoint] if choice.checkpoint else [])
    for f in files:
        if not Path(f).is_file():
            return f"checkpoint file not found: {f}"
    return None


class _Cancel:
    """The batch's stop request, polled by ``segment_files`` between planes (``is_set``): set by
    the Cancel button, or by napari, which asks every running worker to quit when its window
    closes (a plain function worker would ignore that, and the batch would keep the process
    alive, windowless, until it ended). Either way the files finished are kept and a rerun
    skips them."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.worker = None

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set() or bool(self.worker is not None and self.worker.abort_requested)


class BatchWidget(QWidget):
    """Pick TIFF files or a folder, a model and an output folder; segment every plane."""

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.cancel_event: _Cancel | None = None
        self.summary = None
        self.error: BaseException | None = None
        self.reports: list = []
        self._relay = _ProgressRelay()
        self._relay.report.connect(self._on_progress)

        self.file_list = QListWidget()
        self.file_list.setMinimumHeight(80)
        add_files = QPushButton("Add files…")
        add_files.clicked.connect(self._pick_files)
        add_folder = QPushButton("Add folder…")
        add_folder.clicked.connect(self._pick_folder)
        clear = QPushButton("Clear")
        clear.clicked.connect(self.file_list.clear)
        row = QHBoxLayout()
        for b in (add_files, add_folder, clear):
            row.addWidget(b)

        self.model_picker = ModelPicker(self)
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("output folder")
        browse_out = QPushButton("…")
        browse_out.setMaximumWidth(30)
        browse_out.clicked.connect(self._pick_output)
        out_row = QHBoxLayout()
        out_row.addWidget(self.output_edit)
        out_row.addWidget(browse_out)
        self.open_check = QCheckBox("open results as layers")
        self.open_check.setChecked(True)
        self.overwrite_check = QCheckBox("replace results of other inputs with the same name")
        self.overwrite_check.setToolTip(
            "off: an input whose name matches results another input left in the output folder fails, "
            "and those results stay (re-running the same input resumes or skips it either way)")
        self.points_spin = QSpinBox()
        self.points_spin.setRange(1, 64)
        self.points_spin.setValue(16)
        self.points_spin.setToolTip("grid of point prompts per side of each plane (more = smaller objects found, slower)")
        self.max_unc_spin = QDoubleSpinBox()
        self.max_unc_spin.setRange(0.0, 1.0)
        self.max_unc_spin.setSingleStep(0.05)
        self.max_unc_spin.setValue(0.6)
        self.max_unc_spin.setToolTip("drop masks whose mean uncertainty (bits) is above this")
        self.zoom_spin = zoom_spin_box(auto=True, start="auto")
        self.scales_combo = QComboBox()
        self.scales_combo.addItems(["1", "3"])
        self.scales_combo.setToolTip(
            "test-time scales of the click that decodes each found object once more: 3 also decodes it a "
            "quarter octave smaller and larger and averages (DSB2018 F1 0.73 -> 0.75, uncertainty finds "
            "more of the errors) for ~1.6x the time per plane")
        #: further segment_files options (e.g. pred_iou_thresh), as on the CLI
        self.extra_options: dict = {}

        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("add TIFF files or a folder")
        self.status.setWordWrap(True)
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_button)
        run_row.addWidget(self.cancel_button)

        form = QFormLayout()
        form.addRow(self.model_picker)
        form.addRow("points per side", self.points_spin)
        form.addRow("zoom for the model", self.zoom_spin)
        form.addRow("test-time scales", self.scales_combo)
        form.addRow("max mean uncertainty", self.max_unc_spin)
        form.addRow("output", out_row)
        form.addRow(self.open_check)
        form.addRow(self.overwrite_check)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("inputs (TIFF stacks)"))
        layout.addWidget(self.file_list)
        layout.addLayout(row)
        layout.addLayout(form)
        layout.addLayout(run_row)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

    # ------------------------------------------------------------------ inputs
    def add_inputs(self, paths) -> None:
        """Add files or zarr stores, or the images inside folders, to the input list (no
        duplicates)."""
        from ..batch import is_image_folder

        present = set(self.inputs())
        for p in paths:
            p = Path(p)
            for f in inputs_in(p) if p.is_dir() and not is_image_folder(p) else [p]:
                if str(f) not in present:
                    self.file_list.addItem(str(f))
                    present.add(str(f))

    def inputs(self) -> list[str]:
        return [self.file_list.item(i).text() for i in range(self.file_list.count())]

    def _pick_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "TIFF stacks", "", "TIFF (*.tif *.tiff *.btf)")
        self.add_inputs(files)

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of TIFF stacks (or a zarr store)")
        if folder:
            self.add_inputs([folder])

    def _pick_output(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder")
        if folder:
            self.output_edit.setText(folder)

    # ------------------------------------------------------------------ running
    @property
    def running(self) -> bool:
        return self.worker is not None

    def run(self) -> None:
        inputs = self.inputs()
        output = self.output_edit.text().strip()
        if not inputs:
            show_error("batch: add at least one TIFF file or folder")
            return
        if not output:
            show_error("batch: choose an output folder")
            return
        if self.running:
            show_error("batch: a batch is already running")
            return
        choice = self.model_picker.choice()
        problem = _checkpoint_problem(choice, self.model_picker.model_combo.currentText() == CHECKPOINT_ENTRY)
        if problem:  # else segment_files says "unknown model '<the path>': expected a checkpoint path ..."
            show_error(f"batch: {problem}")
            self.status.setText(problem)
            return
        self.cancel_event = _Cancel()
        self.summary, self.error, self.reports = None, None, []
        self.progress.setRange(0, 0)  # busy until the first plane reports
        self.status.setText(f"loading {choice.name_or_path}…")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        options = {"points_per_side": self.points_spin.value(),
                   "max_mean_uncertainty": self.max_unc_spin.value(), "zoom": zoom_of(self.zoom_spin),
                   "scales": int(self.scales_combo.currentText()), "overwrite": self.overwrite_check.isChecked(),
                   **self.extra_options}
        if choice.checkpoint:
            options["checkpoint"] = choice.checkpoint
        self.worker = create_worker(self._job, inputs, output, choice, self.cancel_event, options,
                                    _start_thread=False, _ignore_errors=True)
        self.cancel_event.worker = self.worker
        self.worker.warned.connect(show_worker_warning)
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def _job(self, inputs, output, choice, cancel, options):
        """Runs in the worker thread: the same call as ``napari-ruac segment``."""
        from ..batch import segment_files

        return segment_files(inputs, output, model=choice.name_or_path, device=choice.device,
                             progress=self._relay.report.emit, cancel=cancel, **options)

    def cancel(self) -> None:
        """Ask the batch to stop after the current plane; it removes its partial outputs."""
        if self.cancel_event is not None:
            self.cancel_event.set()
            self.status.setText("cancelling after the current plane…")

    def _on_progress(self, report) -> None:
        self.reports.append(report)
        total = max(1, int(getattr(report, "total_planes", 1)))
        self.progress.setRange(0, total)
        self.progress.setValue(int(getattr(report, "done_planes", 0)))
        eta = getattr(report, "eta_s", None)
        name = Path(str(getattr(report, "current_file", ""))).name
        eta_text = f", about {eta:.0f} s left" if eta is not None else ""
        self.status.setText(f"{name}: plane {report.done_planes}/{report.total_planes}{eta_text}")

    def _on_done(self, summary) -> None:
        self.summary = summary
        self.progress.setRange(0, 1)
        self.progress.setValue(0 if summary.cancelled else 1)
        for failure in summary.failures:  # one bad input does not stop the others
            show_error(f"batch: {Path(failure.input).name} failed: {failure.reason}")
        if summary.cancelled:
            self.status.setText("cancelled: finished files are kept, no partial files were left\n" + summary.format())
            return
        self.status.setText(summary.format())
        if self.open_check.isChecked():
            self.open_results(summary)

    def _on_error(self, exc: BaseException) -> None:
        self.error = exc
        cancelled = self.cancel_event is not None and self.cancel_event.is_set()
        if cancelled:
            self.status.setText("cancelled: no partial files were kept")
            return
        show_error(f"batch segmentation failed: {describe_error(exc)}")
        self.status.setText(f"failed: {describe_error(exc)}")

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)

    def open_results(self, summary) -> list:
        """Add each finished input's labels + uncertainty as layers."""
        from .._reader import read_results

        layers = []
        for result in summary.succeeded:
            unc = result.outputs.get("uncertainty")
            if unc is None or not Path(unc).is_file():
                continue
            for data, meta, kind in read_results(unc):
                layers.append(getattr(self.viewer, f"add_{kind}")(data, **meta))
        if not layers:
            show_info(f"no results to open in {summary.output_dir}")
        return layers


def wait_until_idle(widget: BatchWidget, timeout_s: float = 60.0) -> bool:
    """Process Qt events until the batch ends (scripts); False on timeout."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout_s
    while widget.running and time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)
    return not widget.running

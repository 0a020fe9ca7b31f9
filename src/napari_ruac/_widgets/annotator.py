"""The RUAC annotator: click to segment, see the uncertainty, commit, propagate, proofread.

Layers made for the chosen image ``<name>`` (same scale/translate/rotation as the image):

- ``<name> prompts``  Points: click = positive; Shift/Ctrl-click or the "negative" toggle = negative
- ``<name> box``      Shapes: draw one rectangle per plane as a box prompt
- ``<name> current object``  Labels (uint8): the object being made (label 1)
- ``<name> uncertainty``     Image (float32, 0..1, magma, contrast fixed to 0..1)
- ``<name> objects``         Labels (uint32): committed objects, one id each
- ``<name> uncertain pixels`` Image (uint8 0/1): uncertainty above the slider's threshold

Leading axes (z, t, ...) are planes; the last two are rows and columns (RGB images keep their
colour axis last). Model work runs in napari thread workers; prompts changed while a prediction
runs replace any prediction still waiting. Keys on the prompt layers: ``c`` commit, ``u`` undo
the last prompt, ``n`` next uncertain object.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..model.automatic import reported_iou
from .model_picker import ModelChoice, ModelPicker, zoom_of, zoom_spin_box
from .objects import ObjectRecord, measure_object, next_uncertain, plane_centroid
from .runner import LatestOnlyRunner

POSITIVE_COLOR = np.array([0.2, 1.0, 0.2, 1.0])
NEGATIVE_COLOR = np.array([1.0, 0.2, 0.2, 1.0])
UNCERTAINTY_DISPLAY = {"colormap": "magma", "contrast_limits": (0.0, 1.0), "blending": "additive", "opacity": 0.6}

Plane = tuple  # indices along the leading axes; () for a 2D image
PRECOMPUTE_STEPS = 100  # progress steps per plane: precomputing one large plane takes a while
CACHE_WINDOWS = 16  # windows (or whole planes) a predictor keeps per view and test-time scale


Box = tuple[int, int, int, int]  # (row0, col0, row1, col1) in a plane, stops exclusive


def _box_union(*boxes: Box | None) -> Box:
    """The smallest box holding every given box (None entries are skipped; one is required)."""
    given = [b for b in boxes if b is not None]
    return (min(b[0] for b in given), min(b[1] for b in given), max(b[2] for b in given), max(b[3] for b in given))


def painted_boxes(atoms, shape: tuple[int, ...], n_lead: int) -> list[tuple[Plane, Box]] | None:
    """The planes and boxes a napari Labels ``paint`` event's history atoms touched: each atom is
    a mask edit with a ``slice_key`` (brush, fill and polygon since napari 0.6) or an
    ``(indices, old values, new values)`` tuple of index arrays (``data_setitem``, and every
    paint before). None when an atom is neither, so that the caller assumes the worst."""
    out = []
    try:
        for atom in atoms:
            key = getattr(atom, "slice_key", None)
            index = key if key is not None else atom[0]
            if len(index) != len(shape):
                return None
            if key is not None:
                spans = [s.indices(n)[:2] for s, n in zip(key, shape)]
            else:
                arrays = [np.asarray(a).ravel() for a in index]
                spans = [(int(a.min()), int(a.max()) + 1) if a.size else (0, 0) for a in arrays]
            if any(stop <= start for start, stop in spans):
                continue  # touched nothing
            lead, (r0, r1), (c0, c1) = spans[:n_lead], spans[-2], spans[-1]
            out += [(plane, (r0, c0, r1, c1)) for plane in itertools.product(*(range(a, b) for a, b in lead))]
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    return out


def ignored_clicks(mask: np.ndarray, points, labels) -> tuple[int, int]:
    """(positive clicks outside ``mask``, negative clicks inside it): the clicks the model did
    not follow (points (row, col) in the plane's pixels; those off the plane are not counted)."""
    h, w = mask.shape
    outside = inside = 0
    for (r, c), label in zip(points, labels):
        r, c = int(round(r)), int(round(c))
        if not (0 <= r < h and 0 <= c < w):
            continue
        if label == 1 and not mask[r, c]:
            outside += 1
        elif label == 0 and mask[r, c]:
            inside += 1
    return outside, inside


@dataclass(frozen=True)
class PlanePrompt:
    """The prompts of one plane, hashable so a result can be matched to the prompts it used."""

    points: tuple[tuple[float, float], ...]
    labels: tuple[int, ...]
    box: tuple[float, float, float, float] | None

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    def as_kwargs(self) -> dict:
        return {
            "points": list(self.points) or None,
            "labels": list(self.labels) or None,
            "box": self.box,
        }


@dataclass
class PlanePrediction:
    plane: Plane
    prompt: PlanePrompt
    prediction: object  # napari_ruac.Prediction
    submitted_at: float
    # the predicted IoU to show: NaN where the predicting model's IoU head is untrained (our
    # micro models); decided in the worker, by the model that predicted
    iou: float = float("nan")
    scales: int = 1  # how many test-time scales it was decoded at
    refined: bool = False  # a refinement of a result already shown (not a response to a prompt)


@dataclass(frozen=True)
class PlaneFailure:
    """A plane whose prompts could not be decoded (a click outside the image, a NaN plane):
    reported for that plane alone, so the other planes' prompts still predict."""

    plane: Plane
    prompt: PlanePrompt
    message: str


REFINE = "1, then 3"  # the test-time scales setting that refines each result


class _TaskStopped(Exception):
    """Raised in a task's worker when its stop flag is set (not a ValueError: propagation's
    loop takes those for a bad plane)."""


class AnnotatorWidget(QWidget):
    """Click-to-segment with per-pixel uncertainty (dock it from Plugins > RUAC annotator)."""

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.image_layer: Image | None = None
        self.prompts: Points | None = None
        self.boxes: Shapes | None = None
        self.current: Labels | None = None
        self.uncertainty: Image | None = None
        self.objects: Labels | None = None
        self.overlay: Image | None = None
        self.records: dict[int, ObjectRecord] = {}
        self._current_preds: dict[Plane, PlanePrediction] = {}
        self._shown_prompts: dict[Plane, PlanePrompt] = {}
        # per plane: where the current-object, uncertainty and overlay layers can be non-zero
        # (the extent of the maps _show_maps wrote last); a plane not listed is all zero there
        # when _known, else anything (reused layers, a replaced layer)
        self._extents: dict[Plane, tuple[int, int, int, int]] = {}
        # per plane: the box the user painted on the current-object layer (brush, fill, polygon).
        # It stays with the extents until the image is bound again: napari's undo and redo of a
        # paint write there again, after later predictions, and send no event.
        self._painted: dict[Plane, tuple[int, int, int, int]] = {}
        self._known = False
        self._history: list[str] = []  # "point" / "box", for undo
        self._negative_click = False
        self._reprompt_id: int | None = None
        self._reprompt_objects = None  # the objects layer the re-prompted object lives in
        self._focused_id: int | None = None
        self._propagation: dict[int, dict] = {}
        self._cancelled = False
        # the running Precompute/Propagate: its number (what it sends back under an older one,
        # after a stop, is dropped), its stop flag (read by its worker), the image it reads and
        # the object it propagates (None for Precompute); stale: stopped, its worker winding down
        self._task_token = 0
        self._task_stop = threading.Event()
        self._task_image: Image | None = None
        self._task_obj: int | None = None
        self._task_stale = False
        # binds the image the combo shows, a moment after the bound one was removed
        self._rebind_timer = QTimer(self)
        self._rebind_timer.setSingleShot(True)
        self._rebind_timer.timeout.connect(self._rebind_after_removal)
        self._removal_note = ""
        # Precompute keeps embeddings up to this share of the free memory (then stops, saying so)
        self.precompute_memory_fraction = 0.25
        self._precompute_full: float | None = None  # the budget it stopped at
        self._predictor = None
        self._predictor_choice: ModelChoice | None = None
        self._predictor_views: str | None = None
        self._model_lock = threading.Lock()
        self.predictions_applied = 0
        self.last_latency_s: float | None = None
        self.predict_runner = LatestOnlyRunner(name="prediction", on_error=self._on_prediction_error)
        self.task_runner = LatestOnlyRunner(name="task")
        # with zoom "auto": the object-size estimate of the plane on screen, before a click
        self.zoom_runner = LatestOnlyRunner(name="object-size estimate")
        self._build_ui()
        self._connect_viewer()
        self._refresh_image_choices()

    # ================================================================== UI
    def _build_ui(self) -> None:
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(self._on_image_chosen)
        self.model_picker = ModelPicker(self)
        self.model_picker.model_combo.currentTextChanged.connect(lambda _: self._forget_model())
        self.model_picker.device_combo.currentTextChanged.connect(lambda _: self._forget_model())
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["analytic", "mc"])
        self.mode_combo.setToolTip("analytic: closed-form uncertainty (fast); mc: 20 samples of the Bayesian head")
        self.negative_check = QCheckBox("negative clicks (or hold Shift/Ctrl)")
        # "auto" to start: a click takes a whole object whether it is 10 or 100 px across
        self.zoom_spin = zoom_spin_box(auto=True, boxes=True, start="auto")
        self.zoom_spin.valueChanged.connect(self._on_zoom_changed)
        self._zoom = zoom_of(self.zoom_spin)  # read by worker threads; set on the UI thread only
        self.views_combo = QComboBox()
        self.views_combo.addItems(["auto", "1", "2", "4", "8"])
        self.views_combo.setToolTip(
            "each prompt is decoded in this many views (the model's grid moved, the image mirrored) and "
            "the results averaged: smoother, more accurate masks for a few times the work per new region. "
            "auto: 4 for our models, 1 for SAM2.1's")
        self.views_combo.currentTextChanged.connect(self._on_views_changed)
        self._views = "auto"  # read by worker threads; set on the UI thread only
        self.scales_combo = QComboBox()
        self.scales_combo.addItems([REFINE, "1", "3", "5"])
        self.scales_combo.setToolTip(
            "each prompt is also decoded at zooms a quarter octave below and above (3; 5: half an octave "
            "too) and the results averaged: better masks, and uncertainty that marks more of the wrong "
            "pixels (DSB2018, one click: mIoU 0.70 -> 0.71, AUROC of uncertainty for error 0.75 -> 0.79), "
            "for ~3x (5x) the work per click and per new region. '1, then 3': the mask at one scale at "
            "once, replaced by the three-scale one a moment later (our models; SAM2.1 resizes every image)")
        self.scales_combo.currentTextChanged.connect(self._on_scales_changed)
        self._scales, self._refine_scales = "1", 3  # read by worker threads; set on the UI thread only

        top = QFormLayout()
        top.addRow("image", self.image_combo)
        top.addRow(self.model_picker)
        top.addRow("uncertainty", self.mode_combo)
        top.addRow("zoom for the model", self.zoom_spin)
        top.addRow("test-time views", self.views_combo)
        top.addRow("test-time scales", self.scales_combo)
        top.addRow(self.negative_check)

        self.undo_button = QPushButton("Undo prompt [u]")
        self.clear_button = QPushButton("Clear")
        self.commit_button = QPushButton("Commit object [c]")
        self.undo_button.clicked.connect(self.undo)
        self.clear_button.clicked.connect(self.clear_prompts)
        self.commit_button.clicked.connect(self.commit)
        buttons = QHBoxLayout()
        for b in (self.undo_button, self.clear_button, self.commit_button):
            buttons.addWidget(b)

        self.precompute_button = QPushButton("Precompute all planes")
        self.precompute_button.clicked.connect(self.precompute_all)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_task)
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("choose an image and click on it")
        self.status.setWordWrap(True)
        work = QHBoxLayout()
        work.addWidget(self.precompute_button)
        work.addWidget(self.cancel_button)

        # --- propagation
        self.axis_combo = QComboBox()
        self.propagate_button = QPushButton("Propagate object")
        self.propagate_button.clicked.connect(self.propagate)
        self.worst_plane_button = QPushButton("Go to worst plane")
        self.worst_plane_button.clicked.connect(self.go_to_worst_plane)
        self.plane_table = QTableWidget(0, 3)
        self.plane_table.setHorizontalHeaderLabels(["plane", "area", "mean unc."])
        self.plane_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.plane_table.setMaximumHeight(140)
        self.plane_table.cellDoubleClicked.connect(self._on_plane_row)
        self.plane_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.plane_table.verticalHeader().setVisible(False)
        prop_box = QGroupBox("3D / time")
        prop = QVBoxLayout(prop_box)
        row = QHBoxLayout()
        row.addWidget(QLabel("through axis"))
        row.addWidget(self.axis_combo)
        row.addWidget(self.propagate_button)
        prop.addLayout(row)
        prop.addWidget(self.plane_table)
        prop.addWidget(self.worst_plane_button)

        # --- proofreading
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setValue(50)
        self.threshold_label = QLabel("0.50")
        self.threshold_slider.valueChanged.connect(self._on_threshold)
        self.object_table = QTableWidget(0, 5)
        self.object_table.setHorizontalHeaderLabels(["id", "plane", "area", "mean unc.", "pred. IoU"])
        self.object_table.setSortingEnabled(True)
        self.object_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.object_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.object_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.object_table.cellClicked.connect(self._on_object_row)
        self.object_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.object_table.verticalHeader().setVisible(False)
        self.next_button = QPushButton("Next uncertain object [n]")
        self.next_button.clicked.connect(self.next_uncertain_object)
        self.delete_button = QPushButton("Delete")
        self.delete_button.clicked.connect(self.delete_selected)
        self.reprompt_button = QPushButton("Re-prompt")
        self.reprompt_button.clicked.connect(self.reprompt_selected)
        proof_box = QGroupBox("Proofreading")
        proof = QVBoxLayout(proof_box)
        row = QHBoxLayout()
        row.addWidget(QLabel("show uncertainty >"))
        row.addWidget(self.threshold_slider)
        row.addWidget(self.threshold_label)
        proof.addLayout(row)
        proof.addWidget(self.object_table)
        row = QHBoxLayout()
        for b in (self.next_button, self.delete_button, self.reprompt_button):
            row.addWidget(b)
        proof.addLayout(row)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(buttons)
        layout.addLayout(work)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(prop_box)
        layout.addWidget(proof_box)
        layout.addStretch(1)

    def _connect_viewer(self) -> None:
        self.viewer.layers.events.inserted.connect(self._refresh_image_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._on_plane_shown)

    def _on_layer_removed(self, event=None) -> None:
        # never create layers here: closing the viewer removes every layer, one event each
        if self.image_layer is not None and self.image_layer not in self.viewer.layers:
            stopped = self._stop_task("the image was removed")
            self._unwire_prompt_layers()
            self.image_layer = None
            # its objects are not the widget's any more (the next image's are listed on binding)
            self.records.clear()
            self._propagation.clear()
            self._focused_id = None
            self._fill_object_table()
            self.plane_table.setRowCount(0)
            self._refresh_image_choices(bind=False)
            self.status.setText(f"{stopped}; choose an image" if stopped else "the image was removed: choose an image")
            if self.image_combo.count():
                # bind the image the combo now shows, once this event is over: by then a closing
                # viewer has no layers left (and a closed widget's timer is gone with it); an
                # action before that binds it at once (_ensure_layers)
                self._removal_note = stopped or ""
                self._rebind_timer.start(0)
            return
        self._refresh_image_choices(bind=False)

    def _rebind_after_removal(self) -> None:
        if self.image_layer is None:
            self._bind_shown_image()

    def _bind_shown_image(self) -> None:
        """Bind the image the combo shows (the bound one was removed); nothing when it shows none."""
        note, self._removal_note = self._removal_note, ""
        try:
            shown = self.image_combo.currentText()
        except RuntimeError:  # the widget is being deleted with its viewer
            return
        self._on_image_chosen(shown)
        if note and self.image_layer is not None:
            self.status.setText(f"{note}; {self.status.text()}")

    def _need_image(self) -> bool:
        """:meth:`_ensure_layers` for a button: False, with a warning, when there is no image."""
        if self._ensure_layers():
            return True
        show_warning("choose an image in the annotator first")
        return False

    def _ensure_layers(self) -> bool:
        """Before acting: make again any of our layers the user deleted. False without an image."""
        if self.image_layer is None:
            self._bind_shown_image()  # the bound image was removed: the one the combo shows now
            if self.image_layer is None:
                return False
        ours = [self.prompts, self.boxes, self.current, self.uncertainty, self.objects, self.overlay]
        if any(layer not in self.viewer.layers for layer in ours):
            image, self.image_layer = self.image_layer, None
            self.bind_image(image)  # missing layers are made, the others reused by name
        return True

    def _refresh_image_choices(self, event=None, bind: bool = True) -> None:
        ours = {id(x) for x in (self.uncertainty, self.overlay) if x is not None}
        names = [l.name for l in self.viewer.layers if isinstance(l, Image) and id(l) not in ours
                 and not l.name.endswith((" uncertainty", " uncertain pixels"))]
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        if bind and (self.image_layer is None or self.image_layer not in self.viewer.layers):
            if names:
                self._on_image_chosen(self.image_combo.currentText())

    # ================================================================== binding to an image
    def _on_image_chosen(self, name: str) -> None:
        if not name or name not in self.viewer.layers:
            return
        layer = self.viewer.layers[name]
        if layer is self.image_layer:
            return
        try:
            self.bind_image(layer)
        except Exception as exc:  # a bad image must not take the viewer down
            show_error(f"cannot annotate {name!r}: {exc}")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the image without its RGB axis: (*planes, H, W)."""
        data = self.image_layer.data
        shape = tuple(data[0].shape if self.image_layer.multiscale else data.shape)
        return shape[:-1] if self.image_layer.rgb else shape

    @property
    def n_lead(self) -> int:
        return len(self.spatial_shape) - 2

    def bind_image(self, layer: Image) -> None:
        """Make (or reuse) the prompt and result layers for ``layer``."""
        if layer.multiscale:
            raise ValueError("multiscale (pyramid) images are not supported: open the full-resolution level")
        shape = tuple(layer.data.shape[:-1] if layer.rgb else layer.data.shape)
        if len(shape) < 2:
            raise ValueError(f"the image has shape {layer.data.shape}: need at least rows and columns")
        # a running Precompute/Propagate works on the layers about to be replaced (and their records)
        stopped = self._stop_task("the image changed" if layer is not self._task_image
                                  else "the annotator's layers were made again")
        self._unwire_prompt_layers()
        self.image_layer = layer
        self._current_preds.clear()
        self._shown_prompts.clear()
        self._extents.clear()
        self._painted.clear()
        self._history.clear()
        self._reprompt_id = None  # an object being re-prompted stays as it was
        self.records.clear()
        self._propagation.clear()
        tf = {"scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate,
              "shear": layer.shear, "affine": layer.affine}
        name = layer.name
        self.prompts = self._reuse(f"{name} prompts", Points) or self.viewer.add_points(
            np.empty((0, len(shape))), ndim=len(shape), name=f"{name} prompts", size=max(3, min(shape[-2:]) // 60),
            border_width=0, features={"label": np.empty(0, int)}, feature_defaults={"label": 1}, **tf)
        self.boxes = self._reuse(f"{name} box", Shapes) or self.viewer.add_shapes(
            ndim=len(shape), name=f"{name} box", edge_color="yellow", face_color="transparent",
            edge_width=max(1, min(shape[-2:]) // 200), **tf)
        # the result layers from an earlier session, if any (their content is not known)
        reused = {suffix: self._reuse(f"{name} {suffix}", kind, shape) for suffix, kind in
                  (("current object", Labels), ("uncertainty", Image), ("uncertain pixels", Image))}
        self.current = reused["current object"] or self.viewer.add_labels(
            np.zeros(shape, np.uint8), name=f"{name} current object", opacity=0.5, **tf)
        self.uncertainty = reused["uncertainty"] or self.viewer.add_image(
            np.zeros(shape, np.float32), name=f"{name} uncertainty", **UNCERTAINTY_DISPLAY, **tf)
        self.objects = self._reuse(f"{name} objects", Labels, shape) or self.viewer.add_labels(
            np.zeros(shape, np.uint32), name=f"{name} objects", opacity=0.4, **tf)
        self.overlay = reused["uncertain pixels"] or self.viewer.add_image(
            np.zeros(shape, np.uint8), name=f"{name} uncertain pixels", colormap="cyan",
            contrast_limits=(0, 1), blending="additive", opacity=0.8, visible=False, **tf)
        # new layers are zero; a reused current-object layer is not known even when empty: an
        # undo or redo of an earlier paint would write where no extent says (and napari offers
        # plugins no public way to ask whether it has such history)
        self._known = reused["current object"] is None and not any(
            x.data.any() for x in reused.values() if x is not None)
        self._wire_prompt_layers()
        self.axis_combo.clear()
        self.axis_combo.addItems([f"axis {i} ({n} planes)" for i, n in enumerate(shape[:-2])])
        self.propagate_button.setEnabled(len(shape) > 2)
        self._rebuild_records()
        self.viewer.layers.selection.active = self.prompts
        self.prompts.mode = "add"
        self.status.setText((f"{stopped}; " if stopped else "")
                            + f"annotating {name!r} {shape}: click to add points; draw a box on '{name} box'")
        if len(self.prompts.data) or len(self.boxes.data):
            # prompts left on reused layers (an object not committed before another image was
            # bound): predicted again, so what is shown is what a commit takes, and undoable
            self._history = ["point"] * len(self.prompts.data) + ["box"] * len(self.boxes.data)
            self._schedule_prediction()
        self._on_plane_shown()  # a model is loaded already when a second image is bound

    def _reuse(self, name: str, kind: type, shape: tuple | None = None):
        """An existing layer of that name and kind (and shape) from an earlier session."""
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if isinstance(layer, kind) and (shape is None or tuple(layer.data.shape) == shape):
                return layer
        return None

    def _wire_prompt_layers(self) -> None:
        # one handler per layer: under napari's plugin proxy, event.source is not our reference
        self.prompts.events.data.connect(self._on_point_data)
        self.boxes.events.data.connect(self._on_box_data)
        for layer in (self.prompts, self.boxes):
            layer.bind_key("c", lambda _l: self.commit(), overwrite=True)
            layer.bind_key("u", lambda _l: self.undo(), overwrite=True)
            layer.bind_key("n", lambda _l: self.next_uncertain_object(), overwrite=True)
        if self._remember_modifiers not in self.prompts.mouse_drag_callbacks:
            # first in the list: runs before the add-mode callback creates the point
            self.prompts.mouse_drag_callbacks.insert(0, self._remember_modifiers)
        # replaced by someone else: the next prediction rewrites whole planes; painted: there too
        for emitter in self._result_layer_events():
            emitter.connect(self._forget_extents)
        if self.current is not None:
            self.current.events.paint.connect(self._on_current_painted)

    def _result_layer_events(self) -> list:
        return [x.events.data for x in (self.current, self.uncertainty, self.overlay) if x is not None]

    def _unwire_prompt_layers(self) -> None:
        """Stop listening to the previous image's prompt layers (they stay in the viewer)."""
        if self.prompts is not None:
            self.prompts.events.data.disconnect(self._on_point_data)
            if self._remember_modifiers in self.prompts.mouse_drag_callbacks:
                self.prompts.mouse_drag_callbacks.remove(self._remember_modifiers)
        if self.boxes is not None:
            self.boxes.events.data.disconnect(self._on_box_data)
        for emitter in self._result_layer_events():
            emitter.disconnect(self._forget_extents)
        if self.current is not None:
            self.current.events.paint.disconnect(self._on_current_painted)

    def _remember_modifiers(self, layer, event) -> None:
        mods = {str(getattr(m, "name", m)) for m in event.modifiers}
        self._negative_click = bool(mods & {"Shift", "Control", "Meta"})

    # ================================================================== prompts
    def _on_point_data(self, event) -> None:
        self._on_prompt_data("point", event)

    def _on_box_data(self, event) -> None:
        self._on_prompt_data("box", event)

    def _on_prompt_data(self, kind: str, event) -> None:
        action = str(getattr(event, "action", "changed"))
        if action.endswith("ing"):  # "adding", "removing", "changing": wait for the change itself
            return
        if action == "added":
            if kind == "point":
                self._label_new_points(len(event.data_indices))
            self._history.append(kind)
        self._schedule_prediction()

    def _label_new_points(self, n: int) -> None:
        negative = self.negative_check.isChecked() or self._negative_click
        self._negative_click = False
        labels = self.prompts.features["label"].to_numpy().copy()
        labels[-n:] = 0 if negative else 1
        self.prompts.features["label"] = labels
        self._recolor_points()

    def _recolor_points(self) -> None:
        labels = self.prompts.features["label"].to_numpy()
        if len(labels):
            self.prompts.face_color = np.where(labels[:, None] == 1, POSITIVE_COLOR, NEGATIVE_COLOR)

    def add_point(self, position, positive: bool = True) -> None:
        """Add a prompt point at ``position`` (data coordinates, all axes) — what a click does."""
        if not self._ensure_layers():
            raise RuntimeError("choose an image in the annotator first")
        self._negative_click = not positive
        self.prompts.add(np.asarray(position, dtype=float))

    def add_box(self, plane: Plane, box) -> None:
        """Add a box prompt (row0, col0, row1, col1) on ``plane`` — what drawing a rectangle does."""
        if not self._ensure_layers():
            raise RuntimeError("choose an image in the annotator first")
        r0, c0, r1, c1 = box
        corners = [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]  # nD rectangles need all four
        self.boxes.add_rectangles(np.array([[*plane, r, c] for r, c in corners], float))

    def current_plane(self) -> Plane:
        """Indices of the plane on screen along the image's leading axes."""
        if self.n_lead == 0:
            return ()
        point = np.asarray(self.viewer.dims.point)[-self.image_layer.ndim:]
        data = np.asarray(self.image_layer.world_to_data(point))
        shape = self.spatial_shape
        return tuple(int(np.clip(round(float(v)), 0, shape[i] - 1)) for i, v in enumerate(data[: self.n_lead]))

    def prompts_by_plane(self) -> dict[Plane, PlanePrompt]:
        """Every plane's prompts, from the points and box layers (data coordinates)."""
        k = self.n_lead
        points: dict[Plane, list] = {}
        labels = self.prompts.features["label"].to_numpy() if len(self.prompts.data) else []
        for p, lab in zip(self.prompts.data, labels):
            plane = tuple(int(round(v)) for v in p[:k])
            points.setdefault(plane, []).append(((float(p[k]), float(p[k + 1])), int(lab)))
        boxes: dict[Plane, tuple] = {}
        for verts, kind in zip(self.boxes.data, self.boxes.shape_type):
            if len(verts) < 2:
                continue
            plane = tuple(int(round(v)) for v in verts[0, :k])
            # a box drawn past the image's edge ends at it (a nucleus on the border)
            h, w = self.spatial_shape[-2:]
            rows, cols = np.clip(verts[:, k], 0, h), np.clip(verts[:, k + 1], 0, w)
            if rows.max() - rows.min() < 1 or cols.max() - cols.min() < 1:  # (nearly) all outside:
                rows, cols = verts[:, k], verts[:, k + 1]  # the predictor names the corner outside
            boxes[plane] = (float(rows.min()), float(cols.min()), float(rows.max()), float(cols.max()))
        out = {}
        for plane in set(points) | set(boxes):
            pts = points.get(plane, [])
            out[plane] = PlanePrompt(tuple(p for p, _ in pts), tuple(l for _, l in pts), boxes.get(plane))
        return out

    def _schedule_prediction(self) -> None:
        """Predict every plane whose prompts differ from what the layers show."""
        if not self._ensure_layers():
            return
        wanted = self.prompts_by_plane()
        stale_planes = [p for p in set(self._shown_prompts) | set(wanted)
                        if wanted.get(p) != self._shown_prompts.get(p)]
        jobs = []
        for plane in stale_planes:
            prompt = wanted.get(plane)
            if prompt is None or prompt.empty or not self._plane_in_range(plane):
                self._clear_current_plane(plane)
            else:
                jobs.append((plane, prompt))
        if jobs:
            # no progress-bar change here: re-ranging a QProgressBar repaints the dock (~50 ms
            # per click measured); it goes busy only while an embedding is computed
            # the job reads, and its result is for, the image bound now (see _apply_for)
            layer = self.image_layer
            self.predict_runner.submit(
                self._predict_job, self.model_picker.choice(), jobs, self.mode_combo.currentText(),
                time.perf_counter(), layer, on_result=partial(self._apply_for, layer),
                on_yield=self._on_progress_message)

    def _plane_in_range(self, plane: Plane) -> bool:
        return all(0 <= v < n for v, n in zip(plane, self.spatial_shape))

    # ================================================================== model work (worker thread)
    def _ensure_predictor(self, choice: ModelChoice):
        """The predictor for ``choice``, loading the model on first use (worker thread)."""
        from ..model.predictor import Predictor

        views = self._views
        if self._predictor is None or self._predictor_choice != choice:
            self._predictor = Predictor(choice.load(), views=views, cache_size=CACHE_WINDOWS)
            self._predictor_choice = choice
        elif self._predictor_views != views:  # same model, new views: embeddings are per view
            self._predictor = Predictor(self._predictor.model, views=views, cache_size=CACHE_WINDOWS)
        self._predictor_views = views
        self._predictor.zoom = self._zoom  # a changed zoom drops the current embedding
        self._predictor.scales = self._scales  # embeddings at every zoom stay cached (per job)
        if self._refines(self._predictor):
            # the cache holds cache_size windows per view and *current* scale: at one scale it
            # would drop what the refinements encoded at three, and re-encode it on a re-click
            self._predictor.cache_size = max(self._predictor.cache_size, CACHE_WINDOWS * self._refine_scales)
        return self._predictor

    @staticmethod
    def _plane_array(layer: Image, plane: Plane) -> np.ndarray:
        return np.asarray(layer.data[plane] if plane else layer.data)

    def _on_plane_shown(self, event=None) -> None:
        """With zoom "auto" and a model loaded: estimate the object size of the plane now on
        screen in a worker (~0.15 s for 512²), so that the first click on it pays only for its
        prediction. Scrolling fast estimates only the plane it stops at."""
        predictor = self._predictor
        if predictor is None or not predictor.auto_zoom or self.image_layer is None:
            return
        plane = self.current_plane()
        if self._plane_in_range(plane):
            self.zoom_runner.submit(self._zoom_job, predictor, self.image_layer.data, plane)

    @staticmethod
    def _zoom_job(predictor, data, plane: Plane) -> None:
        """Worker: remember ``data[plane]``'s zoom in ``predictor`` (thread-safe, no model lock)."""
        try:
            predictor.plane_zoom(np.asarray(data[plane] if plane else data))
        except ValueError:
            pass  # a bad plane (NaNs, ...) is reported when it is clicked, not when it is shown

    def _predict_job(self, choice: ModelChoice, jobs: list, mode: str, submitted: float, layer: Image):
        """Generator run in a thread worker: yields progress messages, returns PlanePredictions
        for ``layer`` (the image bound when the prompts changed, whatever is bound by now)."""
        results = []
        with self._model_lock:
            if self._predictor is None or self._predictor_choice != choice:
                yield f"loading model {choice.name_or_path} on {choice.device}…"
            predictor = self._ensure_predictor(choice)
            for plane, prompt in jobs:
                arr = self._plane_array(layer, plane)
                try:  # a bad plane or prompt fails that plane alone
                    if not predictor.is_cached(arr):
                        yield f"computing the embedding of plane {plane or 'image'}…"
                    predictor.set_image(arr)
                    if self._refines(predictor):  # a refinement with nothing to encode: at once
                        predictor.scales = self._refine_scales
                        if not predictor.is_encoded(**prompt.as_kwargs()):
                            predictor.scales = self._scales
                    results.append(self._predict_plane(predictor, plane, prompt, mode, submitted, False))
                except (ValueError, RuntimeError) as exc:  # ImageError, PromptError, ...
                    results.append(PlaneFailure(plane, prompt, str(exc)))
        return results

    def _refines(self, predictor) -> bool:
        """Whether results at one scale are refined at more ("1, then 3"; native-scale models)."""
        return self._refine_scales is not None and predictor.model.config.input_scaling == "native"

    def _refine_job(self, choice: ModelChoice, jobs: list, mode: str, submitted: float, scales: int,
                    layer: Image):
        """Generator run in a thread worker: the results just shown, decoded again at ``scales``
        test-time scales. The windows that needs are encoded one at a time with the model lock
        released in between, and it yields there (never while holding the lock), so a newer
        prompt, which quits this job at its next yield, waits for one window's views at most."""
        for plane, prompt in jobs:
            arr = self._plane_array(layer, plane)
            with self._model_lock:
                predictor = self._scaled_predictor(choice, arr, scales)
                windows, key = predictor.prompt_windows(**prompt.as_kwargs()), predictor.image_key
            for zoom, window in windows:
                with self._model_lock:  # a click meanwhile may have set another plane: set it again
                    self._scaled_predictor(choice, arr, scales, key).embed_window(zoom, window)
                yield None
        with self._model_lock:  # every window is encoded: decoder passes only from here
            results = []
            for plane, prompt in jobs:
                predictor = self._scaled_predictor(choice, self._plane_array(layer, plane), scales)
                results.append(self._predict_plane(predictor, plane, prompt, mode, submitted, True))
        return results

    def _scaled_predictor(self, choice: ModelChoice, arr: np.ndarray, scales: int | str, key: str | None = None):
        """(Model lock held) the predictor at ``scales`` test-time scales (until the next
        prediction job sets the setting's) with ``arr`` set. ``key``: the ``image_key`` it had
        when ``arr`` was set last; while it still has it, no other job set another plane (or
        zoom) since, and ``arr`` is not checked and hashed again for every window (a few ms per
        window on a 4096² plane; 30-40 ms with the blake2b used until 2026-12-07)."""
        predictor = self._ensure_predictor(choice)
        predictor.scales = scales
        if key is None or predictor.image_key != key:
            predictor.set_image(arr)
        return predictor

    @staticmethod
    def _predict_plane(predictor, plane: Plane, prompt: PlanePrompt, mode: str, submitted: float,
                       refined: bool) -> PlanePrediction:
        """(Model lock held) ``prompt`` decoded on the plane ``predictor`` holds."""
        pred = predictor.predict(**prompt.as_kwargs(), mode=mode)
        return PlanePrediction(plane, prompt, pred, submitted, reported_iou(predictor.model, pred.iou_score),
                               len(predictor.scales), refined=refined)

    # ================================================================== results (UI thread)
    def _on_prediction_error(self, exc: BaseException) -> None:
        """A prediction job failed as a whole (the model did not load): the busy bar and the
        'loading…' or 'computing…' status line must not stay."""
        if not self.task_runner.busy:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
        self.status.setText(f"prediction failed: {exc}")

    def _on_progress_message(self, message) -> None:
        if isinstance(message, str):
            self.status.setText(message)
            if not self.task_runner.busy:
                self.progress.setRange(0, 0)  # busy while the model loads or embeds a plane

    def _apply_for(self, layer: Image, results: list[PlanePrediction]) -> None:
        """Results for ``layer``: shown while it is the bound image; dropped once it was removed
        or another was chosen (with the same prompts there, they would pass for that image's)."""
        if layer is self.image_layer:
            self._apply_predictions(results)

    def _apply_predictions(self, results: list[PlanePrediction]) -> None:
        if self.image_layer is None or not self._ensure_layers():  # (a result is no reason to bind)
            return
        wanted = self.prompts_by_plane()
        for res in results:
            if wanted.get(res.plane) != res.prompt:
                continue  # the prompts changed (or were cleared) after this was submitted
            if isinstance(res, PlaneFailure):  # no mask for these prompts; not retried until they change
                self._clear_current_plane(res.plane)
                self._shown_prompts[res.plane] = res.prompt
                where = f"plane {res.plane}" if res.plane else "the image"
                show_error(f"prediction failed on {where}: {res.message}")
                self.status.setText(f"{where}: no mask ({res.message}); undo or move the prompt")
                continue
            pred = res.prediction
            self._show_maps(res.plane, pred)
            self._current_preds[res.plane] = res
            self._shown_prompts[res.plane] = res.prompt
            iou = res.iou
            outside, inside = ignored_clicks(pred.mask, res.prompt.points, res.prompt.labels)
            ignored = [f"{n} {kind} click{'s' if n > 1 else ''} {where}" for n, kind, where in (
                (outside, "positive", "outside the mask"), (inside, "negative", "inside it")) if n]
            self.status.setText(
                f"plane {res.plane or 'image'}: {pred.area} px, "
                + ("" if np.isnan(iou) else f"predicted IoU {iou:.2f}, ")
                + f"mean uncertainty {pred.mean_uncertainty:.2f}"
                + (f" ({res.scales} scales)" if res.scales > 1 else "")
                # the small models do not always follow a click (a negative one most often)
                + (f"; the model did not follow {' and '.join(ignored)}: add a click, draw a box, or "
                   "paint the mask and commit (a new prompt predicts it again)" if ignored else ""))
        self.current.refresh()
        self.uncertainty.refresh()
        if self.overlay.visible:
            self.overlay.refresh()
        first = [r for r in results if isinstance(r, PlanePrediction) and not r.refined]
        if first:  # prompt change -> layers updated (what the click-latency benchmark reports)
            self.last_latency_s = time.perf_counter() - first[0].submitted_at
        self.predictions_applied += 1
        self._refine(results, wanted)
        if self.progress.maximum() == 0 and not self.task_runner.busy:
            self.progress.setRange(0, 1)
            self.progress.setValue(1)

    def _refine(self, results: list[PlanePrediction], wanted: dict) -> None:
        """With '1, then 3': decode what was just shown at one scale again at three (our
        native-scale models), to replace it when nothing newer is asked for meanwhile. (Where
        the three scales' windows were encoded already, e.g. precomputed, the prediction job
        decoded at three scales at once and there is nothing to refine.)"""
        if self._predictor is None or not self._refines(self._predictor):
            return
        jobs = [(r.plane, r.prompt) for r in results if isinstance(r, PlanePrediction)
                and not r.refined and r.scales == 1 and wanted.get(r.plane) == r.prompt]
        if jobs:  # a newer prompt stops it (it would be stale): interruptible
            layer = self.image_layer
            self.predict_runner.submit(
                self._refine_job, self.model_picker.choice(), jobs, self.mode_combo.currentText(),
                time.perf_counter(), self._refine_scales, layer, on_result=partial(self._apply_for, layer),
                interruptible=True)

    def _show_maps(self, plane: Plane, pred) -> None:
        """Write ``pred``'s mask, uncertainty and overlay into the layers' ``plane``: only the
        part where the last maps shown there or the new ones can be non-zero (their extents),
        not the whole plane (~100 ms a click for 8192²), unless a plane's extent is unknown."""
        whole = (0, 0, *pred.mask.shape)
        old, new = self._extents.pop(plane, None), pred.extent or whole
        if old is None:
            old = new if self._known else whole  # (a plane not listed is zero when known)
        r0, c0, r1, c1 = _box_union(old, new, self._painted.get(plane))
        part = (slice(r0, r1), slice(c0, c1))
        index = tuple(plane) + part
        self.current.data[index] = pred.mask[part]
        unc = pred.uncertainty[part]
        self.uncertainty.data[index] = unc
        self.overlay.data[index] = unc > self.threshold
        self._extents[plane] = new

    def _forget_extents(self, event=None) -> None:
        """The layers were changed other than by the widget (replaced, or a paint it cannot
        read): until the widget has zeroed them again, each plane's next prediction rewrites
        all of it."""
        self._extents.clear()
        self._painted.clear()
        self._known = False

    def _on_current_painted(self, event) -> None:
        """The user painted the current object: its next prediction and commit cover the box."""
        boxes = painted_boxes(getattr(event, "value", None), self.current.data.shape, self.n_lead)
        if boxes is None:
            self._forget_extents()
            return
        for plane, box in boxes:
            self._painted[plane] = _box_union(box, self._painted.get(plane))

    def _current_parts(self) -> list[tuple]:
        """Indices of the current-object layer that hold every non-zero pixel it can have."""
        if not self._known:
            return [(...,)]
        parts = []
        for plane in self._extents.keys() | self._painted.keys():
            r0, c0, r1, c1 = _box_union(self._extents.get(plane), self._painted.get(plane))
            parts.append(tuple(plane) + (slice(r0, r1), slice(c0, c1)))
        return parts

    def _clear_current_plane(self, plane: Plane) -> None:
        if not self._plane_in_range(plane):
            self._shown_prompts.pop(plane, None)
            return
        self.current.data[plane] = 0  # one plane: (after a paint the layer is unknown elsewhere)
        self.current.refresh()
        self._current_preds.pop(plane, None)
        self._shown_prompts.pop(plane, None)

    # ================================================================== undo / clear / commit
    def undo(self) -> None:
        """Remove the most recent point or box."""
        if not self._history:
            return
        kind = self._history.pop()
        layer = self.prompts if kind == "point" else self.boxes
        if len(layer.data):
            # remove_selected keeps the features table (point labels) in step with the data
            layer.selected_data = {len(layer.data) - 1}
            layer.remove_selected()
            if kind == "point":
                self._recolor_points()
        self._schedule_prediction()

    def clear_prompts(self) -> None:
        """Remove all prompts and the current object (committed objects stay)."""
        self.predict_runner.cancel_pending()
        self._history.clear()
        with self.prompts.events.data.blocker(), self.boxes.events.data.blocker():
            self.prompts.data = np.empty((0, self.prompts.ndim))
            self.boxes.data = []
        for part in self._current_parts():  # not the whole stack: where it can be non-zero
            self.current.data[part] = 0
        self.current.refresh()
        self._current_preds.clear()
        self._shown_prompts.clear()
        self._reprompt_id = None  # an object being re-prompted stays as it was

    def commit(self) -> int | None:
        """Write the current object into the objects layer with a new id (or the id being
        re-prompted) and clear the prompts. Returns the id, or None when there is nothing."""
        if not self._ensure_layers():
            return None
        wanted = self.prompts_by_plane()
        if any(wanted.get(p) != self._shown_prompts.get(p) for p in set(wanted) | set(self._shown_prompts)
               if self._plane_in_range(p) and not (wanted.get(p) is None or wanted[p].empty)):
            show_warning("the mask of the latest prompts is still being computed: commit when it shows")
            return None
        reprompt = self._reprompt_id if self._reprompt_objects is self.objects else None
        # committed objects are protected: a new mask only fills unlabelled pixels (and those of
        # the object being re-prompted), so a sloppy click never erases earlier work.
        # Only where the current object can be (its planes' extents), not the whole stack.
        pieces = []
        for part in self._current_parts():
            objs = np.asarray(self.objects.data[part])
            free = objs == 0 if reprompt is None else (objs == 0) | (objs == reprompt)
            mask = (np.asarray(self.current.data[part]) > 0) & free
            if mask.any():
                pieces.append((part, mask, objs))
        if not pieces:
            show_warning("nothing to commit: click on an object first (or wait for its mask); "
                         "pixels of committed objects are not overwritten")
            return None
        obj_id, new = (reprompt, False) if reprompt is not None else (self._next_id(), True)
        if reprompt is not None:  # it is replaced on the planes it was prompted on; its others stay
            self._drop_pixels_outside_current(reprompt, self._planes_of(pieces))
        for part, mask, objs in pieces:
            objs[mask] = obj_id
            if not isinstance(self.objects.data, np.ndarray):  # objs was a copy: write it back
                self.objects.data[part] = objs
        self.objects.refresh()
        ious = [r.iou for r in self._current_preds.values()]
        prompts = {plane: r.prompt for plane, r in self._current_preds.items()}
        if reprompt is not None and reprompt in self.records:  # its other planes' prompts stay
            prompts = {**(self.records[reprompt].prompts or {}), **prompts}
        # a new id has no pixels but these: measure it on the rows and columns they span
        where = None
        if new and self._known:
            rows = [p[-2] for p, _, _ in pieces]
            cols = [p[-1] for p, _, _ in pieces]
            where = (slice(min(r.start for r in rows), max(r.stop for r in rows)),
                     slice(min(c.start for c in cols), max(c.stop for c in cols)))
        self._record(obj_id, float(np.mean(ious)) if ious else float("nan"), prompts, where)
        self.clear_prompts()
        self.objects.selected_label = obj_id
        self._select_row_of(obj_id)  # so that Propagate (or Delete) right after acts on it
        self.status.setText(f"committed object {obj_id}; {len(self.records)} objects")
        return obj_id

    def _planes_of(self, pieces: list) -> set[Plane]:
        """The planes (leading indices) commit's ``pieces`` write to."""
        planes: set[Plane] = set()
        for part, mask, _ in pieces:
            if part == (...,):  # the whole stack: the planes where the mask has pixels
                lead = mask.reshape(*mask.shape[: self.n_lead], -1).any(-1)
                planes |= {tuple(int(v) for v in i) for i in np.argwhere(lead)} if self.n_lead else {()}
            else:
                planes.add(tuple(int(v) for v in part[: self.n_lead]))
        return planes

    def _drop_pixels_outside_current(self, obj_id: int, planes: set[Plane]) -> None:
        """Unlabel ``obj_id``'s pixels on ``planes`` that the current object does not cover."""
        for plane in planes:
            objs = np.asarray(self.objects.data[plane])
            stale = (objs == obj_id) & ~(np.asarray(self.current.data[plane]) > 0)
            if stale.any():
                objs[stale] = 0
                if not isinstance(self.objects.data, np.ndarray):
                    self.objects.data[plane] = objs

    def _next_id(self) -> int:
        top = int(self.objects.data.max()) if self.objects.data.size else 0
        return max(top, max(self.records, default=0)) + 1

    # ================================================================== objects table
    def _record(self, obj_id: int, iou: float, prompts: dict | None = None, where: tuple | None = None) -> None:
        """Measure ``obj_id`` for the table: in the whole stack, or only in the (rows, cols)
        ``where`` of every plane when all its pixels lie there."""
        if where is None:
            rec = measure_object(obj_id, self.objects.data, self.uncertainty.data, self.n_lead, iou, prompts)
        else:
            part = (..., *where)
            rec = measure_object(obj_id, np.asarray(self.objects.data[part]), np.asarray(self.uncertainty.data[part]),
                                 self.n_lead, iou, prompts)
            if rec is not None:  # back to the stack's coordinates
                shift = (0,) * self.n_lead + (where[0].start, where[1].start)
                rec.centroid = tuple(c + o for c, o in zip(rec.centroid, shift))
        if rec is None:
            self.records.pop(obj_id, None)
        else:
            old = self.records.get(obj_id)
            if old is not None and not prompts:
                rec.prompts = old.prompts
            self.records[obj_id] = rec
        self._fill_object_table()

    def _rebuild_records(self) -> None:
        """Records for objects already in a reused objects layer (no IoU known)."""
        ids = np.unique(self.objects.data)
        for obj_id in ids[ids > 0]:
            rec = measure_object(int(obj_id), self.objects.data, self.uncertainty.data, self.n_lead)
            if rec is not None:
                self.records[int(obj_id)] = rec
        self._fill_object_table()

    def _fill_object_table(self) -> None:
        table = self.object_table
        table.setSortingEnabled(False)
        table.setRowCount(len(self.records))
        for row, rec in enumerate(self.records.values()):
            cells = [rec.id, rec.plane_text, rec.area, round(rec.mean_uncertainty, 3), round(rec.iou_score, 3)]
            for col, value in enumerate(cells):
                item = QTableWidgetItem()
                item.setData(Qt.ItemDataRole.DisplayRole, value)  # numbers sort as numbers
                table.setItem(row, col, item)
        table.setSortingEnabled(True)

    def _row_id(self, row: int) -> int | None:
        item = self.object_table.item(row, 0)
        return None if item is None else int(item.data(Qt.ItemDataRole.DisplayRole))

    def _on_object_row(self, row: int, col: int) -> None:
        obj_id = self._row_id(row)
        if obj_id is not None:
            self.focus_object(obj_id)

    def selected_object(self) -> int | None:
        rows = self.object_table.selectionModel().selectedRows()
        if rows:
            return self._row_id(rows[0].row())
        return self._focused_id

    def _select_row_of(self, obj_id: int) -> None:
        """Select ``obj_id`` in the objects table (what Propagate, Delete and Re-prompt act on)."""
        self._focused_id = obj_id
        for row in range(self.object_table.rowCount()):
            if self._row_id(row) == obj_id:
                self.object_table.selectRow(row)
                return

    def focus_object(self, obj_id: int) -> None:
        """Show ``obj_id``: its least certain plane, centred, selected in layer and table."""
        rec = self.records.get(obj_id)
        if rec is None:
            return
        self._focused_id = obj_id
        plane = rec.worst_plane
        mask = self.objects.data[plane] == obj_id if plane else self.objects.data == obj_id
        r, c = plane_centroid(mask)
        self._go_to((*plane, r, c))
        self.objects.selected_label = obj_id
        self._select_row_of(obj_id)
        self.status.setText(
            f"object {obj_id}: mean uncertainty {rec.mean_uncertainty:.3f}, area {rec.area}, planes {rec.plane_text}")

    def _go_to(self, data_coords) -> None:
        """Move the dims slider(s) and the camera to a data-coordinate position of the image."""
        world = np.asarray(self.image_layer.data_to_world(np.asarray(data_coords, float)))
        offset = self.viewer.dims.ndim - len(world)
        for i in range(self.n_lead):
            self.viewer.dims.set_point(offset + i, float(world[i]))
        self.viewer.camera.center = tuple(float(v) for v in world[-2:])

    def next_uncertain_object(self) -> int | None:
        if not self._need_image():
            return None
        rec = next_uncertain(list(self.records.values()), self._focused_id)
        if rec is None:
            show_info("no committed objects yet")
            return None
        self.focus_object(rec.id)
        return rec.id

    def delete_selected(self) -> None:
        if not self._need_image():
            return
        obj_id = self.selected_object()
        if obj_id is None:
            show_warning("select an object in the table first")
            return
        # a propagation of it would write its later planes back
        self.stop_propagation_of(obj_id, f"object {obj_id} was deleted")
        self.objects.data[self.objects.data == obj_id] = 0
        self.objects.refresh()
        self.records.pop(obj_id, None)
        self._propagation.pop(obj_id, None)
        self._focused_id = None
        self._fill_object_table()

    def reprompt_selected(self) -> None:
        """Take the selected object back into editing: its prompts return to the prompt layers,
        and the next commit replaces it, keeping its id, on the planes prompted (its other
        planes, e.g. propagated ones, stay); until then, and after Clear, it stays as it was."""
        obj_id = self.selected_object()
        rec = self.records.get(obj_id) if obj_id is not None else None
        if rec is None:
            show_warning("select an object in the table first")
            return
        self.stop_propagation_of(obj_id, f"object {obj_id} is re-prompted")
        self.clear_prompts()
        # it stays in the objects layer and the table until a commit replaces it (Clear, or
        # binding another image, leaves it as it was)
        self._reprompt_id, self._reprompt_objects = obj_id, self.objects
        prompts = rec.prompts or {}
        for plane, prompt in prompts.items():
            for (r, c), lab in zip(prompt.points, prompt.labels):
                self.add_point((*plane, r, c), positive=bool(lab))
            if prompt.box is not None:
                self.add_box(plane, prompt.box)
        self.status.setText(
            f"re-prompting object {obj_id}: " + ("edit its prompts" if prompts else "it has no stored prompts: click it")
            + "; commit replaces it on the planes prompted (its other planes stay), Clear keeps it as it was")

    # ================================================================== threshold overlay
    @property
    def threshold(self) -> float:
        return self.threshold_slider.value() / 100.0

    def _on_threshold(self, value: int) -> None:
        self.threshold_label.setText(f"{value / 100:.2f}")
        if self.overlay is None:
            return
        np.greater(self.uncertainty.data, self.threshold, out=self.overlay.data.view(bool))
        self.overlay.visible = True
        self.overlay.refresh()

    def _update_overlay(self, plane: Plane) -> None:
        self.overlay.data[plane] = self.uncertainty.data[plane] > self.threshold

    # ================================================================== precompute / propagate
    def _start_task(self, label: str, total: int) -> bool:
        # (a stopped task still winding down does not count: the new one starts after it)
        if self.task_runner.busy and not self._task_stale:
            show_warning("another task is running: wait for it or cancel it")
            return False
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(0)
        self.cancel_button.setEnabled(True)
        self.status.setText(label)
        return True

    def _task_done(self) -> None:
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)

    def _new_task(self, obj_id: int | None = None) -> tuple[int, threading.Event]:
        """(UI thread, before submitting) A new task on the bound image: its token (what the
        callbacks compare with ``_task_token``) and its stop flag (what its worker reads)."""
        self._task_token += 1
        self._task_stop = threading.Event()
        self._task_image, self._task_obj, self._task_stale = self.image_layer, obj_id, False
        self._cancelled = False
        return self._task_token, self._task_stop

    def _task_running(self) -> bool:
        return self.task_runner.busy and not self._task_stale

    def _stop_task(self, reason: str) -> str | None:
        """Stop the running Precompute or Propagate at once, because the image or object it
        works on changed: its worker stops at its next plane, whatever it still sends is
        dropped, and the bar and Cancel are reset. The status line it set; None when none ran."""
        if not self._task_running():
            return None
        what = "precompute" if self._task_obj is None else "propagation"
        self._task_stop.set()
        self._task_stale = True
        self._task_token += 1
        self.task_runner.quit()  # (drops a task queued behind a stopped one, unstarted)
        self._task_done()
        text = f"{what} stopped: {reason}"
        self.status.setText(text)
        return text

    def stop_propagation_of(self, obj_id: int, reason: str | None = None) -> bool:
        """Stop the running propagation of ``obj_id``, if any, before the object is changed
        (deleted, re-prompted): the planes it has not written yet are dropped, those written
        stay. True when one was stopped."""
        if self._task_obj != obj_id or not self._task_running():
            return False
        self._stop_task(reason or f"object {obj_id} changed")
        return True

    def cancel_task(self) -> None:
        """Stop precompute/propagation after the plane in progress; finished planes are kept."""
        self._cancelled = True
        self._task_stop.set()
        queued = self.task_runner._pending is not None  # behind a stopped task: never started
        self.task_runner.quit()
        if queued:
            self._task_stale = True
            self._task_token += 1
            self._task_done()
            self.status.setText("cancelled")
            return
        self.status.setText("cancelling…")

    def precompute_all(self) -> None:
        """Embed every plane of the image in a worker (later clicks on any plane are fast):
        the whole plane, or on planes larger than the model's window every window a click can
        use, at the scales a click and its refinement decode; up to
        ``precompute_memory_fraction`` of the free memory."""
        if not self._need_image():
            return
        planes = list(itertools.product(*(range(n) for n in self.spatial_shape[:-2])))
        if not self._start_task(f"embedding {len(planes)} planes…", len(planes) * PRECOMPUTE_STEPS):
            return
        token, stop = self._new_task()
        self._precompute_full = None
        self.task_runner.submit(self._precompute_job, self.model_picker.choice(), planes, self.image_layer.data, stop,
                                on_yield=lambda value: self._on_task_progress(value, token),
                                on_finished=lambda: self._on_precompute_done(token))

    @staticmethod
    def _plane_of(data, plane: Plane) -> np.ndarray:
        """``data[plane]`` (the whole of a 2D image) as an array."""
        return np.asarray(data[plane] if plane else data)

    def _precompute_job(self, choice: ModelChoice, planes: list, data=None, stop: threading.Event | None = None):
        """Worker: embed ``planes`` of ``data`` (the image it was started on, whatever is bound
        meanwhile) until ``stop`` is set."""
        from ..model.predictor import embedding_budget

        data = self.image_layer.data if data is None else data
        stop = threading.Event() if stop is None else stop
        scales = self._refine_scales or self._scales  # those a click and its refinement decode at
        budget, per_window, windows_done = None, None, 0
        for i, plane in enumerate(planes):
            arr = self._plane_of(data, plane)  # read outside the lock: the disk may be slow
            if self._predictor is not None and self._predictor.auto_zoom:
                self._zoom_job(self._predictor, arr, ())  # the size estimate, outside the lock too
            with self._model_lock:
                if stop.is_set():  # set on the UI thread; quit() only acts at a yield
                    break
                # a plane that fits the window is embedded whole here (at every scale)
                predictor = self._scaled_predictor(choice, arr, scales)
                if budget is None:
                    budget = embedding_budget(predictor.device, self.precompute_memory_fraction)
                windows, key = predictor.click_windows(), predictor.image_key
                stored = predictor.cache_bytes
            for k, (zoom, window) in enumerate(windows):
                if k:  # the bar moves through a plane's windows (a large 2D image is one plane)
                    yield i * PRECOMPUTE_STEPS + k * PRECOMPUTE_STEPS // len(windows)
                if stored + (per_window or 0) > budget:
                    self._precompute_full = budget
                    break
                with self._model_lock:
                    if stop.is_set():
                        break
                    predictor = self._scaled_predictor(choice, arr, scales, key)
                    windows_done += 1
                    predictor.cache_size = max(predictor.cache_size, windows_done + 1)
                    before = predictor.cache_bytes if per_window is None else None
                    predictor.embed_window(zoom, window)
                    if before is not None and predictor.cache_bytes > before:
                        per_window = predictor.cache_bytes - before  # every window takes the same
                stored += per_window or 0
            if stop.is_set() or self._precompute_full is not None:
                break
            yield (i + 1) * PRECOMPUTE_STEPS

    def _on_task_progress(self, value, token: int | None = None) -> None:
        if token is not None and token != self._task_token:
            return  # from a task stopped since (the image or its object changed)
        if isinstance(value, int):
            self.progress.setValue(value)
        elif isinstance(value, dict):
            self._apply_propagated_plane(value)

    def _on_precompute_done(self, token: int | None = None) -> None:
        if token is not None and token != self._task_token:
            return  # stopped since: the bar and status were reset then
        done, total = self.progress.value() // PRECOMPUTE_STEPS, self.progress.maximum() // PRECOMPUTE_STEPS
        self._task_done()
        word = "cancelled after embedding" if self._cancelled else "embedded"
        text = f"{word} {max(done, 0)} of {total} planes"
        if self._precompute_full is not None:
            text += (f": stopped at {self._precompute_full / 2**30:.2g} GB of embeddings "
                     f"({self.precompute_memory_fraction:.0%} of the free memory); the other planes are "
                     "embedded when clicked")
        self.status.setText(text)

    def propagate(self) -> None:
        """Carry the current (committed first) or selected object through the chosen axis."""
        if not self._need_image():
            return
        if self.n_lead == 0:
            show_warning("propagation needs a stack (z or t axis)")
            return
        plane = self.current_plane()
        if (self.current.data[plane] > 0).any():
            obj_id = self.commit()
        else:
            obj_id = self.selected_object()
        if obj_id is None or not (self.objects.data[plane] == obj_id).any():
            show_warning("nothing to propagate: make an object on this plane or select one that is on it")
            return
        axis = max(0, self.axis_combo.currentIndex())
        n = self.spatial_shape[axis]
        if not self._start_task(f"propagating object {obj_id} along axis {axis}…", n - 1):
            return
        start_mask = self.objects.data[plane] == obj_id
        self._propagation[obj_id] = {"axis": axis, "plane": plane, "planes": {plane[axis]: float(
            self.uncertainty.data[plane][start_mask].mean())}, "stops": []}
        self.plane_table.setRowCount(0)
        self._add_plane_row(plane[axis], int(start_mask.sum()), self._propagation[obj_id]["planes"][plane[axis]])
        token, stop = self._new_task(obj_id)
        self.task_runner.submit(self._propagate_job, self.model_picker.choice(), obj_id, axis, plane, start_mask,
                                self.mode_combo.currentText(), n, self.image_layer.data, stop,
                                on_yield=lambda value: self._on_task_progress(value, token),
                                on_finished=lambda: self._on_propagate_done(obj_id, token))

    def _propagate_job(self, choice, obj_id, axis, plane, start_mask, mode, n_planes: int | None = None,
                       data=None, stop: threading.Event | None = None):
        """Worker: carry ``obj_id`` through the ``n_planes`` planes of ``data`` (the image it was
        started on, whatever is bound meanwhile) until the stop rule or ``stop``."""
        from ..model.propagation import iter_propagate

        data = self.image_layer.data if data is None else data
        n_planes = self.spatial_shape[axis] if n_planes is None else n_planes
        stop = threading.Event() if stop is None else stop
        read: dict[int, np.ndarray] = {}  # the plane read last, for the segmenter and the stop rule

        def get_plane(index):
            if index not in read:
                read.clear()
                read[index] = self._plane_of(data, plane[:axis] + (index,) + plane[axis + 1:])
            return read[index]

        def segment(index, prompt):
            arr = get_plane(index)
            with self._model_lock:
                if stop.is_set():  # set on the UI thread; quit() only acts at a yield
                    raise _TaskStopped
                predictor = self._ensure_predictor(choice)
                predictor.set_image(arr)
                return predictor.predict(points=prompt.points, labels=prompt.labels, box=prompt.box, mode=mode)

        done = 0
        try:
            for direction, res, reason in iter_propagate(segment, n_planes, plane[axis], start_mask,
                                                         keep_uncertainty=True, get_plane=get_plane):
                done += 1
                yield {"obj_id": obj_id, "axis": axis, "plane": plane, "result": res, "reason": reason, "done": done}
        except _TaskStopped:
            pass
        return obj_id

    def _apply_propagated_plane(self, msg: dict) -> None:
        obj_id, axis, res = msg["obj_id"], msg["axis"], msg["result"]
        record = self._propagation.get(obj_id)
        if record is None:  # forgotten since (the object was deleted)
            return
        self.progress.setValue(min(self.progress.maximum(), msg["done"]))
        if msg["reason"]:
            record["stops"].append(msg["reason"])
        if res is None:
            return
        full = msg["plane"][:axis] + (res.index,) + msg["plane"][axis + 1:]
        target = self.objects.data[full]
        target[target == obj_id] = 0
        target[res.mask & (target == 0)] = obj_id  # other objects are protected, as in commit
        self.uncertainty.data[full] = res.uncertainty
        self._extents[full] = (0, 0, *res.uncertainty.shape)
        self._update_overlay(full)
        record["planes"][res.index] = res.mean_uncertainty
        self._add_plane_row(res.index, res.area, res.mean_uncertainty)
        self.objects.refresh()
        self.uncertainty.refresh()

    def _add_plane_row(self, index: int, area: int, mean_u: float) -> None:
        table = self.plane_table
        table.setSortingEnabled(False)
        row = table.rowCount()
        table.insertRow(row)
        for col, value in enumerate((int(index), int(area), round(float(mean_u), 3))):
            item = QTableWidgetItem()
            item.setData(Qt.ItemDataRole.DisplayRole, value)
            table.setItem(row, col, item)
        table.setSortingEnabled(True)
        table.sortItems(0)

    def _on_propagate_done(self, obj_id: int, token: int | None = None) -> None:
        if token is not None and token != self._task_token:
            return  # stopped since (the image or the object changed): the bar and status were reset then
        self._task_done()
        rec = self._propagation.get(obj_id)
        if rec is None:  # forgotten meanwhile (the object was deleted)
            self.status.setText(f"propagation of object {obj_id} ended: the object is gone")
            return
        self._record(obj_id, self.records[obj_id].iou_score if obj_id in self.records else float("nan"))
        planes = sorted(rec["planes"])
        why = "propagation cancelled" if self._cancelled else "; ".join(rec["stops"])
        self.status.setText(f"object {obj_id} spans planes {planes[0]}-{planes[-1]}; {why}")
        self._focused_id = obj_id

    def propagation_curve(self, obj_id: int | None = None) -> dict[int, float]:
        """Plane index -> mean uncertainty of the last propagation of ``obj_id``."""
        if not self._propagation:
            return {}
        obj_id = obj_id if obj_id is not None else list(self._propagation)[-1]
        return dict(sorted(self._propagation[obj_id]["planes"].items()))

    def go_to_worst_plane(self) -> int | None:
        """Jump to the plane where the last propagated object is least certain."""
        if not self._propagation:
            show_info("propagate an object first")
            return None
        obj_id = list(self._propagation)[-1]
        curve = self.propagation_curve(obj_id)
        worst = max(curve, key=curve.get)
        info = self._propagation[obj_id]
        plane = info["plane"][: info["axis"]] + (worst,) + info["plane"][info["axis"] + 1:]
        mask = self.objects.data[plane] == obj_id
        r, c = plane_centroid(mask) if mask.any() else (self.spatial_shape[-2] / 2, self.spatial_shape[-1] / 2)
        self._go_to((*plane, r, c))
        return worst

    def _on_plane_row(self, row: int, col: int) -> None:
        item = self.plane_table.item(row, 0)
        if item is None or not self._propagation:
            return
        info = self._propagation[list(self._propagation)[-1]]
        index = int(item.data(Qt.ItemDataRole.DisplayRole))
        plane = info["plane"][: info["axis"]] + (index,) + info["plane"][info["axis"] + 1:]
        self._go_to((*plane, self.spatial_shape[-2] / 2, self.spatial_shape[-1] / 2))

    # ================================================================== model change
    def _on_views_changed(self, text: str) -> None:
        self._views = text
        self._forget_model()  # same model, but every plane re-predicts in the new views

    def _on_scales_changed(self, text: str) -> None:
        self._scales, self._refine_scales = ("1", 3) if text == REFINE else (text, None)
        self._forget_model()  # same model, but every plane re-predicts at the new scales

    def _on_zoom_changed(self, value: float) -> None:
        self._zoom = zoom_of(self.zoom_spin)
        self._forget_model()  # same model, but every plane re-predicts at the new zoom

    def _forget_model(self) -> None:
        # the next job loads the new choice (a running job keeps its model until it ends);
        # forgetting what is shown makes every plane with prompts re-predict with it
        self._shown_prompts.clear()
        if self.image_layer is not None:
            self._schedule_prediction()

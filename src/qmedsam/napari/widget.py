"""The dock widget: pick an image, draw rectangles, get one label per box in a Labels layer; click to correct.

Every rectangle added or moved on the widget's Shapes layer becomes a job; jobs run one at a time off the
UI thread (napari's thread workers) on one `qmedsam.Segmenter`, so each slice is encoded once and every later
box on it costs only the decoder. A 3D box is the rectangle's xy extent over its z range (the project's fixed
3D rule), reported slice by slice and cancellable; the Labels layer is only written when a job finishes, so a
cancelled job leaves every layer as it was.

"3D from this slice" ticked: a rectangle drawn on a volume, in whichever view napari shows (axial, coronal or
sagittal), is one box on one slice, and the whole object is found from it (`Segmenter.segment_from_slice`: the
walk outward both ways with its stop rule, the image layer's scale as the voxel spacing), slice by slice with
progress and cancel like a 3D box. Such objects take no clicks (clicks refine boxes drawn without it).

Clicks live on the widget's Points layer (napari's add mode), each tied to an object (a box's label) and a
slice: a click adds an include point to the selected object, Shift-click or right-click (or any click with
"Exclude" ticked) an exclude point. Adding, removing (Undo, Ctrl+Z, napari's delete) or moving a click re-runs
that object on that slice with its box and all its clicks there: a decoder run, the slice's embedding is cached.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from app_model.types import KeyCode, KeyMod
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from qmedsam.data.cases import CaseError
from qmedsam.errors import UserFacingError
from qmedsam.napari.io import PROMPTS_SUFFIX, prompts_path, read_prompts, save_labels, write_prompts
from qmedsam.napari.layers import (
    CLICK_FEATURES,
    FEATURES,
    WINDOWS,
    BoxJob,
    ObjectPrompts,
    box_rectangle,
    model_image,
    no_clicks,
    paint,
    rectangle_box,
    slice_box_rectangle,
    slice_rectangle,
    z_range,
)
from qmedsam.segmenter import Segmenter

MODELS = (("int8 (shipped)", "int8"), ("fp32 (pretrained)", "fp32"))
CACHED_SLICES = 128
"""Slice embeddings the widget keeps (4 MiB each, 512 MiB at most): a second 3D box over a typical organ's
slices costs only the decoder."""
CHOOSE_FOLDER = "Model folder…"
UNDO_KEY = KeyMod.CtrlCmd | KeyCode.KeyZ  # Ctrl+Z (Cmd+Z on macOS) on the clicks layer
RIGHT_BUTTON = 2  # vispy's mouse button numbers: 1 left, 2 right, 3 middle


@dataclass
class Timing:
    """What one job cost: encoder (slices encoded by it), decoder (+ post-processing), and box drawn or click
    made -> mask shown; `clicks` the object's clicks it used (a click job: `slices` is 1, the clicked slice)."""

    label: int
    slices: int
    encoded: int
    encode_ms: float
    decode_ms: float
    shown_ms: float = 0.0
    clicks: int = 0


@dataclass
class _Queued:
    job: BoxJob
    queued_at: float = field(default_factory=time.perf_counter)


class SegmentWidget(QWidget):
    """qmedsam's napari dock widget (see the module docstring)."""

    def __init__(self, napari_viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.image_layer = None
        self.boxes_layer = None
        self.masks_layer = None
        self.clicks_layer = None
        self.timings: list[Timing] = []
        self._segmenter = None
        self._segmenter_model: str | None = None
        self._prepared: tuple | None = None
        self._model_volume: np.ndarray | None = None
        self._queue: deque[_Queued] = deque()
        self._worker = None
        self._running: _Queued | None = None
        self._quiet = False  # the widget's own edits of the boxes/clicks layers: no jobs from their events
        self._pending_clicks: set[tuple[int, int]] = set()  # (object, slice) of clicks being removed or moved
        self._build_ui()
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)
        self._refresh_images()

    # -- UI ----------------------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        for text, model in MODELS:
            self.model_combo.addItem(text, model)
        self.model_combo.addItem(CHOOSE_FOLDER, None)
        self.window_combo = QComboBox()
        self.window_combo.addItems(WINDOWS)
        self.window_combo.setToolTip(
            "auto: uint8 images as they are; CT in Hounsfield units with a soft-tissue window; others by percentiles"
        )
        self.z_from, self.z_to = QSpinBox(), QSpinBox()
        z_row = QHBoxLayout()
        z_row.addWidget(self.z_from)
        z_row.addWidget(QLabel("to"))
        z_row.addWidget(self.z_to)
        self.from_slice_check = QCheckBox("3D from this slice")
        self.from_slice_check.setToolTip(
            "A rectangle drawn on a volume (any view) finds the whole object: slice by slice outward from it, "
            "stopping where the object ends"
        )
        z_row.addWidget(self.from_slice_check)
        self.object_spin = QSpinBox()
        self.object_spin.setRange(0, 65535)
        self.object_spin.setSpecialValueText("none")
        self.object_spin.setToolTip("The object clicks refine: the box drawn or selected last (its label)")
        self.clicks_button = QPushButton("Click")
        self.clicks_button.setToolTip("Activate the clicks layer: click includes, Shift-click or right-click excludes")
        self.exclude_check = QCheckBox("Exclude")
        self.exclude_check.setToolTip("Every click adds an exclude point (for trackpads)")
        self.undo_button = QPushButton("Undo click")
        self.undo_button.setToolTip("Remove the object's last click (Ctrl+Z on the clicks layer)")
        click_row = QHBoxLayout()
        for widget in (self.clicks_button, self.exclude_check, self.undo_button):
            click_row.addWidget(widget)
        self.segment_all_button = QPushButton("Segment all boxes")
        self.cancel_button = QPushButton("Cancel")
        self.save_button = QPushButton("Save masks…")
        self.load_button = QPushButton("Load boxes + clicks…")
        self.progress = QProgressBar()
        self.status_label = QLabel("Pick an image, then draw rectangles.")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Window", self.window_combo)
        form.addRow("3D box z", z_row)
        form.addRow("Object", self.object_spin)
        form.addRow("Clicks", click_row)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for widget in (self.segment_all_button, self.cancel_button, self.save_button, self.load_button, self.progress):
            layout.addWidget(widget)
        layout.addWidget(self.status_label)
        layout.addStretch()

        self.image_combo.currentIndexChanged.connect(self._image_chosen)
        self.model_combo.activated.connect(self._model_chosen)
        self.z_from.valueChanged.connect(self._z_edited)
        self.z_to.valueChanged.connect(self._z_edited)
        self.segment_all_button.clicked.connect(self.segment_all)
        self.cancel_button.clicked.connect(self.cancel)
        self.save_button.clicked.connect(self._save_clicked)
        self.load_button.clicked.connect(self._load_clicked)
        self.clicks_button.clicked.connect(self._activate_clicks)
        self.undo_button.clicked.connect(self.undo_click)

    def _refresh_images(self, event=None) -> None:
        from napari.layers import Image

        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        chosen = self.image_combo.currentText()
        if chosen and (self.image_layer is None or self.image_layer.name != chosen):
            self._image_chosen()

    def _model_chosen(self, index: int) -> None:
        if self.model_combo.itemData(index) is None:
            folder = QFileDialog.getExistingDirectory(self, "OpenVINO model folder (encoder.xml, decoder.xml)")
            if not folder:
                self.model_combo.setCurrentIndex(0)
                return
            self.model_combo.insertItem(index, folder, folder)
            self.model_combo.setCurrentIndex(index)

    def set_model(self, model: str) -> None:
        """'int8', 'fp32' or a model folder (what the combo box offers)."""
        index = self.model_combo.findData(model)
        if index < 0:
            self.model_combo.insertItem(self.model_combo.count() - 1, model, model)
            index = self.model_combo.findData(model)
        self.model_combo.setCurrentIndex(index)

    # -- layers ------------------------------------------------------------------------------------------------

    def _image_chosen(self, *args) -> None:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            return
        self.cancel()
        if self.boxes_layer is not None:
            self.boxes_layer.events.data.disconnect(self._boxes_changed)
            self.boxes_layer.selected_data.events.items_changed.disconnect(self._box_selected)
        if self.clicks_layer is not None:
            self._release_clicks_layer(self.clicks_layer)
        self.image_layer = self.viewer.layers[name]
        self._prepared = None
        spatial = self.spatial_shape
        self.boxes_layer = self._boxes_layer_for(self.image_layer, len(spatial))
        self.masks_layer = self._masks_layer_for(self.image_layer, spatial)
        self.clicks_layer = self._clicks_layer_for(self.image_layer, spatial)
        self.boxes_layer.events.data.connect(self._boxes_changed)
        self.boxes_layer.selected_data.events.items_changed.connect(self._box_selected)
        self.object_spin.setValue(0)
        depth = spatial[0] - 1 if len(spatial) == 3 else 0
        slice_now = int(self.viewer.dims.current_step[0]) if len(spatial) == 3 else 0
        for spin in (self.z_from, self.z_to):
            spin.blockSignals(True)
            spin.setRange(0, depth)
            spin.setValue(min(slice_now, depth))
            spin.setEnabled(len(spatial) == 3)
            spin.blockSignals(False)
        self.from_slice_check.setEnabled(len(spatial) == 3)
        self.viewer.layers.selection.active = self.boxes_layer
        self.boxes_layer.mode = "add_rectangle"

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        data = self.image_layer.data
        return tuple(data.shape[:2]) if self.image_layer.rgb else tuple(data.shape)

    def _boxes_layer_for(self, image, ndim: int):
        name = f"{image.name} boxes"
        if name in self.viewer.layers and self.viewer.layers[name].ndim == ndim:
            layer = self.viewer.layers[name]
            for key, default in FEATURES.items():
                if key not in layer.features:
                    layer.features[key] = default
        else:
            layer = self.viewer.add_shapes(
                ndim=ndim,
                name=name,
                edge_color="yellow",
                face_color="transparent",
                edge_width=2,
                scale=image.scale[-ndim:],
                translate=image.translate[-ndim:],
                features={key: np.zeros(0, np.int64) for key in FEATURES},
            )
        layer.feature_defaults = dict(FEATURES)
        return layer

    def _masks_layer_for(self, image, spatial: tuple[int, ...]):
        name = f"{image.name} masks"
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == spatial:
            return self.viewer.layers[name]
        ndim = len(spatial)
        return self.viewer.add_labels(
            np.zeros(spatial, np.uint16), name=name, scale=image.scale[-ndim:], translate=image.translate[-ndim:]
        )

    def _clicks_layer_for(self, image, spatial: tuple[int, ...]):
        from napari.layers import Points

        name, ndim = f"{image.name} clicks", len(spatial)
        existing = next((layer for layer in self.viewer.layers if layer.name == name), None)
        if isinstance(existing, Points) and existing.ndim == ndim:
            layer = existing
            for key, default in CLICK_FEATURES.items():
                if key not in layer.features:
                    layer.features[key] = default
        else:
            layer = self.viewer.add_points(
                ndim=ndim,
                name=name,
                size=max(3.0, max(spatial[-2:]) / 60),
                border_color="white",
                scale=image.scale[-ndim:],
                translate=image.translate[-ndim:],
                features={key: np.zeros(0, np.int64) for key in CLICK_FEATURES},
            )
        layer.feature_defaults = dict(CLICK_FEATURES)
        layer.mode = "add"
        if self._click_pressed not in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.insert(0, self._click_pressed)  # before napari's add, which runs on release
        layer.bind_key(UNDO_KEY, self._undo_key, overwrite=True)
        layer.events.data.connect(self._clicks_changed)
        self._style_clicks(layer)
        return layer

    def _release_clicks_layer(self, layer) -> None:
        layer.events.data.disconnect(self._clicks_changed)
        if self._click_pressed in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.remove(self._click_pressed)
        layer.bind_key(UNDO_KEY, None)

    @contextmanager
    def _editing(self):
        """The widget edits its own layers: their data events start no jobs."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    # -- boxes -> jobs -----------------------------------------------------------------------------------------

    def _boxes_changed(self, event) -> None:
        if self._quiet:
            return
        action = str(getattr(event, "action", ""))
        if action.endswith("added"):
            jobs = self._enqueue([i for i, label in enumerate(self.boxes_layer.features["label"]) if label == 0])
            if jobs:
                self.object_spin.setValue(jobs[-1].label)  # the box just drawn is the object clicks refine
        elif action.endswith("changed"):
            self._enqueue(sorted(i for i in event.data_indices if 0 <= i < len(self.boxes_layer.data)))
        elif action.endswith("removed"):
            self._drop_removed()

    def segment_all(self) -> None:
        """(Re-)segment every rectangle, in layer order (later boxes on top, as `qmedsam predict`)."""
        if self.boxes_layer is not None:
            self._enqueue(list(range(len(self.boxes_layer.data))))

    def _enqueue(self, rows: list[int]) -> list[BoxJob]:
        jobs = []
        for row in rows:
            try:
                job = self._job_for(row)
            except CaseError as exc:
                self._say(f"box {row + 1}: {exc}")
                continue
            self._add_job(job)
            jobs.append(job)
        self._run_next()
        return jobs

    def _add_job(self, job: BoxJob) -> None:
        """Queue `job`, replacing the object's queued job (it is computed with the box and clicks as they are now)."""
        self._queue = deque(q for q in self._queue if q.job.label != job.label)
        self._queue.append(_Queued(job))

    def _job_for(self, row: int) -> BoxJob:
        features = self.boxes_layer.features
        spatial = self.spatial_shape
        new = int(features.loc[row, "label"]) == 0
        one_slice = len(spatial) == 3 and (
            int(features.loc[row, "axis"]) >= 0 or (new and self.from_slice_check.isChecked())
        )
        if new:
            used = features["label"].to_numpy()
            features.loc[row, "label"] = int(used.max(initial=0)) + 1
        label = int(features.loc[row, "label"])
        vertices = np.array(
            [self.image_layer.world_to_data(self.boxes_layer.data_to_world(v)) for v in self.boxes_layer.data[row]]
        )
        if one_slice:
            axis, index, box = slice_rectangle(vertices[:, -3:], spatial)
            features.loc[row, "axis"], features.loc[row, "index"] = axis, index
            return BoxJob(label, box, no_clicks(), from_slice=(axis, index))
        box, drawn = rectangle_box(vertices[:, -len(spatial) :], spatial)
        clicks = self.object_clicks(label)
        if drawn is None:
            return BoxJob(label, box, clicks)
        z0, z1 = int(features.loc[row, "z0"]), int(features.loc[row, "z1"])
        if z0 < 0 or z1 < z0:
            z0, z1 = z_range(drawn, self.z_from.value(), self.z_to.value(), spatial[0])
            features.loc[row, "z0"], features.loc[row, "z1"] = z0, z1
        return BoxJob(label, np.array([box[0], box[1], z0, box[2], box[3], z1], dtype=np.int64), clicks)

    def _z_edited(self, *args) -> None:
        """With one box selected, the z spin boxes edit its z range (and re-segment it)."""
        layer = self.boxes_layer
        if layer is None or len(self.spatial_shape) != 3 or len(layer.selected_data) != 1:
            return
        (row,) = layer.selected_data
        if int(layer.features.loc[row, "axis"]) >= 0:  # a one-slice box has no z range
            return
        z0, z1 = sorted((self.z_from.value(), self.z_to.value()))
        layer.features.loc[row, "z0"], layer.features.loc[row, "z1"] = z0, z1
        self._enqueue([row])

    def _drop_removed(self) -> None:
        kept = {int(v) for v in self.boxes_layer.features["label"]}
        self._queue = deque(q for q in self._queue if q.job.label in kept)
        data = self.masks_layer.data
        for label in set(np.unique(data).tolist()) - kept - {0}:
            data[data == label] = 0
        self.masks_layer.refresh()
        orphans = [i for i, obj in enumerate(self.clicks_layer.features["object"]) if int(obj) not in kept]
        if orphans:  # a deleted box takes its clicks with it
            with self._editing():
                self.clicks_layer.remove(orphans)
            self._style_clicks(self.clicks_layer)
        if self.object_spin.value() not in kept:
            self.object_spin.setValue(0)

    def _box_selected(self, *args) -> None:
        """Selecting one rectangle makes its object the one clicks refine."""
        selected = list(self.boxes_layer.selected_data)
        if len(selected) == 1 and selected[0] < len(self.boxes_layer.features):
            label = int(self.boxes_layer.features.loc[selected[0], "label"])
            if label:
                self.object_spin.setValue(label)

    # -- clicks -> jobs ----------------------------------------------------------------------------------------

    def _activate_clicks(self) -> None:
        if self.clicks_layer is not None:
            self.viewer.layers.selection.active = self.clicks_layer
            self.clicks_layer.mode = "add"

    def _click_pressed(self, layer, event) -> None:
        """On mouse press on the clicks layer, before napari's add mode adds the point (on release, if the mouse
        did not drag): which object the point refines and whether it includes or excludes."""
        modified = "Shift" in event.modifiers or event.button == RIGHT_BUTTON
        exclude = self.exclude_check.isChecked() or modified
        layer.feature_defaults = {"object": self.object_spin.value(), "label": 0 if exclude else 1}

    def _click_rows(self, rows) -> np.ndarray:
        """(N, 4) rows (x, y, z, label) of clicks-layer points `rows`, in the image's pixel coordinates."""
        layer, out = self.clicks_layer, np.zeros((len(rows), 4))
        for i, row in enumerate(rows):
            position = self.image_layer.world_to_data(layer.data_to_world(layer.data[row]))
            out[i, 0], out[i, 1] = position[-1], position[-2]
            out[i, 2] = np.rint(position[0]) if len(position) == 3 else 0
            out[i, 3] = int(layer.features.loc[row, "label"])
        return np.round(out, 6)  # layer <-> image transforms leave 1e-13 noise; saved and reloaded clicks are these

    def object_clicks(self, label: int) -> np.ndarray:
        """Object `label`'s clicks in the order they were made: (N, 4) rows (x, y, z, label), x and y in image
        pixel coordinates, z the slice (0 in 2D), label 1 include / 0 exclude."""
        if self.clicks_layer is None:
            return no_clicks()
        objects = self.clicks_layer.features["object"].to_numpy()
        return self._click_rows(np.flatnonzero(objects == label))

    def _click_keys(self, rows) -> set[tuple[int, int]]:
        objects = self.clicks_layer.features["object"].to_numpy()
        rows = [int(r) for r in rows if 0 <= int(r) < len(objects)]
        return {(int(objects[r]), int(c[2])) for r, c in zip(rows, self._click_rows(rows), strict=True)}

    def _click_problem(self, row: int) -> str | None:
        """Why the click just added at `row` cannot refine anything, or None."""
        label = int(self.clicks_layer.features.loc[row, "object"])
        if label == 0:
            return "click ignored: no object selected; draw a box or select one first"
        rows = [i for i, value in enumerate(self.boxes_layer.features["label"]) if int(value) == label]
        if not rows:
            return f"click ignored: object {label} has no box"
        if int(self.boxes_layer.features.loc[rows[0], "axis"]) >= 0:
            return (
                f"click ignored: object {label} was found from one slice; clicks refine boxes drawn without "
                "'3D from this slice'"
            )
        segmenter = self._segmenter
        if (
            segmenter is not None
            and self._segmenter_model == self.model_combo.currentData()
            and not getattr(segmenter.engine, "takes_clicks", True)
        ):
            return (
                "click ignored: this model's decoder takes boxes only; pick int8, fp32 or a model exported with clicks"
            )
        x, y, z, _ = self._click_rows([row])[0]
        spatial = self.spatial_shape
        height, width = spatial[-2:]
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            return f"click ignored: ({x:.0f}, {y:.0f}) is outside the {width}x{height} image"
        if len(spatial) == 3:
            z0, z1 = (int(self.boxes_layer.features.loc[rows[0], key]) for key in ("z0", "z1"))
            if not z0 <= z <= z1:
                return f"click ignored: slice {z:.0f} is outside object {label}'s box (slices {z0}..{z1})"
        return None

    def _clicks_changed(self, event) -> None:
        if self._quiet or self.boxes_layer is None:
            return
        action = str(getattr(event, "action", ""))
        layer = self.clicks_layer
        if action.endswith(("removing", "changing")):
            self._pending_clicks |= self._click_keys(event.data_indices)
            return
        if action.endswith("added"):
            count = len(layer.data)
            rows = sorted({int(i) % count for i in event.data_indices}) if count else []
            problems = {row: self._click_problem(row) for row in rows}
            bad = [row for row, problem in problems.items() if problem]
            touched = self._click_keys([row for row in rows if row not in bad])
            if bad:
                self._say(str(problems[bad[-1]]))
                with self._editing():
                    layer.remove(bad)
        elif action.endswith(("removed", "changed")):
            touched = self._pending_clicks
            if action.endswith("changed"):
                touched = touched | self._click_keys(event.data_indices)
        else:
            return
        self._pending_clicks = set()
        self._style_clicks(layer)
        self._enqueue_clicks(touched)

    def _enqueue_clicks(self, touched: set[tuple[int, int]]) -> None:
        """Re-run each object whose clicks changed, from its box and all its clicks (on a volume a click also
        carries to neighbouring slices, as `Segmenter.predict` with a 3D box does (qmedsam.inference.click_reach);
        the slices' embeddings are cached, so only the decoder runs)."""
        rows = {int(label): row for row, label in enumerate(self.boxes_layer.features["label"]) if int(label)}
        for label in sorted({label for label, _ in touched}):
            if label not in rows:
                continue
            try:
                job = self._job_for(rows[label])
            except CaseError as exc:
                self._say(f"box {label}: {exc}")
                continue
            if job.from_slice is not None:
                continue
            self._add_job(job)
        self._run_next()

    def undo_click(self) -> None:
        """Remove the selected object's last click; its mask is recomputed without it."""
        label = self.object_spin.value()
        if self.clicks_layer is None or not label:
            self._say("undo: no object selected")
            return
        rows = np.flatnonzero(self.clicks_layer.features["object"].to_numpy() == label)
        if not len(rows):
            self._say(f"undo: object {label} has no clicks")
            return
        self.clicks_layer.remove([int(rows[-1])])

    def _undo_key(self, layer) -> None:
        self.undo_click()

    @staticmethod
    def _style_clicks(layer) -> None:
        """Include points green discs, exclude points red crosses."""
        if not len(layer.data):
            return
        include = layer.features["label"].to_numpy() == 1
        layer.face_color = np.where(include[:, None], [[0.0, 1.0, 0.0, 1.0]], [[1.0, 0.0, 0.0, 1.0]])
        layer.symbol = np.where(include, "disc", "cross")

    # -- running -----------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._worker is not None or bool(self._queue)

    def wait_until_idle(self, timeout_s: float = 600.0) -> None:
        """Process Qt events until every queued box is done (for scripts driving the widget, not the UI)."""
        from qtpy.QtWidgets import QApplication

        deadline = time.monotonic() + timeout_s
        while self.busy:
            if time.monotonic() > deadline:
                raise TimeoutError(f"segmentation not finished after {timeout_s:.0f} s")
            QApplication.processEvents()
            time.sleep(0.001)

    def cancel(self) -> None:
        """Stop the running job and drop the queue; the Labels layer keeps what finished jobs painted."""
        self._queue.clear()
        if self._worker is not None:
            self._worker.quit()

    def _run_next(self) -> None:
        if self._worker is not None or not self._queue or self.image_layer is None:
            return
        from napari.qt.threading import create_worker

        self._running = self._queue.popleft()
        worker = create_worker(self._compute, self._running.job, self._inputs(), _start_thread=False)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_result)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()

    def _inputs(self) -> tuple:
        """What a job needs from the UI, read on the UI thread."""
        layer = self.image_layer
        spacing = tuple(float(v) for v in layer.scale[-3:]) if layer.ndim == 3 and not layer.rgb else None
        window, model = self.window_combo.currentText(), self.model_combo.currentData()
        return (id(layer), layer.data, bool(layer.rgb), window, model, spacing)

    def _compute(self, job: BoxJob, inputs: tuple):
        """Runs in the worker thread: prepare (model, windowed image) if needed, then the box's mask."""
        layer_id, data, rgb, window, model, spacing = inputs
        if self._segmenter is None or self._segmenter_model != model:
            self._segmenter, self._segmenter_model, self._prepared = (
                Segmenter(model=model, cached_slices=CACHED_SLICES),
                model,
                None,
            )
        segmenter = self._segmenter
        if self._prepared != (layer_id, window, model):
            self._model_volume = model_image(data, rgb, window)
            segmenter.set_image(self._model_volume)
            self._prepared = (layer_id, window, model)
        encoded, encode_s, started = segmenter.encoded_slices, segmenter.encode_seconds, time.perf_counter()
        if job.from_slice is not None:
            axis, index = job.from_slice
            valid = spacing is not None and all(np.isfinite(v) and v > 0 for v in spacing)
            walk = segmenter.walk_from_slice(
                self._model_volume, job.box, axis, index, spacing if valid else None
            )  # fmt: skip
            while True:
                try:
                    done = next(walk)
                except StopIteration as finished:
                    mask = finished.value
                    break
                yield done, done + 1  # how far the object reaches is found on the way
            result = segmenter.last_from_slice
            assert result is not None
            low, high = result.slices
            timing = Timing(
                job.label,
                high - low + 1,
                result.encoded,
                result.encode_seconds * 1000,
                (time.perf_counter() - started - result.encode_seconds) * 1000,
            )
            return job, mask, timing
        if not job.is_3d:
            yield 0, 1
            mask = segmenter.predict(job.box, **job.clicks_on(0))
            slices = 1
        elif len(clicks := job.clicks_in_range()):  # the box, then its clicks, each carried as far as it reaches
            yield 0, 1
            valid = spacing is not None and all(np.isfinite(v) and v > 0 for v in spacing)
            mask = segmenter.predict(
                job.box, points=clicks[:, :3], point_labels=clicks[:, 3], spacing=spacing if valid else None
            )
            slices = int(job.box[5] - job.box[2]) + 1
        else:
            x0, y0, z0, x1, y1, z1 = (int(v) for v in job.box)
            mask = np.zeros(data.shape, dtype=bool)
            slices = z1 - z0 + 1
            for done, z in enumerate(range(z0, z1 + 1)):
                yield done, slices
                mask[z] = segmenter.predict([x0, y0, x1, y1], z=z)
        encode_ms = (segmenter.encode_seconds - encode_s) * 1000
        timing = Timing(
            job.label,
            slices,
            segmenter.encoded_slices - encoded,
            encode_ms,
            (time.perf_counter() - started) * 1000 - encode_ms,
            clicks=len(job.clicks),
        )
        return job, mask, timing

    def _on_progress(self, value: tuple[int, int]) -> None:
        done, total = value
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def _on_result(self, result) -> None:
        job, mask, timing = result
        if job.label in {int(v) for v in self.boxes_layer.features["label"]}:  # not deleted meanwhile
            paint(self.masks_layer.data, job.label, mask)
            self.masks_layer.refresh()
        timing.shown_ms = (time.perf_counter() - self._running.queued_at) * 1000
        self.timings.append(timing)
        self.progress.setValue(self.progress.maximum())
        what = f"box {job.label}"
        if timing.clicks:
            what += f" with {timing.clicks} click{'s' if timing.clicks > 1 else ''}"
        self._say(
            f"{what}: encode {timing.encode_ms:.0f} ms ({timing.encoded} of {timing.slices} slices), "
            f"decode {timing.decode_ms:.0f} ms, shown after {timing.shown_ms:.0f} ms"
        )

    def _on_error(self, exc: Exception) -> None:
        self._say(f"box {self._running.job.label if self._running else '?'} failed: {exc}")

    def _on_aborted(self) -> None:
        self._say(f"box {self._running.job.label if self._running else '?'}: cancelled, masks unchanged")

    def _on_finished(self) -> None:
        self._worker = None
        self._running = None
        self._run_next()

    def _say(self, message: str) -> None:
        self.status_label.setText(message)
        self.viewer.status = f"qmedsam: {message}"

    # -- saving ------------------------------------------------------------------------------------------------

    def _save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save masks", "", "NIfTI (*.nii.gz *.nii);;npz (*.npz)")
        if path:
            self.save(path)

    def save(self, path: str):
        """Write the masks: NIfTI on the source scan's grid when the image came from one, or npz (`segs`); and
        next to them `<stem>.clicks.json`, the boxes and clicks that made them (see `save_prompts`)."""
        if self.masks_layer is None:
            raise ValueError("no masks to save: pick an image first")
        written = save_labels(self.masks_layer.data, path, self.image_layer.metadata, self.image_layer.scale)
        prompts = self.save_prompts(prompts_path(written), masks=written.name)
        self._say(f"saved {written} and {prompts.name}")
        return written

    def object_prompts(self) -> list[ObjectPrompts]:
        """Every segmented box with its clicks (image pixel coordinates), in layer order."""
        objects = []
        for row, label in enumerate(self.boxes_layer.features["label"]):
            if int(label):
                try:
                    job = self._job_for(row)
                except CaseError as exc:
                    self._say(f"box {int(label)} not saved: {exc}")
                    continue
                objects.append(ObjectPrompts(job.label, job.box, job.clicks, job.from_slice))
        return objects

    def save_prompts(self, path: str | Path, masks: str | None = None) -> Path:
        """Write the boxes, every object's clicks and the model that made the masks as JSON (atomically)."""
        if self.boxes_layer is None:
            raise ValueError("no boxes to save: pick an image first")
        model = self._segmenter_model if self._segmenter is not None else self.model_combo.currentData()
        model_dir = getattr(self._segmenter.engine, "model_dir", None) if self._segmenter is not None else None
        return write_prompts(
            path,
            self.object_prompts(),
            self.spatial_shape,
            masks=masks,
            image=self.image_layer.name,
            model=None if model is None else str(model),
            model_dir=None if model_dir is None else str(Path(model_dir).resolve()),
        )

    def _load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load boxes + clicks", "", f"qmedsam clicks (*{PROMPTS_SUFFIX})")
        if path:
            try:
                self.load_prompts(path)
            except UserFacingError as exc:
                self._say(str(exc))

    def load_prompts(self, path: str | Path) -> None:
        """Replace the image's boxes and clicks with a saved `.clicks.json` (checked: it must have been made on
        an image of this shape) and segment them again: with the same model, the masks that were saved."""
        if self.image_layer is None:
            raise UserFacingError("pick an image before loading boxes and clicks")
        objects = read_prompts(path, self.spatial_shape)
        self.cancel()

        ndim = len(self.spatial_shape)
        is_3d = ndim == 3

        def to_layer(layer, points) -> np.ndarray:
            converted = [layer.world_to_data(self.image_layer.data_to_world(p)) for p in points]
            return np.array(converted, dtype=np.float64).reshape(len(converted), ndim)

        rows = [c for obj in objects for c in obj.clicks]
        image_points = [[z, y, x] if is_3d else [y, x] for x, y, z, _ in rows]
        with self._editing():
            boxes = self.boxes_layer
            if len(boxes.data):
                boxes.selected_data = set(range(len(boxes.data)))
                boxes.remove_selected()
            if objects:
                boxes.add_rectangles(
                    [
                        to_layer(boxes, box_rectangle(obj.box) if obj.from_slice is None else slice_box_rectangle(
                            obj.box, *obj.from_slice))
                        for obj in objects
                    ]
                )  # fmt: skip
            fixed = [is_3d and obj.from_slice is None for obj in objects]
            boxes.features = {
                "label": np.array([obj.label for obj in objects], np.int64),
                "z0": np.array([obj.box[2] if f else -1 for obj, f in zip(objects, fixed, strict=True)], np.int64),
                "z1": np.array([obj.box[5] if f else -1 for obj, f in zip(objects, fixed, strict=True)], np.int64),
                "axis": np.array([-1 if obj.from_slice is None else obj.from_slice[0] for obj in objects], np.int64),
                "index": np.array([-1 if obj.from_slice is None else obj.from_slice[1] for obj in objects], np.int64),
            }
            self.clicks_layer.data = to_layer(self.clicks_layer, image_points)
            self.clicks_layer.features = {
                "object": np.array([obj.label for obj in objects for _ in obj.clicks], np.int64),
                "label": np.array([int(c[3]) for c in rows], np.int64),
            }
        self._style_clicks(self.clicks_layer)
        self.masks_layer.data[...] = 0
        self.masks_layer.refresh()
        self.object_spin.setValue(objects[-1].label if objects else 0)
        self._say(f"loaded {len(objects)} boxes and {len(rows)} clicks from {Path(path).name}")
        self.segment_all()

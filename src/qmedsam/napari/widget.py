"""The dock widget: pick an image, draw rectangles, get one label per box in a Labels layer.

Every rectangle added or moved on the widget's Shapes layer becomes a job; jobs run one at a time off the
UI thread (napari's thread workers) on one `qmedsam.Segmenter`, so each slice is encoded once and every later
box on it costs only the decoder. A 3D box is the rectangle's xy extent over its z range (the project's fixed
3D rule), reported slice by slice and cancellable; the Labels layer is only written when a job finishes, so a
cancelled job leaves every layer as it was.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from qtpy.QtWidgets import (
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
from qmedsam.napari.io import save_labels
from qmedsam.napari.layers import FEATURES, WINDOWS, BoxJob, model_image, paint, rectangle_box, z_range
from qmedsam.segmenter import Segmenter

MODELS = (("int8 (shipped)", "int8"), ("fp32 (pretrained)", "fp32"))
CACHED_SLICES = 128
"""Slice embeddings the widget keeps (4 MiB each, 512 MiB at most): a second 3D box over a typical organ's
slices costs only the decoder."""
CHOOSE_FOLDER = "Model folder…"


@dataclass
class Timing:
    """What one box cost: encoder (slices encoded by this box), decoder, and box drawn -> mask shown."""

    label: int
    slices: int
    encoded: int
    encode_ms: float
    decode_ms: float
    shown_ms: float = 0.0


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
        self.timings: list[Timing] = []
        self._segmenter = None
        self._segmenter_model: str | None = None
        self._prepared: tuple | None = None
        self._queue: deque[_Queued] = deque()
        self._worker = None
        self._running: _Queued | None = None
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
        self.segment_all_button = QPushButton("Segment all boxes")
        self.cancel_button = QPushButton("Cancel")
        self.save_button = QPushButton("Save masks…")
        self.progress = QProgressBar()
        self.status_label = QLabel("Pick an image, then draw rectangles.")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Window", self.window_combo)
        form.addRow("3D box z", z_row)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for widget in (self.segment_all_button, self.cancel_button, self.save_button, self.progress):
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
        self.image_layer = self.viewer.layers[name]
        self._prepared = None
        spatial = self.spatial_shape
        self.boxes_layer = self._boxes_layer_for(self.image_layer, len(spatial))
        self.masks_layer = self._masks_layer_for(self.image_layer, spatial)
        self.boxes_layer.events.data.connect(self._boxes_changed)
        depth = spatial[0] - 1 if len(spatial) == 3 else 0
        slice_now = int(self.viewer.dims.current_step[0]) if len(spatial) == 3 else 0
        for spin in (self.z_from, self.z_to):
            spin.blockSignals(True)
            spin.setRange(0, depth)
            spin.setValue(min(slice_now, depth))
            spin.setEnabled(len(spatial) == 3)
            spin.blockSignals(False)
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

    # -- boxes -> jobs -----------------------------------------------------------------------------------------

    def _boxes_changed(self, event) -> None:
        action = str(getattr(event, "action", ""))
        if action.endswith("added"):
            self._enqueue([i for i, label in enumerate(self.boxes_layer.features["label"]) if label == 0])
        elif action.endswith("changed"):
            self._enqueue(sorted(i for i in event.data_indices if 0 <= i < len(self.boxes_layer.data)))
        elif action.endswith("removed"):
            self._drop_removed()

    def segment_all(self) -> None:
        """(Re-)segment every rectangle, in layer order (later boxes on top, as `qmedsam predict`)."""
        if self.boxes_layer is not None:
            self._enqueue(list(range(len(self.boxes_layer.data))))

    def _enqueue(self, rows: list[int]) -> None:
        for row in rows:
            try:
                job = self._job_for(row)
            except CaseError as exc:
                self._say(f"box {row + 1}: {exc}")
                continue
            self._queue = deque(q for q in self._queue if q.job.label != job.label)
            self._queue.append(_Queued(job))
        self._run_next()

    def _job_for(self, row: int) -> BoxJob:
        features = self.boxes_layer.features
        if int(features.loc[row, "label"]) == 0:
            used = features["label"].to_numpy()
            features.loc[row, "label"] = int(used.max(initial=0)) + 1
        label = int(features.loc[row, "label"])
        vertices = np.array(
            [self.image_layer.world_to_data(self.boxes_layer.data_to_world(v)) for v in self.boxes_layer.data[row]]
        )
        spatial = self.spatial_shape
        box, drawn = rectangle_box(vertices[:, -len(spatial) :], spatial)
        if drawn is None:
            return BoxJob(label, box)
        z0, z1 = int(features.loc[row, "z0"]), int(features.loc[row, "z1"])
        if z0 < 0 or z1 < z0:
            z0, z1 = z_range(drawn, self.z_from.value(), self.z_to.value(), spatial[0])
            features.loc[row, "z0"], features.loc[row, "z1"] = z0, z1
        return BoxJob(label, np.array([box[0], box[1], z0, box[2], box[3], z1], dtype=np.int64))

    def _z_edited(self, *args) -> None:
        """With one box selected, the z spin boxes edit its z range (and re-segment it)."""
        layer = self.boxes_layer
        if layer is None or len(self.spatial_shape) != 3 or len(layer.selected_data) != 1:
            return
        (row,) = layer.selected_data
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
        return (id(layer), layer.data, bool(layer.rgb), self.window_combo.currentText(), self.model_combo.currentData())

    def _compute(self, job: BoxJob, inputs: tuple):
        """Runs in the worker thread: prepare (model, windowed image) if needed, then the box's mask."""
        layer_id, data, rgb, window, model = inputs
        if self._segmenter is None or self._segmenter_model != model:
            self._segmenter, self._segmenter_model, self._prepared = (
                Segmenter(model=model, cached_slices=CACHED_SLICES),
                model,
                None,
            )
        segmenter = self._segmenter
        if self._prepared != (layer_id, window, model):
            segmenter.set_image(model_image(data, rgb, window))
            self._prepared = (layer_id, window, model)
        encoded, encode_s, started = segmenter.encoded_slices, segmenter.encode_seconds, time.perf_counter()
        if not job.is_3d:
            yield 0, 1
            mask = segmenter.predict(job.box)
            slices = 1
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
        self._say(
            f"box {job.label}: encode {timing.encode_ms:.0f} ms ({timing.encoded} of {timing.slices} slices), "
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
        """Write the masks: NIfTI on the source scan's grid when the image came from one, or npz (`segs`)."""
        if self.masks_layer is None:
            raise ValueError("no masks to save: pick an image first")
        written = save_labels(self.masks_layer.data, path, self.image_layer.metadata, self.image_layer.scale)
        self._say(f"saved {written}")
        return written

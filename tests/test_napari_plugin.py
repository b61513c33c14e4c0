"""The napari plug-in driven headless: a real viewer (Qt offscreen), the real shipped int8 model, demo cases.

Masks from the widget must be exactly what `Segmenter` gives for the same boxes; a second box on an encoded
slice must not encode again; a cancelled 3D run must leave the layers as they were. Clicks (the shipped int8
decoder takes boxes only, so these use an fp32 model exported with clicks) go through napari's own mouse event
path and must give `Segmenter.predict`'s mask with the same clicks, from the decoder alone.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
import napari  # noqa: E402, F401  (a required extra: a broken install must fail, not skip)

from qmedsam.data.cases import read_case  # noqa: E402
from qmedsam.errors import UserFacingError  # noqa: E402
from qmedsam.napari import io as plugin_io  # noqa: E402
from qmedsam.napari.layers import BoxJob, box_rectangle  # noqa: E402
from qmedsam.napari.widget import UNDO_KEY, SegmentWidget  # noqa: E402
from qmedsam.segmenter import Segmenter  # noqa: E402

TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def int8_segmenter() -> Segmenter:
    return Segmenter(model="int8")


@pytest.fixture(scope="module")
def fp32_segmenter(fp32_model_dir) -> Segmenter:
    return Segmenter(model=str(fp32_model_dir))


def _widget(viewer, qtbot, model: str = "int8") -> SegmentWidget:
    widget = SegmentWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_model(model)
    return widget


def _click(viewer, widget: SegmentWidget, x: float, y: float, z: int | None = None, modifiers=(), button=1) -> None:
    """A mouse click at image pixel (x, y) [on slice z] with the widget's Click button pressed first, through
    napari's canvas handlers (vispy's own picking pass needs OpenGL, which the offscreen platform lacks)."""
    from vispy.app.canvas import MouseEvent

    widget.clicks_button.click()
    assert viewer.layers.selection.active is widget.clicks_layer and widget.clicks_layer.mode == "add"
    if z is not None:
        viewer.dims.set_current_step(0, z)
    world = widget.image_layer.data_to_world((y, x) if z is None else (z, y, x))
    canvas = viewer.window._qt_viewer.canvas
    position = (canvas.view.transform * canvas.view.scene.transform).map([world[-1], world[-2]])[:2]
    canvas._on_mouse_press(MouseEvent("mouse_press", pos=position, modifiers=modifiers, button=button))
    canvas._on_mouse_release(MouseEvent("mouse_release", pos=position, modifiers=modifiers, button=button))


def _clicked_mask(segmenter: Segmenter, box, clicks: np.ndarray, z: int | None = None) -> np.ndarray:
    on = clicks[clicks[:, 2] == (z or 0)]
    if not len(on):
        return segmenter.predict(box, z=z)
    return segmenter.predict(box, points=on[:, :2], point_labels=on[:, 3], z=z)


def _wait(qtbot, widget: SegmentWidget) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)


def test_a_3d_job_uses_the_clicks_on_its_box_slices_in_their_order():
    """A box edited to fewer slices keeps its clicks in the layer (undo can bring the slices back) but runs
    without those beyond it; the rest keep their order (clicks apply in order)."""
    clicks = np.array([[5, 5, 3, 1], [6, 6, 9, 0], [7, 7, 4.4, 0], [8, 8, 1.6, 1]], np.float64)
    job = BoxJob(1, np.array([0, 0, 2, 20, 20, 4]), clicks)
    np.testing.assert_array_equal(job.clicks_in_range(), clicks[[0, 2, 3]])


def test_2d_boxes_paint_the_segmenter_masks_and_reuse_the_embedding(
    make_napari_viewer, qtbot, demo_dir, int8_segmenter
):
    case = read_case(demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz")
    viewer = make_napari_viewer()
    viewer.add_image(case.image, name="ct", rgb=True)
    widget = _widget(viewer, qtbot)
    assert widget.boxes_layer.name == "ct boxes" and widget.masks_layer.data.shape == (101, 122)
    for box in case.boxes:  # drawn one after another, as a user would
        widget.boxes_layer.add_rectangles([box_rectangle(box)])
        _wait(qtbot, widget)
    expected = int8_segmenter.segment_2d(case.image, case.boxes)
    np.testing.assert_array_equal(widget.masks_layer.data, expected)
    assert [t.label for t in widget.timings] == list(range(1, len(case.boxes) + 1))
    assert [t.encoded for t in widget.timings] == [1] + [0] * (len(case.boxes) - 1)  # later boxes: decoder only
    assert widget._segmenter.encoded_slices == 1

    # moving a box re-segments it in place; deleting one removes its label
    moved = case.boxes[0] + np.array([5, 5, 5, 5])
    widget.boxes_layer.data = [box_rectangle(moved), *widget.boxes_layer.data[1:]]  # napari: 'changed' for all
    _wait(qtbot, widget)
    assert widget.boxes_layer.features["label"].tolist() == list(range(1, len(case.boxes) + 1))
    single = int8_segmenter.segment_2d(case.image, moved[None])
    data = widget.masks_layer.data  # boxes 1 then 2..6 repainted in order, later ones on top
    np.testing.assert_array_equal(data, int8_segmenter.segment_2d(case.image, np.vstack([moved, case.boxes[1:]])))
    assert (data == 1).sum() <= (single == 1).sum()
    widget.boxes_layer.selected_data = {1}
    widget.boxes_layer.remove_selected()
    assert 2 not in np.unique(widget.masks_layer.data)
    assert widget._segmenter.encoded_slices == 1


def test_3d_case_opened_with_the_reader_matches_segment_3d(make_napari_viewer, qtbot, small_cases_dir, int8_segmenter):
    path = small_cases_dir / "3D_MR_TotalSeg_0001.npz"  # a real MR volume, 6 of its slices
    case = read_case(path)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="qmedsam")
    image = viewer.layers["3D_MR_TotalSeg_0001"]
    assert image.data.shape == case.image.shape and tuple(image.scale) == pytest.approx(case.spacing)
    widget = _widget(viewer, qtbot)
    boxes_layer = viewer.layers["3D_MR_TotalSeg_0001 boxes"]
    assert widget.boxes_layer is boxes_layer and len(boxes_layer.data) == len(case.boxes)
    widget.segment_all()
    _wait(qtbot, widget)
    expected = int8_segmenter.segment_3d(case.image, case.boxes)
    np.testing.assert_array_equal(widget.masks_layer.data, expected)
    assert widget._segmenter.encoded_slices == case.image.shape[0]  # every slice once, shared by all boxes

    saved = widget.save(str(small_cases_dir.parent / "masks.npz"))
    with np.load(saved) as data:
        np.testing.assert_array_equal(data["segs"], expected)
        assert data["spacing"] == pytest.approx(case.spacing)


def test_cancelling_a_3d_run_leaves_the_layers_as_they_were(make_napari_viewer, qtbot, demo_dir):
    case = read_case(demo_dir / "cases" / "3D_CT_TotalSeg_0001.npz")
    viewer = make_napari_viewer()
    viewer.add_image(case.image, name="ct")
    widget = _widget(viewer, qtbot)
    progress: list[tuple[int, int]] = []

    def cancel_after_two_slices(value):
        progress.append(value)
        if len(progress) == 3:
            widget.cancel()

    widget.z_from.setValue(0)
    widget.z_to.setValue(29)
    widget.boxes_layer.add_rectangles([box_rectangle(case.boxes[0])])
    assert widget._worker is not None
    widget._worker.yielded.connect(cancel_after_two_slices)
    _wait(qtbot, widget)
    assert progress[-1][1] == 30 and len(progress) < 30  # stopped long before slice 30
    assert not widget.masks_layer.data.any() and widget.timings == []
    assert "cancelled" in widget.status_label.text()
    # the box is still there and a later run completes
    widget.z_to.setValue(1)
    widget.boxes_layer.features.loc[0, ["z0", "z1"]] = [0, 1]
    widget.segment_all()
    _wait(qtbot, widget)
    assert widget.masks_layer.data[:2].any() and not widget.masks_layer.data[2:].any()


def test_nifti_opened_segmented_and_saved_on_its_own_grid(make_napari_viewer, qtbot, demo_dir, tmp_path):
    import nibabel as nib

    from qmedsam.scans.orientation import VoxelMapping

    case = read_case(demo_dir / "cases" / "3D_MR_TotalSeg_0001.npz")
    # a file stored with permuted, reversed axes (as scanners and converters do); its working array is the case's
    affine = np.array([[0, 0, -2.0, 30], [1.5, 0, 0, -10], [0, -1.5, 0, 5], [0, 0, 0, 1]])
    axes = VoxelMapping.from_affine(affine, (1, 1, 1)).source_axis
    file_shape = [0, 0, 0]
    for w, axis in enumerate(axes):
        file_shape[axis] = case.image.shape[w]
    mapping = VoxelMapping.from_affine(affine, tuple(file_shape))
    source = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(mapping.to_file(case.image).astype(np.int16), affine), source)
    viewer = make_napari_viewer()
    viewer.open(str(source), plugin="qmedsam")
    layer = viewer.layers["scan"]
    np.testing.assert_array_equal(layer.data, case.image)  # shown in the working orientation
    assert tuple(layer.scale) == pytest.approx((1.5, 1.5, 2.0))  # z = j, y = i, x = k (the affine's columns)
    widget = _widget(viewer, qtbot)
    widget.window_combo.setCurrentText("none")  # the values are the demo's uint8 intensities, stored as int16
    z = int(case.boxes[0, 2] + case.boxes[0, 5]) // 2
    widget.z_from.setValue(z)
    widget.z_to.setValue(z + 1)
    box = case.boxes[0]
    widget.boxes_layer.add_rectangles([box_rectangle([box[0], box[1], z, box[3], box[4], z + 1])])  # drawn on z
    _wait(qtbot, widget)
    assert widget.masks_layer.data[z].any() and widget.masks_layer.data[z + 1].any()
    assert not widget.masks_layer.data[z + 2 :].any()
    widget.masks_layer.data[0, 1, 1] = 7  # an edit with napari's own tools is saved too
    out = widget.save(str(tmp_path / "masks.nii.gz"))
    saved = nib.load(out)
    assert saved.shape == mapping.file_shape and np.allclose(saved.affine, affine)
    np.testing.assert_array_equal(mapping.to_work(np.asarray(saved.dataobj)), widget.masks_layer.data)


def test_demo_cases_are_napari_sample_data(make_napari_viewer, demo_dir, monkeypatch):
    monkeypatch.setenv("QMEDSAM_DEMO_DIR", str(demo_dir))
    viewer = make_napari_viewer()
    viewer.open_sample("qmedsam", "demo-3d-ct")
    assert [layer.name for layer in viewer.layers] == ["3D_CT_TotalSeg_0001", "3D_CT_TotalSeg_0001 boxes"]
    features = viewer.layers["3D_CT_TotalSeg_0001 boxes"].features
    assert features["z1"].tolist() == read_case(demo_dir / "cases" / "3D_CT_TotalSeg_0001.npz").boxes[:, 5].tolist()


def test_reader_declines_npz_files_that_are_not_cases(tmp_path):
    np.savez(tmp_path / "other.npz", segs=np.zeros((2, 2)))
    assert plugin_io.get_reader(str(tmp_path / "other.npz")) is None
    assert plugin_io.get_reader(str(tmp_path / "image.png")) is None


def test_clicks_refine_the_selected_object_from_the_decoder_alone(
    make_napari_viewer, qtbot, demo_dir, fp32_model_dir, fp32_segmenter, tmp_path
):
    case = read_case(demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz")
    viewer = make_napari_viewer()
    viewer.add_image(case.image, name="ct", rgb=True)
    widget = _widget(viewer, qtbot, str(fp32_model_dir))
    for box in case.boxes[:2]:
        widget.boxes_layer.add_rectangles([box_rectangle(box)])
        _wait(qtbot, widget)
    assert widget.object_spin.value() == 2  # the box drawn last
    widget.boxes_layer.selected_data = {0}
    assert widget.object_spin.value() == 1  # selecting a rectangle selects its object
    encoded = widget._segmenter.encoded_slices
    fp32_segmenter.set_image(case.image)
    box = case.boxes[0]
    x0, y0, x1, y1 = (int(v) for v in box)
    masks: list[np.ndarray] = []

    def clicked(x, y, label, **event):
        _click(viewer, widget, x, y, **event)
        _wait(qtbot, widget)
        clicks = widget.object_clicks(1)
        assert clicks[-1].tolist() == pytest.approx([x, y, 0, label])
        np.testing.assert_array_equal(widget.masks_layer.data == 1, _clicked_mask(fp32_segmenter, box, clicks))
        assert widget.timings[-1].encoded == 0 and widget.timings[-1].clicks == len(clicks)
        assert widget._segmenter.encoded_slices == encoded  # the decoder alone
        masks.append(widget.masks_layer.data == 1)

    clicked((x0 + x1) / 2, (y0 + y1) / 2, 1)  # a plain click: include
    clicked(x0 + 2, y0 + 2, 0, modifiers=("Shift",))  # Shift-click: exclude
    clicked(x1 - 2, y0 + 2, 0, button=2)  # right-click: exclude
    widget.exclude_check.setChecked(True)
    clicked(x0 + 2, y1 - 2, 0)  # the Exclude toggle (trackpads): a plain click excludes
    assert widget.clicks_layer.features["object"].tolist() == [1, 1, 1, 1]
    assert widget.status_label.text().startswith("box 1 with 4 clicks")

    widget.undo_click()  # Undo: the last click goes, the mask is the one before it (predict is stateless)
    _wait(qtbot, widget)
    np.testing.assert_array_equal(widget.masks_layer.data == 1, masks[-2])
    viewer.window._qt_viewer._key_map_handler.press_key(UNDO_KEY)  # Ctrl+Z on the clicks layer (napari's dispatch)
    viewer.window._qt_viewer._key_map_handler.release_key(UNDO_KEY)
    _wait(qtbot, widget)
    np.testing.assert_array_equal(widget.masks_layer.data == 1, masks[-3])
    assert len(widget.object_clicks(1)) == 2 and len(widget.clicks_layer.data) == 2
    assert widget._segmenter.encoded_slices == encoded

    # saved next to the masks, loaded back over later edits: the same boxes, clicks and masks
    widget.segment_all()
    _wait(qtbot, widget)
    saved_masks, saved_clicks = widget.masks_layer.data.copy(), widget.object_clicks(1)
    widget.save(str(tmp_path / "masks.nii.gz"))
    widget.boxes_layer.add_rectangles([box_rectangle(case.boxes[2])])
    _wait(qtbot, widget)
    widget.load_prompts(tmp_path / "masks.clicks.json")
    _wait(qtbot, widget)
    np.testing.assert_array_equal(widget.masks_layer.data, saved_masks)
    np.testing.assert_array_equal(widget.object_clicks(1), saved_clicks)
    assert len(widget.boxes_layer.data) == 2 and widget._segmenter.encoded_slices == encoded

    # a click with no object selected is refused, not kept; deleting a box deletes its clicks
    widget.object_spin.setValue(0)
    _click(viewer, widget, x0 + 5, y0 + 5)
    assert len(widget.clicks_layer.data) == 2 and not widget.busy
    assert "no object selected" in widget.status_label.text()
    widget.boxes_layer.selected_data = {0}
    widget.boxes_layer.remove_selected()
    assert len(widget.clicks_layer.data) == 0 and 1 not in np.unique(widget.masks_layer.data)


def test_a_boxes_only_model_refuses_clicks_up_front(make_napari_viewer, qtbot, demo_dir, box_only_model_dir):
    case = read_case(demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz")
    viewer = make_napari_viewer()
    viewer.add_image(case.image, name="ct", rgb=True)
    widget = _widget(viewer, qtbot, str(box_only_model_dir))  # a folder exported before clicks
    widget.boxes_layer.add_rectangles([box_rectangle(case.boxes[0])])
    _wait(qtbot, widget)
    assert not widget._segmenter.engine.takes_clicks
    _click(viewer, widget, float(case.boxes[0, 0] + 5), float(case.boxes[0, 1] + 5))
    assert len(widget.clicks_layer.data) == 0 and not widget.busy
    assert "takes boxes only" in widget.status_label.text()


def test_clicks_on_a_volume_refine_the_object_like_the_api_and_round_trip_through_json(
    make_napari_viewer, qtbot, small_cases_dir, fp32_model_dir, fp32_segmenter, tmp_path
):
    path = small_cases_dir / "3D_MR_TotalSeg_0001.npz"
    case = read_case(path)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="qmedsam")
    widget = _widget(viewer, qtbot, str(fp32_model_dir))
    widget.segment_all()
    _wait(qtbot, widget)
    depth = case.image.shape[0]
    assert widget._segmenter.encoded_slices == depth
    row = int(np.argmax(case.boxes[:, 5] - case.boxes[:, 2]))  # the box over the most slices
    x0, y0, z0, x1, y1, z1 = (int(v) for v in case.boxes[row])
    label = row + 1
    widget.boxes_layer.selected_data = {row}
    assert widget.object_spin.value() == label
    before = widget.masks_layer.data.copy()
    z = (z0 + z1) // 2
    fp32_segmenter.set_image(case.image)

    _click(viewer, widget, (x0 + x1) / 2, (y0 + y1) / 2, z=z)
    _wait(qtbot, widget)
    _click(viewer, widget, x0 + 1, y0 + 1, z=z, modifiers=("Shift",))
    _wait(qtbot, widget)
    clicks = widget.object_clicks(label)
    assert clicks[:, 2].tolist() == [z, z] and clicks[:, 3].tolist() == [1, 0]  # on the slice they were made on
    # the object's mask is the API's for its 3D box and clicks (each click carried to the slices it reaches)
    spacing = tuple(float(v) for v in widget.image_layer.scale[-3:])
    object_mask = fp32_segmenter.predict(
        case.boxes[row], points=clicks[:, :3], point_labels=clicks[:, 3], spacing=spacing
    )
    expected = before.copy()
    expected[expected == label] = 0
    expected[object_mask] = label
    np.testing.assert_array_equal(widget.masks_layer.data, expected)  # the other objects stay
    assert [t.slices for t in widget.timings[-2:]] == [z1 - z0 + 1] * 2 and [t.clicks for t in widget.timings[-2:]] == [
        1,
        2,
    ]
    assert widget._segmenter.encoded_slices == depth  # the decoder alone: no slice encoded again

    # a click on a slice outside the selected object's box is refused
    short = int(np.argmin(case.boxes[:, 5] - case.boxes[:, 2]))
    sx0, sy0, sz0, _, _, sz1 = (int(v) for v in case.boxes[short])
    assert sz0 > 0 or sz1 < depth - 1
    widget.boxes_layer.selected_data = {short}
    assert widget.object_spin.value() == short + 1
    _click(viewer, widget, sx0 + 1, sy0 + 1, z=sz0 - 1 if sz0 > 0 else sz1 + 1)
    assert len(widget.clicks_layer.data) == 2 and "outside object" in widget.status_label.text()
    assert not widget.busy

    # "Segment all boxes" keeps every object's clicks (later boxes on top, as always)
    widget.segment_all()
    _wait(qtbot, widget)
    expected = np.zeros_like(widget.masks_layer.data[z])
    for i, (bx0, by0, bz0, bx1, by1, bz1) in enumerate(case.boxes):
        if i == row:
            expected[object_mask[z]] = i + 1
        elif bz0 <= z <= bz1:
            expected[_clicked_mask(fp32_segmenter, [bx0, by0, bx1, by1], np.zeros((0, 4)), z)] = i + 1
    np.testing.assert_array_equal(widget.masks_layer.data[z], expected)
    assert widget._segmenter.encoded_slices == depth

    saved = widget.save(str(tmp_path / "masks.npz"))
    prompts = tmp_path / "masks.clicks.json"
    document = json.loads(prompts.read_text())
    assert document["masks"] == saved.name and document["image_shape"] == list(case.image.shape)
    assert document["model_dir"] == str(fp32_model_dir.resolve())
    assert [obj["box"] for obj in document["objects"]] == case.boxes.tolist()
    assert document["objects"][row]["clicks"] == [
        {"x": clicks[i, 0], "y": clicks[i, 1], "z": z, "label": int(clicks[i, 3])} for i in range(2)
    ]
    objects = plugin_io.read_prompts(prompts, case.image.shape)
    np.testing.assert_array_equal(objects[row].clicks, clicks)

    # loading the JSON onto the same image restores boxes and clicks and gives the saved masks again
    viewer2 = make_napari_viewer()
    viewer2.add_image(case.image, name="mr", scale=case.spacing)
    widget2 = _widget(viewer2, qtbot, str(fp32_model_dir))
    widget2.load_prompts(prompts)
    _wait(qtbot, widget2)
    with np.load(saved) as data:
        np.testing.assert_array_equal(widget2.masks_layer.data, data["segs"])
    np.testing.assert_array_equal(widget2.object_clicks(label), clicks)
    with pytest.raises(UserFacingError, match="image_shape"):
        plugin_io.read_prompts(prompts, (1, 2, 3))


GOOD_PROMPTS = {
    "format": "qmedsam-clicks",
    "version": 1,
    "image_shape": [4, 20, 30],
    "objects": [{"label": 1, "box": [2, 3, 1, 10, 12, 2], "clicks": [{"x": 5.5, "y": 6, "z": 1, "label": 1}]}],
}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "format is 'other'; expected 'qmedsam-clicks'"),
        (lambda d: d.update(image_shape=[4, 20]), r"image_shape is \[4, 20\]; expected \[4, 20, 30\]"),
        (lambda d: d.update(objects={}), "objects is dict; expected a list"),
        (lambda d: d["objects"][0].update(label=True), r"objects\[0\].label is True; expected an integer"),
        (lambda d: d["objects"][0].update(box=[2, 3, 10, 12]), r"objects\[0\].box is .*; expected \[x0, y0, z0"),
        (lambda d: d["objects"][0].update(box=[2, 3, 1, 10, 12, 4]), "expected slice indices 0..3"),
        (lambda d: d["objects"][0]["clicks"][0].update(label=2), r"clicks\[0\].label is 2; expected 1 \(include\)"),
        (lambda d: d["objects"][0]["clicks"][0].update(x=30), r"clicks\[0\].x is 30; expected a number 0..29"),
        (
            lambda d: d["objects"][0]["clicks"][0].update(z=4),
            r"clicks\[0\].z is 4; expected a slice index 0..3",
        ),
        (lambda d: d["objects"].append(d["objects"][0]), "give label 1 twice"),
    ],
)
def test_clicks_json_is_checked_when_read(tmp_path, edit, message):
    path = tmp_path / "masks.clicks.json"
    path.write_text(json.dumps(GOOD_PROMPTS))
    assert plugin_io.read_prompts(path, (4, 20, 30))[0].clicks.tolist() == [[5.5, 6.0, 1.0, 1.0]]
    document = json.loads(json.dumps(GOOD_PROMPTS))
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(UserFacingError, match=f"{re.escape(str(path))}: .*{message}"):
        plugin_io.read_prompts(path, (4, 20, 30))


@pytest.mark.parametrize("text", ["{", '{"x": NaN}', "[]", "\udcff"])
def test_clicks_json_that_is_not_a_document_is_refused_by_name(tmp_path, text):
    path = tmp_path / "bad.clicks.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserFacingError, match=re.escape(str(path))):
        plugin_io.read_prompts(path)


def test_a_rectangle_drawn_3d_from_this_slice_finds_the_object_in_any_view(
    make_napari_viewer, qtbot, demo_dir, int8_segmenter, tmp_path
):
    """ "3D from this slice": a rectangle on an axial slice and one drawn in a coronal view (flat along y) each find
    their whole object, exactly `Segmenter.segment_from_slice` with the layer's scale as spacing, with progress
    per slice; they round-trip through the clicks JSON; a click on such an object is refused by name."""
    from qmedsam.data.cases import read_ground_truth
    from qmedsam.data.preprocess import mask_box
    from qmedsam.napari.layers import slice_box_rectangle

    name = "3D_CT_TotalSeg_0001.npz"
    case = read_case(demo_dir / "cases" / name)
    gts = read_ground_truth(demo_dir / "gts" / name)
    viewer = make_napari_viewer()
    viewer.add_image(case.image, name="ct", scale=(3.0, 3.0, 3.0))
    widget = _widget(viewer, qtbot)
    widget.from_slice_check.setChecked(True)
    prompts = []
    for label, axis in ((6, 0), (3, 1)):
        view = np.moveaxis(gts == label, axis, 0)
        index = int(np.argmax(view.reshape(view.shape[0], -1).sum(axis=1)))
        prompts.append((mask_box(view[index]), axis, index))
    progress: list[tuple[int, int]] = []
    for box, axis, index in prompts:
        widget.boxes_layer.add_rectangles([slice_box_rectangle(box, axis, index)])
        widget._worker.yielded.connect(progress.append)
        _wait(qtbot, widget)
    expected = np.zeros(case.image.shape, np.uint16)
    api = widget._segmenter  # the widget's own Segmenter: its embeddings are reused, the walk is the API's
    assert api is not None and api.engine.model_dir == int8_segmenter.engine.model_dir
    for label, (box, axis, index) in enumerate(prompts, start=1):
        expected[api.segment_from_slice(case.image, box, axis, index, spacing=(3, 3, 3))] = label
    np.testing.assert_array_equal(widget.masks_layer.data, expected)
    assert len(np.unique(expected)) == 3
    assert len(progress) > 4 and all(done < total for done, total in progress)
    assert widget.boxes_layer.features["axis"].tolist() == [0, 1]
    assert widget.timings[-1].slices > 1

    widget.object_spin.setValue(1)
    _click(viewer, widget, x=float(prompts[0][0][0] + 3), y=float(prompts[0][0][1] + 3), z=prompts[0][2])
    assert "found from one slice" in widget.status_label.text() and len(widget.clicks_layer.data) == 0

    saved = widget.save_prompts(tmp_path / "ct.clicks.json")
    document = json.loads(saved.read_text())
    assert [obj["from_slice"] for obj in document["objects"]] == [{"axis": 0, "index": prompts[0][2]},
                                                                  {"axis": 1, "index": prompts[1][2]}]  # fmt: skip
    widget.load_prompts(saved)
    _wait(qtbot, widget)
    np.testing.assert_array_equal(widget.masks_layer.data, expected)


@pytest.mark.parametrize(
    ("from_slice", "message"),
    [
        ({"axis": 3, "index": 1}, "from_slice.axis is 3; expected 0, 1 or 2"),
        ({"axis": 1, "index": 500}, "from_slice.index is 500; expected a slice index 0..9"),
        ({"axis": 1}, "from_slice is"),
    ],
)
def test_a_one_slice_object_in_a_clicks_json_is_checked(tmp_path, from_slice, message):
    document = {
        "format": plugin_io.PROMPTS_FORMAT,
        "version": plugin_io.PROMPTS_VERSION,
        "image_shape": [5, 10, 12],
        "objects": [{"label": 1, "box": [1, 1, 4, 3], "clicks": [], "from_slice": from_slice}],
    }
    path = tmp_path / "x.clicks.json"
    path.write_text(json.dumps(document))
    with pytest.raises(UserFacingError, match=re.escape(message)):
        plugin_io.read_prompts(path, (5, 10, 12))

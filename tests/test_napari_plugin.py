"""The napari plug-in driven headless: a real viewer (Qt offscreen), the real shipped int8 model, demo cases.

Masks from the widget must be exactly what `Segmenter` gives for the same boxes; a second box on an encoded
slice must not encode again; a cancelled 3D run must leave the layers as they were.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
import napari  # noqa: E402, F401  (a required extra: a broken install must fail, not skip)

from qmedsam.data.cases import read_case  # noqa: E402
from qmedsam.napari import io as plugin_io  # noqa: E402
from qmedsam.napari.layers import box_rectangle  # noqa: E402
from qmedsam.napari.widget import SegmentWidget  # noqa: E402
from qmedsam.segmenter import Segmenter  # noqa: E402

TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def int8_segmenter() -> Segmenter:
    return Segmenter(model="int8")


def _widget(viewer, qtbot) -> SegmentWidget:
    widget = SegmentWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_model("int8")
    return widget


def _wait(qtbot, widget: SegmentWidget) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)


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

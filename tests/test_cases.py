"""Case validation: every kind of bad input named in the protocol gets a defined behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qmedsam.data.cases import CaseError, modality_of, read_case, read_ground_truth, segmentation_dtype
from qmedsam.files import atomic_savez, leftover_temporaries


def write(tmp_path: Path, name: str, **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


IMG2D = np.zeros((40, 60, 3), np.uint8)
IMG3D = np.zeros((5, 40, 60), np.uint8)


def test_valid_2d_and_3d(tmp_path):
    case = read_case(write(tmp_path, "2D_X_Y_1.npz", imgs=IMG2D, boxes=np.array([[1, 2, 10, 20]])))
    assert case.dimension == 2 and case.spatial_shape == (40, 60) and case.modality == "X"
    case = read_case(
        write(tmp_path, "3D_CT_Y_1.npz", imgs=IMG3D, boxes=np.array([[1, 2, 0, 10, 20, 4]]), spacing=[2.0, 1, 1])
    )
    assert case.dimension == 3 and case.spacing == (2.0, 1.0, 1.0) and case.boxes.dtype == np.int64


@pytest.mark.parametrize("grey", [np.zeros((40, 60), np.uint8), np.zeros((40, 60, 1), np.uint8)])
def test_grey_2d_images_become_rgb(tmp_path, grey):
    case = read_case(write(tmp_path, "2D_X_Y_1.npz", imgs=grey, boxes=np.array([[1, 2, 10, 20]])))
    assert case.image.shape == (40, 60, 3)


def test_rgba_2d_image_drops_alpha_with_a_warning(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 255, (40, 60, 4), dtype=np.uint8)
    case = read_case(write(tmp_path, "2D_X_Y_1.npz", imgs=rgba, boxes=np.array([[1, 2, 10, 20]])))
    assert case.image.shape == (40, 60, 3) and np.array_equal(case.image, rgba[:, :, :3])
    assert case.warnings == ["2D_X_Y_1.npz: key 'imgs' is RGBA (40, 60, 4); alpha channel dropped"]


def test_float_images_are_accepted(tmp_path):
    case = read_case(write(tmp_path, "2D_X_Y_1.npz", imgs=np.random.rand(40, 60), boxes=np.array([[1, 2, 10, 20]])))
    assert case.image.dtype.kind == "f"


def test_partly_outside_box_is_clipped_with_warning(tmp_path):
    case = read_case(write(tmp_path, "2D_X_Y_1.npz", imgs=IMG2D, boxes=np.array([[-5, 2, 70, 20]])))
    assert case.boxes.tolist() == [[0, 2, 59, 20]]
    assert case.warnings and "clipped" in case.warnings[0]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"boxes": np.array([[1, 2, 10, 20]])}, "missing key 'imgs'"),
        ({"imgs": IMG2D}, "missing key 'boxes'"),
        ({"imgs": np.zeros((40, 60, 5), np.uint8), "boxes": np.array([[1, 2, 10, 20]])}, "expected (H, W, 3)"),
        ({"imgs": IMG2D, "boxes": np.zeros((0, 4))}, "is empty"),
        ({"imgs": IMG2D, "boxes": np.array([[1, 2, 10]])}, "expected (N, 4)"),
        ({"imgs": IMG2D, "boxes": np.array([[10, 2, 1, 20]])}, "inverted"),
        ({"imgs": IMG2D, "boxes": np.array([[5, 2, 5, 20]])}, "zero width or height"),
        ({"imgs": IMG2D, "boxes": np.array([[100, 2, 120, 20]])}, "outside the image"),
        ({"imgs": IMG2D, "boxes": np.array([[1.0, np.nan, 10, 20]])}, "NaN"),
        ({"imgs": np.full((40, 60), np.nan), "boxes": np.array([[1, 2, 10, 20]])}, "NaN"),
        ({"imgs": np.array(["a"] * 4).reshape(2, 2), "boxes": np.array([[0, 0, 1, 1]])}, "dtype"),
    ],
)
def test_bad_2d_cases_name_file_key_and_expectation(tmp_path, arrays, message):
    path = write(tmp_path, "2D_X_Y_1.npz", **arrays)
    with pytest.raises(CaseError) as info:
        read_case(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_bad_3d_boxes(tmp_path):
    with pytest.raises(CaseError, match="inverted"):
        read_case(write(tmp_path, "3D_X_Y_1.npz", imgs=IMG3D, boxes=np.array([[1, 2, 4, 10, 20, 1]])))
    with pytest.raises(CaseError, match=r"expected \(D, H, W\)"):
        read_case(write(tmp_path, "3D_X_Y_2.npz", imgs=IMG2D[None], boxes=np.array([[1, 2, 0, 10, 20, 0]])))


def test_bad_spacing_is_a_warning(tmp_path):
    case = read_case(
        write(tmp_path, "3D_X_Y_1.npz", imgs=IMG3D, boxes=np.array([[1, 2, 0, 10, 20, 4]]), spacing=[np.nan, 1, 1])
    )
    assert case.spacing is None and "spacing" in case.warnings[0]


def test_pickled_objects_and_garbage_are_rejected(tmp_path):
    path = tmp_path / "2D_X_Y_1.npz"
    np.savez(path, imgs=np.array([{"a": 1}], dtype=object), boxes=np.array([[1, 2, 10, 20]]))
    with pytest.raises(CaseError, match="pickled"):
        read_case(path)
    garbage = tmp_path / "2D_X_Y_2.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CaseError, match="not a readable"):
        read_case(garbage)


def test_ground_truth_reading(tmp_path):
    assert read_ground_truth(write(tmp_path, "a.npz", gts=np.array([[0, 1], [2, 2]], np.uint8))).max() == 2
    with pytest.raises(CaseError, match="missing key 'gts'"):
        read_ground_truth(write(tmp_path, "b.npz", segs=np.zeros((2, 2))))


def test_segmentation_dtype_holds_all_labels():
    assert segmentation_dtype(255) == np.uint8
    assert segmentation_dtype(256) == np.uint16
    assert segmentation_dtype(70000) == np.uint32


def test_modality_and_atomic_write(tmp_path):
    assert modality_of("3D_CT_Abdomen_0007.npz") == "CT"
    path = atomic_savez(tmp_path / "out" / "x.npz", segs=np.ones((3, 3), np.uint8))
    assert np.load(path)["segs"].sum() == 9
    assert [p.name for p in path.parent.iterdir()] == ["x.npz"]


def test_leftover_temporaries_are_a_killed_writes_of_that_file_only(tmp_path, monkeypatch):
    """What a rerun may delete: the temporary `atomic_write` made for that output, not a neighbour's or the user's."""
    import os
    import tempfile

    kept = []
    real = tempfile.mkstemp

    def keep(*args, **kwargs):  # the writer dies right after mkstemp, as under SIGKILL: its temporary stays
        fd, name = real(*args, **kwargs)
        kept.append(Path(name))
        os.close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "mkstemp", keep)
    for name in ("a.npz", "a.npz.npz"):
        with pytest.raises(KeyboardInterrupt):
            atomic_savez(tmp_path / name, segs=np.ones(2, np.uint8))
    monkeypatch.undo()
    (tmp_path / ".a.npz.mine.tmp").touch()  # not ours: another length than mkstemp's
    assert leftover_temporaries(tmp_path / "a.npz") == [kept[0]]
    assert leftover_temporaries(tmp_path / "a.npz.npz") == [kept[1]]

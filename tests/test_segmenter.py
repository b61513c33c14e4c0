"""The Python API (`qmedsam.Segmenter`) on real demo cases and the real fp32 OpenVINO model: same masks as
the `qmedsam predict` path, the interactive pair encodes a slice once, bad input fails with a clear message."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from qmedsam import Segmenter
from qmedsam.data.cases import CaseError, read_case
from qmedsam.errors import UserFacingError
from qmedsam.inference.model_dir import shipped_int8_model_dir
from qmedsam.inference.runtime import OpenVINOEngine
from qmedsam.inference.segment import segment_case

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def segmenter(fp32_model_dir: Path, ov_cache_dir: Path) -> Segmenter:
    return Segmenter(engine=OpenVINOEngine(fp32_model_dir, cache_dir=ov_cache_dir))


def _cropped_3d(demo_dir: Path, slices: int = 5):
    """The demo 3D CT case cut to a few slices around its first box's middle (keeps the test fast)."""
    case = read_case(demo_dir / "cases" / "3D_CT_TotalSeg_0001.npz")
    x0, y0, z0, x1, y1, z1 = case.boxes[0]
    start = max(0, (z0 + z1) // 2 - slices // 2)
    volume = case.image[start : start + slices]
    boxes = case.boxes[:2].copy()
    boxes[:, [2, 5]] = np.clip(boxes[:, [2, 5]] - start, 0, slices - 1)
    return volume, boxes


def test_segment_2d_equals_the_predict_path(segmenter: Segmenter, demo_dir: Path):
    case = read_case(demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz")
    labels = segmenter.segment_2d(case.image, case.boxes)
    expected = segment_case(segmenter.engine, case)
    assert labels.dtype == expected.dtype and labels.shape == case.image.shape[:2]
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == set(range(len(case.boxes) + 1))  # every object found


def test_segment_3d_equals_the_predict_path(segmenter: Segmenter, demo_dir: Path):
    volume, boxes = _cropped_3d(demo_dir)
    labels = segmenter.segment_3d(volume, boxes)
    from qmedsam.data.cases import case_from_arrays

    np.testing.assert_array_equal(labels, segment_case(segmenter.engine, case_from_arrays(volume, boxes, 3, "x")))
    assert labels.shape == volume.shape and labels.max() >= 1


def test_interactive_boxes_reuse_the_slice_embedding(segmenter: Segmenter, demo_dir: Path):
    case = read_case(demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz")
    segmenter.set_image(case.image)
    assert segmenter.encoded_slices == 0
    labels = segmenter.segment_2d(case.image, case.boxes[-1:])  # one box alone: nothing painted over it
    first = segmenter.predict(case.boxes[-1])
    assert segmenter.encoded_slices == 1
    np.testing.assert_array_equal(first, labels == 1)
    for box in case.boxes[:3]:
        assert segmenter.predict(box).shape == case.image.shape[:2]
    assert segmenter.encoded_slices == 1  # later boxes: decoder only


def test_interactive_volume_slices_and_3d_boxes(segmenter: Segmenter, demo_dir: Path):
    volume, boxes = _cropped_3d(demo_dir)
    segmenter.set_image(volume)
    x0, y0, z0, x1, y1, z1 = boxes[0]
    mask_3d = segmenter.predict(boxes[0])
    assert mask_3d.shape == volume.shape and mask_3d.dtype == bool
    assert segmenter.encoded_slices == z1 - z0 + 1
    np.testing.assert_array_equal(mask_3d, segmenter.segment_3d(volume, boxes[:1]) == 1)
    on_slice = segmenter.predict([x0, y0, x1, y1], z=int(z0))
    np.testing.assert_array_equal(on_slice, mask_3d[z0])
    assert segmenter.encoded_slices == z1 - z0 + 1  # slice z0 came from the cache


def test_a_box_decoded_again_gives_its_own_mask_for_each_image(segmenter: Segmenter, demo_dir: Path):
    """`predict` keeps decoded slice masks (a new click then costs one decoder call): a kept mask is never the
    caller's array, and a new image never gets the old image's masks."""
    case = read_case(demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz")
    segmenter.set_image(case.image)
    first = segmenter.predict(case.boxes[0])
    first_copy = first.copy()
    first[:] = ~first  # the caller's array is the caller's
    np.testing.assert_array_equal(segmenter.predict(case.boxes[0]), first_copy)
    flipped = np.ascontiguousarray(case.image[::-1])
    segmenter.set_image(flipped)
    fresh = Segmenter(engine=segmenter.engine)
    fresh.set_image(flipped)
    on_flipped = segmenter.predict(case.boxes[0])
    np.testing.assert_array_equal(on_flipped, fresh.predict(case.boxes[0]))
    assert not np.array_equal(on_flipped, first_copy)


def test_clicks_added_one_at_a_time_give_the_masks_of_a_fresh_segmenter(demo_dir: Path, ov_cache_dir: Path):
    """Each call with one more click reuses the kept masks of the calls before; the result is the mask a
    segmenter that never saw the earlier calls gives (the shipped click decoder: its third click here changes
    the mask, so a memo that ignored the clicks would fail)."""
    engine = OpenVINOEngine(shipped_int8_model_dir(), cache_dir=ov_cache_dir)
    case = read_case(demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz")
    image = np.ascontiguousarray(case.image[::-1])
    x0, y0, x1, y1 = (float(v) for v in case.boxes[0])
    points = [[(x0 + x1) / 2, (y0 + y1) / 2], [x1 - 3, y1 - 3], [x0 + 2, (y0 + y1) / 2]]
    labels = [0, 1, 0]
    used, fresh = Segmenter(engine=engine), Segmenter(engine=engine)
    used.set_image(image)
    fresh.set_image(image)
    box_only = used.predict(case.boxes[0])
    for n in (1, 2):
        used.predict(case.boxes[0], points=points[:n], point_labels=labels[:n])
    clicked = used.predict(case.boxes[0], points=points, point_labels=labels)
    np.testing.assert_array_equal(clicked, fresh.predict(case.boxes[0], points=points, point_labels=labels))
    assert (clicked != box_only).any()


def test_bad_input_is_named(segmenter: Segmenter, demo_dir: Path):
    fresh = Segmenter(engine=segmenter.engine)
    with pytest.raises(UserFacingError, match="set_image"):
        fresh.predict([0, 0, 10, 10])
    image = np.zeros((64, 64), np.uint8)
    with pytest.raises(CaseError, match=r"segment_2d: key 'boxes' row 0 is inverted"):
        fresh.segment_2d(image, [[30, 10, 20, 40]])
    with pytest.raises(CaseError, match="outside the image"):
        fresh.segment_2d(image, [[100, 100, 120, 120]])
    volume, _ = _cropped_3d(demo_dir)
    fresh.set_image(volume)
    with pytest.raises(UserFacingError, match="needs z"):
        fresh.predict([0, 0, 10, 10])
    with pytest.raises(UserFacingError, match="outside the volume"):
        fresh.predict([0, 0, 10, 10], z=99)
    with pytest.raises(UserFacingError, match="prompt_mode"):
        fresh.segment_3d(volume, [[0, 0, 0, 10, 10, 1]], prompt_mode="sideways")
    with pytest.raises(UserFacingError, match="not a model directory"):
        Segmenter(model=demo_dir / "no-such-model")
    assert fresh.encoded_slices == 0


def test_readme_python_example_runs(demo_dir: Path, tmp_path: Path, monkeypatch):
    """The README's Python API example, run as written, in a folder holding `data/demo`; `Segmenter()` uses
    the shipped int8 model, so nothing is built into the (empty) cache."""
    block = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no '## Python API' section with a ```python example"
    monkeypatch.setenv("QMEDSAM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["labels"].max() == len(namespace["case"]["boxes"])
    assert namespace["mask"].any()
    one_slice = re.search(r"```python\n([^`]*segment_from_slice\([^`]*)```", README.read_text())
    assert one_slice, "README has no segment_from_slice example"
    exec(compile(one_slice.group(1), "README.md", "exec"), namespace)  # the same Segmenter, a volume
    assert namespace["mask"].shape == namespace["volume"].shape and namespace["mask"][8].any()
    assert not (tmp_path / "cache" / "models").exists()

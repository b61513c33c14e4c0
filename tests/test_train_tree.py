"""`qmedsam data train`: the real training tree, its provenance and its leak-free validation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qmedsam.data.cases import load_npz
from qmedsam.datasets.manifest import MANIFEST_FORMAT as FORMAT
from qmedsam.datasets.manifest import MANIFEST_NAME
from qmedsam.datasets.recipes.train_tree import is_complete, pack_masks


@pytest.fixture(scope="module")
def manifest(train_tree_dir: Path) -> dict:
    return json.loads((train_tree_dir / MANIFEST_NAME).read_text())


def _member_hashes(entry: dict) -> set[str]:
    return {m["sha256"] for m in entry["source"]["members"].values() if isinstance(m, dict) and "sha256" in m}


def test_layout_and_arrays_match_the_manifest(train_tree_dir: Path, manifest: dict):
    assert manifest["format"] == FORMAT and is_complete(train_tree_dir)
    on_disk = sorted(p.relative_to(train_tree_dir).as_posix() for p in train_tree_dir.rglob("*.npz"))
    assert on_disk == sorted(e["file"] for e in manifest["cases"])
    for entry in manifest["cases"]:
        modality, dataset, name = entry["file"].split("/")
        assert name.startswith(f"{entry['dimension']}D_{modality}_") and modality == entry["modality"]
        arrays = load_npz(train_tree_dir / entry["file"])
        imgs = arrays["imgs"]
        assert imgs.dtype == np.uint8 and list(imgs.shape) == entry["shape"]
        assert imgs.ndim == 3 and (entry["dimension"] == 3 or imgs.shape[2] == 3)
        if entry["labelled"]:
            gts = arrays["gts"]
            spatial = imgs.shape if entry["dimension"] == 3 else imgs.shape[:2]
            assert gts.shape == spatial and np.unique(gts).tolist() == list(range(entry["n_objects"] + 1))
            assert set(entry["objects"]) == {str(i) for i in range(1, entry["n_objects"] + 1)}
            assert entry["label_origin"] in ("model output", "manual", "derived by thresholding")
        else:
            assert "gts" not in arrays and entry["label_origin"] == "unlabelled" and entry["split"] == "train"
        if entry["dimension"] == 3 and entry["labelled"]:
            assert arrays["spacing"].shape == (3,) and np.all(arrays["spacing"] > 0)
        assert entry["source"]["package"] and entry["licence"]


def test_sources_modalities_and_counts(manifest: dict):
    entries = manifest["cases"]
    packages = {e["source"]["package"] for e in entries}
    assert packages == {"totalsegmentator", "stardist", "nilearn", "pydicom-data", "scikit-image"}
    assert len({e["modality"] for e in entries}) >= 5
    for e in entries:
        if e["source"]["package"] == "totalsegmentator":
            assert e["label_origin"] == "model output" and "model output" in e["label_origin_detail"]
    assert {e["modality"] for e in entries if not e["labelled"]} >= {"US", "XRay", "MR", "Fundus", "Histopathology"}
    # Every TotalSegmentator class of a volume is kept (here: 31 'total' classes on the DICOM series).
    dicom = next(e for e in entries if "dicom-series" in e["file"])
    assert dicom["split"] == "train" and dicom["n_objects"] >= 30
    table = manifest["counts"]
    assert sum(row["files"] for mods in table.values() for row in mods.values()) == len(entries)
    assert table["train"]["CT"]["objects"] > 0 and table["validation"]["CT"]["samples_2d"] > 0


def test_validation_split_leaks_nothing(manifest: dict, demo_dir: Path):
    """By provenance: a source volume lives in one split, and no file made from a demo case's source
    files (checked by SHA-256) is in training."""
    splits: dict[str, set[str]] = {}
    for e in manifest["cases"]:
        splits.setdefault(e["source_volume"], set()).add(e["split"])
    assert all(len(s) == 1 for s in splits.values()), splits
    demo = json.loads((demo_dir / "manifest.json").read_text())
    demo_hashes = set().union(*(_member_hashes(c) for c in demo["cases"]))
    touched = [e for e in manifest["cases"] if _member_hashes(e) & demo_hashes]
    assert len(touched) >= 4  # CT, MR, nuclei, MNI152
    leaked_volumes = {e["source_volume"] for e in touched}
    assert all(e["split"] == "validation" for e in manifest["cases"] if e["source_volume"] in leaked_volumes)
    assert any(e["split"] == "train" and e["labelled"] for e in manifest["cases"])


def test_pack_masks_separates_overlaps_and_drops_duplicates():
    outer = np.zeros((16, 16), bool)
    outer[1:15, 1:15] = True
    inner = np.zeros((16, 16), bool)
    inner[4:9, 4:9] = True
    empty = np.zeros((16, 16), bool)
    layers, dropped = pack_masks([("outer", outer), ("inner", inner), ("again", outer.copy()), ("none", empty)])
    assert [names for _, names in layers] == [{"1": "outer"}, {"1": "inner"}]
    assert dropped == {"again": "duplicate of another mask (Dice >= 0.98)", "none": "empty"}
    assert np.array_equal(layers[1][0] == 1, inner)


def test_cli_reuses_a_complete_tree(train_tree_dir: Path, capsys):
    from qmedsam.cli import main

    assert main(["data", "train", "--out", str(train_tree_dir)]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out and "validation" in out and "2D samples" in out

"""`qmedsam data cases`: one split of the training tree as challenge cases + gts, readable by predict/evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from qmedsam.data.cases import read_case, read_ground_truth
from qmedsam.datasets.recipes.demo import tight_boxes


def test_validation_split_becomes_cases_with_tight_boxes(train_tree_dir: Path, tmp_path: Path):
    out = tmp_path / "val"
    result = subprocess.run(
        [sys.executable, "-m", "qmedsam", "data", "cases", "--tree", str(train_tree_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    tree = json.loads((train_tree_dir / "manifest.json").read_text())
    expected = {Path(e["file"]).name for e in tree["cases"] if e["split"] == "validation" and e["labelled"]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c["name"] for c in manifest["cases"]} == expected
    for entry in manifest["cases"]:
        case = read_case(out / "cases" / entry["name"])
        gts = read_ground_truth(out / "gts" / entry["name"])
        assert gts.shape == case.image.shape[: gts.ndim]
        assert np.unique(gts).tolist() == list(range(entry["objects"] + 1))
        assert np.array_equal(case.boxes, tight_boxes(gts, entry["objects"]))
        source = np.load(train_tree_dir / entry["source"])
        assert np.array_equal(source["imgs"], case.image)
        for new, old in enumerate(entry["source_labels"], start=1):
            assert np.array_equal(gts == new, source["gts"] == old)


def test_unknown_split_names_the_manifest(train_tree_dir: Path, tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "qmedsam", "data", "cases", "--tree", str(train_tree_dir), "--split", "test",
         "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "manifest.json: no labelled files in split 'test'" in result.stderr
    assert not (tmp_path / "x").exists()

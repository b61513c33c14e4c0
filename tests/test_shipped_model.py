"""The int8 model shipped in the package: self-describing, portable, and usable by an install without torch."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np

from qmedsam.engines import resolve_model_dir
from qmedsam.inference.model_dir import SHIPPED_INT8_DIR

BLOCK_TORCH = """\
import sys


class _BlockTorch:
    # an install without torch (and without what needs it): any import of these fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "brevitas", "nncf", "monai"):
            raise ImportError(f"{name} is not installed (torch-free install test)")
        return None


sys.meta_path.insert(0, _BlockTorch())
"""


def test_shipped_int8_model_is_self_describing_and_portable():
    assert resolve_model_dir("int8") == SHIPPED_INT8_DIR
    assert resolve_model_dir(None) == SHIPPED_INT8_DIR  # the default of `qmedsam predict` and `Segmenter()`
    meta = json.loads((SHIPPED_INT8_DIR / "meta.json").read_text())
    assert meta["precision"] == "int8"
    shipped = meta["shipped"]
    assert shipped["regenerate"] == "make int8-model"
    for split in ("validation split", "demo cases"):
        numbers = shipped["accuracy"][split]
        assert abs(numbers["dsc"] - numbers["fp32_dsc"] - numbers["dsc_change"]) < 1e-3
        assert numbers["dsc_change"] > -0.05  # a gross regression would be caught here
    assert meta["int8_coverage"]["encoder"]["int8_fraction"] >= 0.9
    # clicks: a click-trained decoder beside the box decoder, with the per-click scores it was shipped with
    clicks = meta["click_decoder"]
    assert clicks["files"] == ["click_decoder.xml", "click_decoder.bin"]
    assert all((SHIPPED_INT8_DIR / name).is_file() for name in clicks["files"])
    assert clicks["int8_coverage"]["int8_fraction"] >= 0.9
    for split in ("validation", "demo"):
        dsc = clicks["scores_with_clicks"][split]["overall"]["dsc"]
        assert len(dsc) == 6 and dsc[-1] > dsc[0]  # 5 clicks end above the box alone (a gross regression)
    size = sum(p.stat().st_size for p in SHIPPED_INT8_DIR.iterdir())
    assert size < 20e6, f"shipped model is {size / 1e6:.1f} MB"
    text = json.dumps(meta)
    for marker in ("/work/", "/home/", "/root/", "site-packages"):
        assert marker not in text, f"meta.json names a path of the building machine ({marker})"
    for item in [SHIPPED_INT8_DIR, *SHIPPED_INT8_DIR.iterdir()]:
        assert stat.S_IMODE(item.stat().st_mode) & 0o044 == 0o044, f"{item} is not readable by other users"


def test_default_predict_needs_no_torch(demo_dir: Path, tmp_path: Path):
    """`qmedsam predict` with no -m (the shipped int8 model) on a real demo case, where importing torch fails."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "QMEDSAM_CACHE": str(tmp_path / "cache")}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "torch-free install test" in probe.stderr
    case = demo_dir / "cases" / "2D_CT_TotalSeg_0001.npz"
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "qmedsam", "predict", "-i", str(case), "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "cache" / "models").exists()  # nothing was built: the shipped model was used
    segs = np.load(out / case.name)["segs"]
    gts = np.load(demo_dir / "gts" / case.name)["gts"]
    dice = [
        2 * np.sum((segs == k) & (gts == k)) / (np.sum(segs == k) + np.sum(gts == k)) for k in range(1, gts.max() + 1)
    ]
    assert np.mean(dice) > 0.8  # real masks, not just a file

"""`qmedsam predict` end to end on real demo cases: outputs, timing, overlays, bad inputs, exit codes."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qmedsam.cli import main
from qmedsam.data.cases import read_case, read_ground_truth
from qmedsam.evaluate.metrics import mask_dice


def smallest_case(demo_dir: Path, prefix: str) -> Path:
    """The cheapest real case of a kind (fewest slices x objects), to keep CI fast."""
    cases = sorted((demo_dir / "cases").glob(f"{prefix}_*.npz"))
    return min(cases, key=lambda p: np.load(p)["imgs"].shape[0] * len(np.load(p)["boxes"]) if prefix == "3D" else 0)


def mean_dice(segs: np.ndarray, gts: np.ndarray) -> float:
    return float(np.mean([mask_dice(segs == label, gts == label) for label in range(1, int(gts.max()) + 1)]))


@pytest.fixture(scope="module")
def small_inputs(demo_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    for prefix in ("2D", "3D"):
        shutil.copy(smallest_case(demo_dir, prefix), folder)
    return folder


def read_timing(folder: Path) -> list[dict[str, str]]:
    with (folder / "timing.csv").open() as handle:
        return list(csv.DictReader(handle))


def check_outputs(inputs: Path, out: Path, demo_dir: Path, min_dice: float) -> None:
    for path in sorted(inputs.glob("*.npz")):
        case = read_case(path)
        segs = np.load(out / path.name)["segs"]
        assert segs.shape == case.spatial_shape and segs.dtype == np.uint8
        assert set(np.unique(segs)) <= set(range(len(case.boxes) + 1))
        score = mean_dice(segs, read_ground_truth(demo_dir / "gts" / path.name))
        assert score >= min_dice, (path.name, score)


def test_predict_openvino_2d_and_3d(small_inputs, demo_dir, fp32_model_dir, tmp_path):
    out, overlays = tmp_path / "out", tmp_path / "overlays"
    args = ["predict", "-i", str(small_inputs), "-o", str(out), "-m", str(fp32_model_dir), "--overlays", str(overlays)]
    assert main(args) == 0
    check_outputs(small_inputs, out, demo_dir, min_dice=0.5)
    rows = read_timing(out)
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(float(r["seconds"]) > 0 for r in rows)
    assert {r["dimension"] for r in rows} == {"2D", "3D"}
    assert sorted(p.suffix for p in overlays.iterdir()) == [".png", ".png"]


def test_predict_torch_engine_2d(small_inputs, demo_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(next(small_inputs.glob("2D_*.npz")), inputs)
    out = tmp_path / "out"
    assert main(["predict", "-i", str(inputs), "-o", str(out), "--engine", "torch"]) == 0
    check_outputs(inputs, out, demo_dir, min_dice=0.5)


def test_predict_propagation_mode_3d(small_inputs, demo_dir, fp32_model_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(next(small_inputs.glob("3D_*.npz")), inputs)
    out = tmp_path / "out"
    args = ["predict", "-i", str(inputs), "-o", str(out), "-m", str(fp32_model_dir), "--prompt-mode", "propagate"]
    assert main(args) == 0
    check_outputs(inputs, out, demo_dir, min_dice=0.3)


def test_bad_cases_are_reported_and_the_rest_still_runs(small_inputs, fp32_model_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    shutil.copytree(small_inputs, inputs)
    good_2d = next(inputs.glob("2D_*.npz"))
    image = np.load(good_2d)["imgs"]
    np.savez(inputs / "2D_Bad_NoBoxes_0001.npz", imgs=image)
    np.savez(inputs / "2D_Bad_Inverted_0001.npz", imgs=image, boxes=np.array([[50, 10, 5, 40]]))
    np.savez(inputs / "2D_Bad_Empty_0001.npz", imgs=image, boxes=np.zeros((0, 4)))
    np.savez(inputs / "2D_Bad_Nan_0001.npz", imgs=image, boxes=np.array([[np.nan, 1, 20, 20]]))
    np.savez(inputs / "2D_Odd_Clipped_0001.npz", imgs=image[..., 0], boxes=np.array([[-10, -10, 40, 40]]))
    out = tmp_path / "out"
    assert main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(fp32_model_dir)]) == 1
    err = capsys.readouterr().err
    assert "missing key 'boxes'" in err and "inverted" in err and "is empty" in err and "NaN" in err
    assert "clipped" in err
    status = {r["case"]: r["status"] for r in read_timing(out)}
    assert sum(s == "error" for s in status.values()) == 4
    assert status["2D_Odd_Clipped_0001.npz"] == "ok" and (out / "2D_Odd_Clipped_0001.npz").is_file()
    assert not (out / "2D_Bad_Nan_0001.npz").exists()


def test_many_objects_get_a_wider_label_dtype(demo_dir, fp32_model_dir, tmp_path):
    case = read_case(sorted((demo_dir / "cases").glob("2D_*.npz"))[0])
    height, width = case.spatial_shape
    rng = np.random.default_rng(0)
    x0, y0 = rng.integers(0, width - 20, 257), rng.integers(0, height - 20, 257)
    boxes = np.stack([x0, y0, x0 + 15, y0 + 15], axis=1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.savez(inputs / "2D_Many_Boxes_0001.npz", imgs=case.image, boxes=boxes)
    args = ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(fp32_model_dir), "--batch", "64"]
    assert main(args) == 0
    segs = np.load(tmp_path / "out" / "2D_Many_Boxes_0001.npz")["segs"]
    assert segs.dtype == np.uint16 and segs.max() > 255


def test_cli_help_and_missing_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qmedsam.cli", "predict", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--prompt-mode" in result.stdout
    assert main(["predict", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 2

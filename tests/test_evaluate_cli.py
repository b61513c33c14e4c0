"""`qmedsam evaluate` end to end: outputs, the table, runtime, the report, and per-case problems."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qmedsam.cli import main
from qmedsam.data.cases import load_npz, read_ground_truth
from qmedsam.evaluate.metrics import evaluate_arrays


def _write(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _shifted_predictions(demo_dir: Path, out: Path) -> dict[str, np.ndarray]:
    """Predictions = ground truth shifted by one voxel (plus one slice in 3D)."""
    preds = {}
    for gt_path in sorted((demo_dir / "gts").glob("*.npz")):
        gt = read_ground_truth(gt_path)
        pred = np.roll(gt, 1, axis=gt.ndim - 1)
        if gt.ndim == 3:
            pred = np.roll(pred, 1, axis=0)
        _write(out / gt_path.name, segs=pred)
        preds[gt_path.name] = pred
    return preds


def _evaluate(pred: Path, gt: Path, *extra: str) -> int:
    """`qmedsam evaluate --pred PRED --gt GT EXTRA...` in process; its exit code."""
    return main(["evaluate", "--pred", str(pred), "--gt", str(gt), *extra])


def test_demo_end_to_end_with_report_and_timing(demo_dir: Path, tmp_path: Path, capsys) -> None:
    pred_dir = tmp_path / "pred"
    preds = _shifted_predictions(demo_dir, pred_dir)
    names = sorted(preds)
    with (pred_dir / "timing.csv").open("w", newline="") as handle:  # as `qmedsam predict` writes it
        writer = csv.writer(handle)
        writer.writerow(["case", "dimension", "modality", "objects", "seconds", "status", "message"])
        for i, name in enumerate(names):
            writer.writerow([name, name[:2], "", 1, 1.0 + i, "ok", ""])
        writer.writerow(["3D_XX_gone.npz", "3D", "XX", 1, 99.0, "error", "boom"])
    report = tmp_path / "report"
    code = _evaluate(
        pred_dir,
        demo_dir / "gts",
        "--images",
        str(demo_dir / "cases"),
        "--report",
        str(report),
        "--workers",
        "2",
        "--worst",
        "2",
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    for column in ("modality", "cases", "objects", "DSC", "NSD", "median s/case"):
        assert column in out.out
    assert "overall" in out.out and "NSD rule: challenge" in out.out

    summary = json.loads((report / "summary.json").read_text())
    assert summary["settings"]["nsd_rule"] == "challenge"
    assert summary["overall"]["cases"] == len(names) and summary["errors"] == []
    assert summary["overall"]["median_seconds"] == pytest.approx(float(np.median(1.0 + np.arange(len(names)))))

    # Every number in the files is what the library computes for that case (3D spacing from the case files).
    rows = _rows(report / "metrics.csv")
    assert list(rows[0]) == ["case", "modality", "label", "dsc", "nsd", "pred_voxels", "gt_voxels"]
    cases = {r["case"]: r for r in _rows(report / "cases.csv")}
    for name in names:
        gt = read_ground_truth(demo_dir / "gts" / name)
        spacing = load_npz(demo_dir / "cases" / name).get("spacing")
        labels, dsc, nsd, _ = evaluate_arrays(gt, preds[name], dimension=gt.ndim, spacing=spacing)
        assert float(cases[name]["dsc"]) == pytest.approx(dsc, abs=1e-9)
        assert float(cases[name]["nsd"]) == pytest.approx(nsd, abs=1e-9)
        mine = [r for r in rows if r["case"] == name]
        assert [int(r["label"]) for r in mine] == [r.label for r in labels]
        assert [int(r["gt_voxels"]) for r in mine] == [r.gt_voxels for r in labels]
        if gt.ndim == 3:
            assert cases[name]["spacing_source"] == "gt"  # demo gts carry spacing, like the challenge's

    assert (report / "report.html").is_file()
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    assert "modalities.png" in figures and len(figures) == 3
    html = (report / "report.html").read_text()
    assert all(f"figures/{f}" in html for f in figures)


def test_perfect_predictions_score_one_and_results_go_next_to_predictions(
    demo_dir: Path, tmp_path: Path, capsys
) -> None:
    pred_dir = tmp_path / "pred"
    for gt_path in (demo_dir / "gts").glob("*.npz"):
        _write(pred_dir / gt_path.name, segs=read_ground_truth(gt_path))
    code = _evaluate(pred_dir, demo_dir / "gts", "--images", str(demo_dir / "cases"), "--workers", "1")
    assert code == 0, capsys.readouterr().err
    summary = json.loads((pred_dir / "summary.json").read_text())
    assert summary["overall"]["dsc"] == pytest.approx(1.0) and summary["overall"]["nsd"] == pytest.approx(1.0)
    assert (pred_dir / "metrics.csv").is_file() and (pred_dir / "cases.csv").is_file()
    assert not (pred_dir / "report.html").exists()


def _small_set(root: Path) -> tuple[Path, Path, Path]:
    """A handful of small cases with one problem each, plus two good ones."""
    gt_dir, pred_dir, img_dir = root / "gts", root / "pred", root / "imgs"
    gt2 = np.zeros((24, 24), np.uint8)
    gt2[4:12, 4:12] = 1
    gt2[14:20, 14:22] = 2
    gt3 = np.zeros((6, 16, 16), np.uint8)
    gt3[1:5, 3:9, 3:9] = 1
    # good 2D, good 3D with spacing in the gt file
    _write(gt_dir / "2D_Test_ok_0001.npz", gts=gt2)
    _write(pred_dir / "2D_Test_ok_0001.npz", segs=gt2)
    _write(gt_dir / "3D_CT_ok_0001.npz", gts=gt3, spacing=np.array([2.0, 0.5, 0.5]))
    _write(pred_dir / "3D_CT_ok_0001.npz", segs=np.roll(gt3, 1, axis=2))
    # missing prediction
    _write(gt_dir / "2D_Test_missing_0001.npz", gts=gt2)
    # prediction without gt
    _write(pred_dir / "2D_Test_extra_0001.npz", segs=gt2)
    # shape mismatch
    _write(gt_dir / "2D_Test_shape_0001.npz", gts=gt2)
    _write(pred_dir / "2D_Test_shape_0001.npz", segs=gt2[:20])
    # NaN spacing
    _write(gt_dir / "3D_CT_nan_0001.npz", gts=gt3, spacing=np.array([np.nan, 1.0, 1.0]))
    _write(pred_dir / "3D_CT_nan_0001.npz", segs=gt3)
    # no spacing anywhere
    _write(gt_dir / "3D_MR_nospacing_0001.npz", gts=gt3)
    _write(pred_dir / "3D_MR_nospacing_0001.npz", segs=gt3)
    # wrong key in the prediction
    _write(gt_dir / "2D_Test_key_0001.npz", gts=gt2)
    _write(pred_dir / "2D_Test_key_0001.npz", masks=gt2)
    img_dir.mkdir()
    return gt_dir, pred_dir, img_dir


def test_problems_are_reported_per_case_and_the_rest_is_scored(tmp_path: Path, capsys) -> None:
    gt_dir, pred_dir, _ = _small_set(tmp_path)
    out_dir = tmp_path / "out"
    code = main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out_dir), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "2D_Test_missing_0001.npz: prediction missing" in err
    assert "2D_Test_extra_0001.npz: prediction has no ground truth" in err
    assert "key 'segs' has shape (20, 24); expected the ground truth's shape (24, 24)" in err
    assert "3D_CT_nan_0001.npz: key 'spacing' is [nan, 1.0, 1.0]; expected 3 positive finite numbers" in err
    assert "3D_MR_nospacing_0001.npz" in err and "no key 'spacing'" in err and "--images" in err
    assert "missing key 'segs'" in err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["overall"]["cases"] == 2 and summary["overall"]["errors"] == 5
    assert len(summary["errors"]) == 6
    cases = {r["case"]: r for r in _rows(out_dir / "cases.csv")}
    assert float(cases["2D_Test_ok_0001.npz"]["dsc"]) == 1.0
    assert cases["3D_CT_ok_0001.npz"]["spacing"] == "2 0.5 0.5" and cases["3D_CT_ok_0001.npz"]["spacing_source"] == "gt"
    assert cases["2D_Test_missing_0001.npz"]["error"]
    assert not (pred_dir / "summary.json").exists()  # --out wins


def test_spacing_sources_and_order(tmp_path: Path, capsys) -> None:
    gt = np.zeros((8, 20, 20), np.uint8)
    gt[2:6, 4:14, 5:12] = 1
    pred = np.roll(gt, 2, axis=2)
    _write(tmp_path / "gts" / "3D_CT_a_0001.npz", gts=gt)
    _write(tmp_path / "pred" / "3D_CT_a_0001.npz", segs=pred)
    _write(tmp_path / "imgs" / "3D_CT_a_0001.npz", imgs=np.zeros(gt.shape, np.uint8), spacing=np.array([0.8, 0.8, 3.0]))

    def nsd(*extra: str) -> float:
        code = main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--gt",
                str(tmp_path / "gts"),
                "--images",
                str(tmp_path / "imgs"),
                "--workers",
                "1",
                *extra,
            ]
        )
        assert code == 0
        return json.loads((tmp_path / "pred" / "summary.json").read_text())["cases"][0]["nsd"]

    as_stored = nsd()
    assert "--spacing-order xyz" in capsys.readouterr().err  # (0.8, 0.8, 3.0) for a (D, H, W) array looks xyz
    reversed_ = nsd("--spacing-order", "xyz")
    assert "--spacing-order xyz" not in capsys.readouterr().err
    assert as_stored == pytest.approx(evaluate_arrays(gt, pred, dimension=3, spacing=(0.8, 0.8, 3.0))[2])
    assert reversed_ == pytest.approx(evaluate_arrays(gt, pred, dimension=3, spacing=(3.0, 0.8, 0.8))[2])
    assert as_stored != pytest.approx(reversed_)
    # The gt file's spacing wins over the case file's.
    _write(tmp_path / "gts" / "3D_CT_a_0001.npz", gts=gt, spacing=np.array([3.0, 0.8, 0.8]))
    assert nsd() == pytest.approx(reversed_)


def test_per_label_rule_and_parallel_workers_agree(tmp_path: Path, capsys) -> None:
    gt_dir, pred_dir, _ = _small_set(tmp_path)
    for name in (
        "2D_Test_missing_0001.npz",
        "2D_Test_shape_0001.npz",
        "3D_CT_nan_0001.npz",
        "3D_MR_nospacing_0001.npz",
        "2D_Test_key_0001.npz",
    ):
        (gt_dir / name).unlink()
        (pred_dir / name).unlink(missing_ok=True)
    (pred_dir / "2D_Test_extra_0001.npz").unlink()
    results = {}
    for rule in ("challenge", "per-label"):
        for workers in ("1", "2"):
            out = tmp_path / f"{rule}-{workers}"
            assert (
                main(
                    [
                        "evaluate",
                        "--pred",
                        str(pred_dir),
                        "--gt",
                        str(gt_dir),
                        "--out",
                        str(out),
                        "--nsd-rule",
                        rule,
                        "--workers",
                        workers,
                    ]
                )
                == 0
            )
            results[rule, workers] = (out / "metrics.csv").read_text()
    capsys.readouterr()
    assert results["challenge", "1"] == results["challenge", "2"]
    assert results["per-label", "1"] == results["per-label", "2"]
    summary = json.loads((tmp_path / "per-label-1" / "summary.json").read_text())
    assert summary["settings"]["nsd_rule"] == "per-label"


def test_gap_labels_and_bad_timing(tmp_path: Path, capsys) -> None:
    gt = np.zeros((20, 20), np.uint8)
    gt[2:8, 2:8] = 1
    gt[10:16, 10:16] = 3
    _write(tmp_path / "gts" / "2D_Test_gap_0001.npz", gts=gt)
    _write(tmp_path / "pred" / "2D_Test_gap_0001.npz", segs=gt)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gts")]) == 0
    captured = capsys.readouterr()
    assert "labels [2] are in neither gt nor prediction" in captured.err
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["cases"][0]["dsc"] is None and summary["cases"][0]["nsd"] == 0.0  # NaN -> null in JSON
    assert summary["overall"]["nan_dsc_cases"] == 1 and summary["overall"]["dsc"] is None
    rows = _rows(tmp_path / "pred" / "metrics.csv")
    assert [r["dsc"] for r in rows] == ["1", "nan", "1"]

    (tmp_path / "t.csv").write_text("name,time\nx,1\n")
    code = _evaluate(tmp_path / "pred", tmp_path / "gts", "--timing", str(tmp_path / "t.csv"))
    assert code == 2 and "missing column(s) ['case', 'seconds']" in capsys.readouterr().err


def test_fatal_input_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--pred", str(tmp_path / "empty"), "--gt", str(tmp_path / "empty")]) == 2
    assert "no ground-truth .npz or NIfTI files" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path / "empty")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_help_documents_the_rules(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0.96 (challenge) vs 0.74 (per-label)" in text
    assert "--spacing-order" in text and "summary.json" in text and "--out" in text


def test_report_without_images(demo_dir: Path, tmp_path: Path, capsys) -> None:
    gts = tmp_path / "gts"
    shutil.copytree(demo_dir / "gts", gts)
    for path in gts.glob("3D_*.npz"):  # keep the test small: 2D only
        path.unlink()
    _shifted_predictions(tmp_path, tmp_path / "pred")
    report = tmp_path / "report"
    assert (
        main(
            ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(gts), "--report", str(report), "--workers", "1"]
        )
        == 0
    )
    capsys.readouterr()
    assert len(list((report / "figures").glob("case_*.png"))) == len(list(gts.glob("*.npz")))

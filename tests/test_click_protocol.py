"""`qmedsam evaluate --clicks K`: the interactive protocol on real demo cases with a real model.

The pretrained model was trained with boxes only and gets worse with clicks, so these tests check the
protocol's mechanics (click 0 = predict + evaluate, where clicks land, what is re-decoded, the outputs, the
per-case errors, determinism), not that Dice rises.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from qmedsam.cli import main
from qmedsam.data.cases import read_case, read_ground_truth
from qmedsam.engines import load_engine
from qmedsam.evaluate.click_protocol import auc, click_window, run_clicks
from qmedsam.evaluate.interaction import INCLUDE, next_click
from qmedsam.inference.segment import segment_case
from qmedsam.segmenter import Segmenter

CT_2D = "2D_CT_TotalSeg_0001.npz"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def engine(fp32_model_dir: Path):
    return load_engine(fp32_model_dir, precision="f32")


def test_auc_is_the_trapezoid_over_clicks_divided_by_k() -> None:
    assert auc([1.0, 1.0, 1.0]) == 1.0
    assert auc([0.0, 1.0]) == 0.5
    assert auc([0.5, 0.7, 0.9]) == pytest.approx(0.7)
    assert auc([0.8]) is None
    assert np.isnan(auc([0.5, float("nan")]))


def _bbox(mask: np.ndarray):
    found = ndimage.find_objects(mask.astype(np.uint8))
    return found[0] if found else None


@pytest.mark.parametrize("shape", [(48, 40), (7, 30, 26)])
def test_clicks_on_the_window_equal_clicks_on_the_whole_image(shape: tuple[int, ...]) -> None:
    """The protocol runs `next_click` on the object's window (mask ∪ truth + 1 voxel): the same click, also for
    errors that touch the image edge, ties and anisotropic spacing."""
    rng = np.random.default_rng(7)
    spacing = (3.0, 1.0, 1.0) if len(shape) == 3 else None
    for trial in range(30):
        truth = np.zeros(shape, bool)
        low = [int(rng.integers(0, s // 2)) for s in shape]
        high = [int(rng.integers(lo + 1, s + 1)) for lo, s in zip(low, shape, strict=True)]
        truth[tuple(slice(a, b) for a, b in zip(low, high, strict=True))] = True
        prediction = np.roll(truth, int(rng.integers(-3, 4)), axis=len(shape) - 1)
        prediction ^= ndimage.binary_dilation(rng.random(shape) > 0.995) & (trial % 2 == 0)
        window = click_window([_bbox(prediction), _bbox(truth)], shape)
        full = next_click(prediction, truth, spacing)
        if window is None:
            assert full is None
            continue
        cropped = next_click(prediction[window], truth[window], spacing)
        if full is None:
            assert cropped is None
            continue
        assert cropped is not None and cropped.label == full.label
        assert tuple(p + s.start for p, s in zip(cropped.position, window, strict=True)) == full.position


def test_cli_click_0_is_predict_then_evaluate_bad_cases_reported_and_runs_repeat(
    demo_dir: Path, fp32_model_dir: Path, tmp_path: Path, capsys
) -> None:
    gts = tmp_path / "gts"
    gts.mkdir()
    shutil.copy(demo_dir / "gts" / CT_2D, gts)
    # two bad cases: a ground truth of the wrong shape for its image, and one without a case file
    shutil.copy(demo_dir / "gts" / CT_2D, gts / "2D_Microscopy_DSB2018_0001.npz")
    shutil.copy(demo_dir / "gts" / CT_2D, gts / "2D_CT_Missing_0001.npz")
    model = ["-m", str(fp32_model_dir), "--precision", "f32"]
    clicks = ["evaluate", "--clicks", "2", "--images", str(demo_dir / "cases"), "--gt", str(gts), *model]

    assert main([*clicks, "--out", str(tmp_path / "run1")]) == 1
    captured = capsys.readouterr()
    assert "2D_CT_Missing_0001.npz: case file missing" in captured.err
    assert "2D_Microscopy_DSB2018_0001.npz: key 'gts' has shape (101, 122)" in captured.err
    assert "3D_CT_TotalSeg_0001.npz: no ground truth" in captured.err  # case files without gt: a warning
    table = captured.out.splitlines()
    assert table[0].split() == ["modality", "cases", "objects", "click", "0", "click", "1", "click", "2", "AUC"]
    assert table[1].split()[:3] == ["CT", "1", "6"]

    run1 = tmp_path / "run1"
    assert sorted(p.name for p in run1.iterdir()) == ["cases.csv", "clicks.csv", "metrics.csv", "summary.json"]
    rows = _rows(run1 / "clicks.csv")
    assert [(r["case"], r["modality"], r["click"]) for r in rows] == [(CT_2D, "CT", str(k)) for k in range(3)]
    summary = json.loads((run1 / "summary.json").read_text())
    assert len(summary["errors"]) == 2 and summary["overall"]["errors"] == 2
    section = summary["clicks"]
    assert section["clicks"] == 2 and "trapezoid" in section["auc"]
    (case,) = [c for c in section["cases"] if c["case"] == CT_2D]
    assert [float(r["dsc"]) for r in rows] == pytest.approx(case["dsc"], abs=1e-9)
    assert [float(r["nsd"]) for r in rows] == pytest.approx(case["nsd"], abs=1e-9)
    assert case["auc_dsc"] == pytest.approx((case["dsc"][0] / 2 + case["dsc"][1] + case["dsc"][2] / 2) / 2)
    assert section["overall"]["dsc"] == case["dsc"] and section["modalities"]["CT"]["auc_dsc"] == case["auc_dsc"]
    # one encoding; one decoder call for the six boxes, then one per click (no object is exact with this model)
    assert case["encoded_slices"] == 1
    assert case["clicks_placed"][0] == 0 and case["decoder_calls"] == 1 + sum(case["clicks_placed"])
    assert all(0 < n <= 6 for n in case["clicks_placed"][1:])
    failed = {c["case"]: c["error"] for c in section["cases"] if c["error"]}
    assert sorted(failed) == ["2D_CT_Missing_0001.npz", "2D_Microscopy_DSB2018_0001.npz"]

    # click 0 is exactly what `qmedsam evaluate` reports for `qmedsam predict`'s masks of the same model
    ok_gts = tmp_path / "ok_gts"
    ok_gts.mkdir()
    shutil.copy(demo_dir / "gts" / CT_2D, ok_gts)
    assert main(["predict", "-i", str(demo_dir / "cases" / CT_2D), "-o", str(tmp_path / "pred"), *model]) == 0
    evaluated = tmp_path / "evaluated"
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(ok_gts), "--out", str(evaluated)]) == 0
    capsys.readouterr()
    assert (run1 / "metrics.csv").read_bytes() == (evaluated / "metrics.csv").read_bytes()
    (reference,) = json.loads((evaluated / "summary.json").read_text())["cases"]
    (mine,) = [c for c in summary["cases"] if c["case"] == CT_2D]
    for key in ("dsc", "nsd", "nsd_computed", "objects", "labels", "dimension"):
        assert mine[key] == reference[key], key
    assert case["dsc"][0] == reference["dsc"] and case["nsd"][0] == reference["nsd"]

    # deterministic: a second run writes the same numbers
    assert main([*clicks, "--out", str(tmp_path / "run2")]) == 1
    capsys.readouterr()
    run2 = tmp_path / "run2"
    for name in ("clicks.csv", "metrics.csv", "cases.csv"):
        assert (run1 / name).read_bytes() == (run2 / name).read_bytes(), name
    again = json.loads((run2 / "summary.json").read_text())["clicks"]
    for first, second in zip(section["cases"], again["cases"], strict=True):
        first.pop("seconds"), second.pop("seconds")
        assert first == second


def test_3d_clicks_give_what_segmenter_predict_gives_for_the_box_and_its_clicks(
    demo_dir: Path, engine, tmp_path: Path
) -> None:
    """A 4-slice cut of the demo CT volume; the first object moved last (nothing paints over it) with its box
    shortened to slice 0 while its ground truth fills all four: its first click is an include on a slice outside
    the box's z range (the missed slices 1..3 are the deepest error, 3 mm slices), which re-decodes that slice
    and carries nowhere (outside the box's z range). Every object's mask after its clicks is what
    `Segmenter.predict` gives for its 3D box and the same clicks, carried slices included."""
    with np.load(demo_dir / "cases" / "3D_CT_TotalSeg_0001.npz") as data:
        volume, boxes, spacing = data["imgs"][10:14], data["boxes"].copy(), data["spacing"]
    gt = read_ground_truth(demo_dir / "gts" / "3D_CT_TotalSeg_0001.npz")[10:14]
    boxes[:, 2], boxes[:, 5] = np.maximum(boxes[:, 2], 10) - 10, np.minimum(boxes[:, 5], 13) - 10
    order = [1, 2, 3, 4, 5, 0]
    boxes = boxes[order]
    boxes[5, 5] = 0
    relabelled = np.zeros_like(gt)
    for new, old in enumerate(order):
        relabelled[gt == old + 1] = new + 1
    assert (relabelled == 6).any(axis=(1, 2)).all()  # object 6 on all four slices
    np.savez_compressed(tmp_path / "3D_CT_Cut_0001.npz", imgs=volume, boxes=boxes, spacing=spacing)
    case = read_case(tmp_path / "3D_CT_Cut_0001.npz")
    spacing_zyx = tuple(float(s) for s in spacing)

    run = run_clicks(engine, case, relabelled, 2, spacing=spacing_zyx)
    assert np.array_equal(run.box_segs, segment_case(engine, case))  # click 0: predict's fixed-box rule
    assert not (run.box_segs[1:] == 6).any()  # the short box predicts nothing on slices 1..3
    assert len(run.scores) == 3 and run.clicks_placed[0] == 0
    assert run.encoded_slices == 4  # every slice once, clicks included
    assert run.decoder_calls >= 4 + sum(run.clicks_placed)  # one per click, plus the slices it carried to
    click = run.clicks[5][0]
    assert click.label == INCLUDE and click.position[0] >= 1 and relabelled[click.position] == 6
    segmenter = Segmenter(engine=engine)
    segmenter.set_image(volume)
    carried_somewhere = False
    for index, clicks in enumerate(run.clicks):
        points = [[c.position[2], c.position[1], c.position[0]] for c in clicks]
        labels = [c.label for c in clicks]
        expected = segmenter.predict(boxes[index], points=points, point_labels=labels, spacing=spacing_zyx)
        alone = segmenter.predict(boxes[index])
        if index == 5:
            assert np.array_equal(run.segs == 6, expected)  # painted last: its label is exactly its mask
            assert expected[click.position[0]].any()
        else:  # painted under later objects: where it shows, it is its mask
            shown = run.segs == index + 1
            assert not (shown & ~expected).any()
        clicked = {c.position[0] for c in clicks}
        carried_somewhere |= any(not np.array_equal(expected[z], alone[z]) for z in set(range(4)) - clicked)
    assert carried_somewhere  # some click's correction reached a slice it did not land on


def test_cli_refusals(demo_dir: Path, box_only_model_dir: Path, tmp_path: Path, capsys) -> None:
    base = ["evaluate", "--gt", str(demo_dir / "gts")]
    cases = ["--images", str(demo_dir / "cases")]
    refused = [
        ([*base, *cases, "--clicks", "0", "--out", str(tmp_path)], "--clicks must be at least 1"),
        ([*base, *cases, "--clicks", "1"], "--clicks needs --images"),
        ([*base, *cases, "--clicks", "1", "--out", str(tmp_path), "--pred", str(tmp_path)], "--pred"),
        ([*base, "--images", str(tmp_path / "nope"), "--clicks", "1", "--out", str(tmp_path)], "is not a folder"),
        ([*base], "--pred is required"),
        ([*base, "--pred", str(tmp_path), "-m", "fp32"], "-m/--model apply with --clicks"),
        # a model folder exported before clicks: refused before any case is run
        (
            [*base, *cases, "--clicks", "1", "--out", str(tmp_path), "-m", str(box_only_model_dir)],
            "takes boxes only",
        ),
    ]
    for argv, message in refused:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not any(tmp_path.iterdir())


def test_help_states_the_protocol(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--clicks K" in text and "clicks.csv" in text and "divided by K" in text
    assert "farthest from the region's border" in text

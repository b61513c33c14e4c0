"""`qmedsam finetune`: the user's labelled cases -> a training tree, the click recipe, a model folder and the
before/after table, end to end on real demo cases at the smallest size that runs every step; and the refusals,
which come before any training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qmedsam.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "slice_stride=40",
    "views_per_slice=1",
    "val_max_views=2",
    "val_max_objects=4",
    "calib_views=2",
    "batch_size=2",
    "max_clicks=1",
    "steps=2",
    "warmup_steps=1",
    "val_every_steps=2",
    "threads=2",
]
MR = "3D_MR_TotalSeg_0001"
CT = "2D_CT_TotalSeg_0001"
MICROSCOPY = "2D_Microscopy_DSB2018_0001"


def _pair(cases: Path, gts: Path, name: str, case: dict, truth: dict) -> None:
    cases.mkdir(parents=True, exist_ok=True)
    gts.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cases / f"{name}.npz", **case)
    np.savez_compressed(gts / f"{name}.npz", **truth)


@pytest.fixture(scope="module")
def user_cases(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's folders, real demo data under names of the user's choosing (no 2D_/3D_ prefix): `case_a` a
    128 x 128 crop of the microscopy image with its 6 nuclei (imgs, boxes / gts), `case_b` the 2D CT slice as
    the demo has it, `case_c` the MR volume cut to 6 slices without boxes (3D from the shape of its gts; the
    spacing in both files)."""
    from qmedsam.datasets.recipes.demo import promptable_labels, relabel, tight_boxes

    root = tmp_path_factory.mktemp("user")
    cases, gts = root / "cases", root / "gts"
    with (
        np.load(demo_dir / "cases" / f"{MICROSCOPY}.npz") as case,
        np.load(demo_dir / "gts" / f"{MICROSCOPY}.npz") as truth,
    ):
        crop = (slice(0, 128), slice(128, 256))
        kept, _ = promptable_labels(truth["gts"][crop], 10)
        labels = relabel(truth["gts"][crop], kept)
        _pair(
            cases, gts, "case_a", {"imgs": case["imgs"][crop], "boxes": tight_boxes(labels, len(kept))}, {"gts": labels}
        )
    for folder in ("cases", "gts"):
        shutil.copy(demo_dir / folder / f"{CT}.npz", root / folder / "case_b.npz")
    with np.load(demo_dir / "cases" / f"{MR}.npz") as case, np.load(demo_dir / "gts" / f"{MR}.npz") as truth:
        cut = slice(7, 13)
        _pair(
            cases,
            gts,
            "case_c",
            {"imgs": case["imgs"][cut], "spacing": case["spacing"]},
            {"gts": truth["gts"][cut], "spacing": truth["spacing"]},
        )
    # A bad pair: skipped, named, and the run goes on (exit code 1 at the end).
    _pair(cases, gts, "case_d", {"imgs": np.zeros((32, 32), np.uint8)}, {"labels": np.ones((32, 32), np.uint8)})
    return root


@pytest.fixture(scope="module")
def finetuned(user_cases: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("finetune") / "run"
    argv = ["finetune", "--images", str(user_cases / "cases"), "--gt", str(user_cases / "gts"), "--out", str(out)]
    code = main([*argv, "--held-out-every", "2", "--clicks", "1", "--set", *TINY])
    return out, code


def test_finetune_builds_the_tree_trains_exports_and_scores_before_and_after(finetuned, user_cases: Path):
    from qmedsam import Segmenter
    from qmedsam.data.cases import read_case
    from qmedsam.datasets.manifest import labelled_split_entries
    from qmedsam.inference.model_dir import shipped_int8_model_dir

    out, code = finetuned
    assert code == 1  # everything ran; one pair was skipped
    # The tree: every case once, split by case (sorted names, every 2nd held out), readable by the recipe.
    manifest = json.loads((out / "tree" / "manifest.json").read_text())
    assert manifest["format"] == "qmedsam training tree"
    assert (
        len(manifest["skipped"]) == 1
        and f"{user_cases / 'gts' / 'case_d.npz'}: missing key 'gts'" in manifest["skipped"][0]
    )
    splits = {e["name"]: e["split"] for e in manifest["cases"]}
    assert splits == {"case_a.npz": "train", "case_b.npz": "validation", "case_c.npz": "train"}
    volume = next(e for e in manifest["cases"] if e["name"] == "case_c.npz")
    assert volume["dimension"] == 3 and volume["spacing"] is not None and volume["n_objects"] == 6
    assert [e["name"] for e in labelled_split_entries(out / "tree", "train")] == ["case_a.npz", "case_c.npz"]
    with np.load(out / "tree" / "cases" / "case_a.npz") as data:
        assert set(data) == {"imgs", "gts"} and data["imgs"].shape == (128, 128, 3) and data["gts"].shape == (128, 128)
    with np.load(out / "tree" / "cases" / "case_c.npz") as data:
        assert set(data) == {"imgs", "gts", "spacing"} and data["imgs"].shape == data["gts"].shape
    assert list((out / "tree" / ".click-cache").glob("*.npy"))
    # The held-out case is the user's own pair, copied byte for byte; the user's folders are untouched.
    name = "case_b.npz"
    for folder in ("cases", "gts"):
        assert (out / "held_out" / folder / name).read_bytes() == (user_cases / folder / name).read_bytes()
        assert sorted(p.name for p in (user_cases / folder).iterdir()) == [
            "case_a.npz",
            name,
            "case_c.npz",
            "case_d.npz",
        ]
    # The run and the model folder: the shipped encoder with the trained decoder, taking clicks.
    assert (out / "run" / "best.pt").is_file() and (out / "run" / "metrics.jsonl").is_file()
    model = out / "model"
    assert (model / "encoder.bin").read_bytes() == (shipped_int8_model_dir() / "encoder.bin").read_bytes()
    meta = json.loads((model / "meta.json").read_text())
    assert meta["source"]["recipe"] == "clicks" and "points" in meta["inputs"]["decoder"]
    case = read_case(out / "held_out" / "cases" / name)
    segmenter = Segmenter(model)
    segmenter.set_image(case.image)
    x0, y0, x1, y1 = case.boxes[0]
    mask = segmenter.predict(case.boxes[0], points=[[(x0 + x1) / 2, (y0 + y1) / 2]], point_labels=[1])
    assert mask.shape == case.image.shape[:2] and mask.any()
    # before_after.json: one row per model, DSC after the box and after the click, the AUC.
    result = json.loads((out / "before_after.json").read_text())
    assert result["clicks"] == 1 and result["held_out_cases"] == [name] and result["skipped"] == manifest["skipped"]
    assert Path(result["model"]) == model.resolve() and result["config"]["steps"] == 2
    before, after = result["rows"]["before"], result["rows"]["after"]
    assert after["takes_clicks"] is True and after["cases"] == 1 and after["objects"] == 6
    assert len(after["dsc"]) == 2 and all(0.0 <= d <= 1.0 for d in after["dsc"]) and 0.0 <= after["auc_dsc"] <= 1.0
    assert Path(before["model"]) == shipped_int8_model_dir() and 0.0 <= before["dsc"][0] <= 1.0
    if before["takes_clicks"]:
        assert before["dsc"][1] is not None and before["auc_dsc"] is not None
    else:  # the shipped decoder takes boxes only: scored with its boxes, the click columns n/a
        assert before["dsc"][1] is None and before["auc_dsc"] is None
    assert (out / "finetune.json").is_file()


def test_an_earlier_run_folder_is_reused_and_a_foreign_one_refused(finetuned, user_cases: Path, tmp_path: Path, capsys):
    out, _ = finetuned
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    argv = ["finetune", "--images", str(user_cases / "cases"), "--gt", str(user_cases / "gts")]
    capsys.readouterr()
    assert main([*argv, "--out", str(foreign), "--set", *TINY]) == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # The earlier run's folder passes the folder check (refused later, here by a bad key, before any training).
    assert main([*argv, "--out", str(out), "--set", "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_key" in err and "did not write" not in err
    assert (out / "model" / "meta.json").is_file()


def _run(images: Path, gts: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["finetune", "--images", str(images), "--gt", str(gts), "--out", str(out), *extra, "--set", *TINY])
    return code, capsys.readouterr().err


def test_one_case_is_refused_before_anything_is_written(demo_dir: Path, tmp_path: Path, capsys):
    cases, gts = tmp_path / "cases", tmp_path / "gts"
    name = "2D_CT_TotalSeg_0001.npz"
    for source, folder in (("cases", cases), ("gts", gts)):
        folder.mkdir()
        shutil.copy(demo_dir / source / name, folder)
    code, err = _run(cases, gts, tmp_path / "out", capsys)
    assert code == 2 and "at least 2 labelled cases" in err and "1 usable" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_gts_key_and_mismatched_shapes_are_named_and_skipped(demo_dir: Path, tmp_path: Path, capsys):
    cases, gts = tmp_path / "cases", tmp_path / "gts"
    image = np.zeros((40, 50, 3), np.uint8)
    labels = np.zeros((40, 50), np.uint8)
    labels[10:20, 10:30] = 1
    _pair(cases, gts, "2D_a", {"imgs": image}, {"labels": labels})  # the key is 'gts'
    _pair(cases, gts, "2D_b", {"imgs": image}, {"gts": labels[:30]})  # shape differs from imgs
    _pair(cases, gts, "2D_c", {"imgs": image}, {"gts": labels})  # the only good one
    code, err = _run(cases, gts, tmp_path / "out", capsys)
    assert code == 2 and "3 pair(s) found, 1 usable" in err
    assert f"{gts / '2D_a.npz'}: missing key 'gts'" in err
    assert f"{gts / '2D_b.npz'}: key 'gts' has shape (30, 50); expected the shape of key 'imgs'" in err
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused_before_the_cases_are_read(tmp_path: Path, capsys):
    missing = tmp_path / "nowhere"
    for extra, message in (
        (["--set", "data_root=x"], "sets these itself"),
        (["--steps", "3", "--set", "steps=4"], "not both"),
        (["--held-out-every", "1"], "at least 2"),
        (["--clicks", "0"], "at least 1"),
        (["-m", "fp32"], "int8 encoder"),
    ):
        code = main(["finetune", "--images", str(missing), "--gt", str(missing), "--out", str(tmp_path / "o"), *extra])
        assert code == 2 and message in capsys.readouterr().err, extra


def test_nifti_pairs_become_tree_files_and_held_out_cases(demo_dir: Path, tmp_path: Path):
    """A scan + label map on its grid: the working (z, y, x) array, windowed to uint8, spacing in array order;
    held out as a challenge case with the tight box of every label (a NIfTI is never copied)."""
    import nibabel as nib

    from qmedsam.data.cases import read_case
    from qmedsam.datasets.recipes.user_tree import build_user_tree

    cases, gts = tmp_path / "cases", tmp_path / "gts"
    cases.mkdir()
    gts.mkdir()
    with np.load(demo_dir / "gts" / f"{MR}.npz") as truth:
        labels = truth["gts"][7:13]
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])  # (i, j, k) = (x, y, z), spacing 2.5 mm between slices
    for name in ("scan_a", "scan_b"):
        volume = rng.normal(300.0, 50.0, labels.shape[::-1]).astype(np.float32)  # MR-like values, (i, j, k)
        nib.save(nib.Nifti1Image(volume, affine), str(cases / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(labels.T.astype(np.int16), affine), str(gts / f"{name}.nii.gz"))
    tree = build_user_tree(cases, gts, tmp_path / "tree", tmp_path / "held_out", held_out_every=2)
    assert tree.train == ["scan_a.npz"] and tree.held_out == ["scan_b.npz"] and tree.skipped == []
    manifest = json.loads((tmp_path / "tree" / "manifest.json").read_text())
    entry = manifest["cases"][0]
    assert entry["dimension"] == 3 and np.allclose(entry["spacing"], [2.5, 0.9, 0.8]) and entry["windowing"]["method"]
    with np.load(tmp_path / "tree" / "cases" / "scan_a.npz") as data:
        assert data["imgs"].dtype == np.uint8 and data["imgs"].shape == data["gts"].shape
        assert sorted(np.unique(data["gts"]).tolist()) == sorted(np.unique(labels).tolist())
    case = read_case(tmp_path / "held_out" / "cases" / "scan_b.npz")
    with np.load(tmp_path / "held_out" / "gts" / "scan_b.npz") as truth:
        assert case.dimension == 3 and len(case.boxes) == int(truth["gts"].max()) == 6
        assert np.allclose(truth["spacing"], [2.5, 0.9, 0.8])


def test_click_config_defaults_are_the_recipe_file(tmp_path: Path):
    """`qmedsam finetune` builds its config from ClickConfig's defaults (installed users have no configs/):
    they must be configs/train/clicks.yaml's values."""
    import yaml

    from qmedsam.train.config import ClickConfig

    path = REPO / "configs" / "train" / "clicks.yaml"
    if not path.is_file():
        pytest.skip("no configs/train/clicks.yaml in this checkout")
    recipe = yaml.safe_load(path.read_text())
    defaults = ClickConfig().to_dict()
    differing = {
        key: (value, defaults.get(key))
        for key, value in recipe.items()
        if key not in ("data_root", "out_dir") and defaults.get(key) != value
    }
    assert not differing

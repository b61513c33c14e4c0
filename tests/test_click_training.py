"""The click recipe end to end on the real training tree, at the smallest size that runs every part: views cached
from the shipped int8 encoder, a simulated interaction per sample, validation by the protocol's rule,
checkpoints and resume, then `qmedsam export` of the click-trained int8 decoder beside the encoder it learned on,
with its parity checks, and the folder used for clicks through the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qmedsam.cli import main
from qmedsam.inference.model_dir import encoder_sha256, shipped_int8_model_dir

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "train" / "clicks.yaml"
SMALL = [
    "slice_stride=40",
    "views_per_slice=2",
    "val_max_views=3",
    "val_max_objects=4",
    "calib_views=4",
    "batch_size=2",
    "max_clicks=2",
    "steps=3",
    "warmup_steps=1",
    "val_every_steps=2",
    "checkpoint_every_steps=1",
    "threads=2",
    "click_disk_weight=1.0",  # the optional click-disk loss runs too
    "quantized_training=true",  # the fake-quant path here; test_float_training_checkpoints_an_int8_decoder: float
]


@pytest.fixture(scope="module")
def click_run(train_tree_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clicks") / "run"
    settings = ["--set", f"data_root={train_tree_dir}", f"out_dir={out}", *SMALL]
    assert main(["train", "--config", str(CONFIG), *settings, "max_steps=2"]) == 0  # stopped, as a killed run is
    assert main(["train", "--config", str(CONFIG), "--resume", str(out / "last.pt"), *settings]) == 0
    return out


def test_the_recipe_trains_validates_checkpoints_and_resumes(click_run: Path, train_tree_dir: Path):
    rows = [json.loads(line) for line in (click_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # resumed at step 2, not from the start
    validated = [r for r in rows if "val_dice_per_click" in r]
    assert [r["step"] for r in validated] == [0, 2, 3]
    for row in validated:
        assert len(row["val_dice_per_click"]) == 3 and all(0.0 <= d <= 1.0 for d in row["val_dice_per_click"])
        assert 0.0 <= row["val_curve_area"] <= 1.0
    assert all(np.isfinite(r["loss"]) for r in rows[1:])
    state = torch.load(click_run / "last.pt", weights_only=True)
    assert state["recipe"] == "clicks" and state["step"] == 3
    assert state["encoder_sha256"] == encoder_sha256(shipped_int8_model_dir())
    assert (click_run / "best.pt").is_file() and (click_run / "summary.json").is_file()
    cache = list((train_tree_dir / ".click-cache").glob("*.npy"))
    assert cache and all(np.load(p, mmap_mode="r").dtype == np.float16 for p in cache)


def test_resume_refuses_a_checkpoint_of_another_recipe(click_run: Path, tmp_path: Path, train_tree_dir: Path):
    weights = tmp_path / "weights.pt"
    torch.save({"model": {}}, weights)
    argv = ["train", "--config", str(CONFIG), "--resume", str(weights), "--set", f"data_root={train_tree_dir}"]
    assert main([*argv, f"out_dir={tmp_path / 'run'}", *SMALL]) == 2


def test_export_puts_the_click_decoder_beside_its_encoder(click_run: Path, small_cases_dir: Path, tmp_path: Path):
    from qmedsam import Segmenter
    from qmedsam.data.cases import read_case

    out = tmp_path / "model"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(click_run / "best.pt"),
                "--parity-cases",
                str(small_cases_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    shipped = shipped_int8_model_dir()
    for name in ("encoder.xml", "encoder.bin"):
        assert (out / name).read_bytes() == (shipped / name).read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["precision"] == "int8" and meta["source"]["recipe"] == "clicks"
    assert set(meta["inputs"]["decoder"]) == {"image_embedding", "boxes", "points", "point_labels"}
    parity = meta["parity_vs_torch"]["f32"]
    for key in ("decoder_teacher_forced", "decoder_with_clicks"):
        assert parity[key]["mask_dice_mean"] >= parity[key]["required"] >= 0.95
    coverage = meta["int8_coverage"]["decoder"]
    assert coverage["int8_fraction"] >= 0.9
    # the click map's mask-prompt convolutions stay float by design: listed apart, not counted against coverage
    assert coverage["float_prompt_encoder_layers"].get("Convolution:f32", 0) >= 3
    case = read_case(small_cases_dir / "2D_CT_TotalSeg_0001.npz")
    segmenter = Segmenter(out)
    segmenter.set_image(case.image)
    box = case.boxes[0]
    x0, y0, x1, y1 = box
    mask = segmenter.predict(box, points=[[(x0 + x1) / 2, (y0 + y1) / 2]], point_labels=[1])
    assert mask.shape == case.image.shape[:2] and segmenter.encoded_slices == 1


def test_export_refuses_an_encoder_the_decoder_was_not_trained_on(click_run: Path, small_cases_dir: Path, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(shipped_int8_model_dir(), other)
    with open(other / "encoder.bin", "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 1]))
    argv = ["export", "--checkpoint", str(click_run / "best.pt"), "--encoder-from", str(other)]
    assert main([*argv, "--parity-cases", str(small_cases_dir), "--out", str(tmp_path / "model")]) == 2
    assert not (tmp_path / "model").exists()


def test_float_training_checkpoints_an_int8_decoder(train_tree_dir: Path, tmp_path: Path):
    """quantized_training=false: the decoder trains in float; every checkpoint holds the int8 decoder calibrated
    from it (what export takes) beside the float weights (what resume takes), and the run ends with a validation
    of the int8 decoder."""
    from qmedsam.model.quant import is_quantized_state_dict

    out = tmp_path / "run"
    argv = ["train", "--config", str(CONFIG), "--set", f"data_root={train_tree_dir}", f"out_dir={out}", *SMALL]
    assert main([*argv, "quantized_training=false", "steps=1"]) == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert is_quantized_state_dict(state["model"]) and not is_quantized_state_dict(state["train_state"])
    int8 = json.loads((out / "summary.json").read_text())["int8_validation"]
    assert len(int8["val_dice_per_click"]) == 3 and 0.0 <= int8["val_curve_area"] <= 1.0
    # A new float run starts from this one's float weights: its step-0 validation is this run's last one.
    again = tmp_path / "again"
    settings = [f"out_dir={again}", f"init_checkpoint={out / 'last.pt'}", "quantized_training=false", "max_steps=0"]
    assert main([*argv, *settings]) == 0
    first = json.loads((again / "metrics.jsonl").read_text().splitlines()[0])
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert first["step"] == 0 and first["val_dice_per_click"] == last["val_dice_per_click"]


def test_the_click_disk_loss_weighs_only_the_pixels_near_each_click():
    """The dense click signal: a disk of radius r around every click (x, y), and a BCE averaged over those
    pixels alone, so a mask right near its clicks scores ~0 however wrong it is elsewhere."""
    from qmedsam.train.clicks import click_disks, disk_bce

    disks = click_disks([[(10.0, 20.0)], [(0.0, 0.0), (255.0, 255.0)], []], radius=2)
    assert disks.shape == (3, 256, 256)
    assert disks[0].sum() == 13 and disks[0, 20, 10] == 1 and disks[0, 20, 12] == 1 and disks[0, 21, 12] == 0
    assert disks[1, 0, 0] == disks[1, 255, 255] == 1 and disks[1].sum() == 2 * 6  # quarter disks at the corners
    assert disks[2].sum() == 0
    target = torch.zeros(3, 1, 256, 256)
    target[0, 0, 18:23, 8:13] = 1.0
    logits = torch.where(target > 0, 20.0, -20.0)
    logits[:, :, 100:, 100:] = -logits[:, :, 100:, 100:]  # wrong far from every click
    loss = disk_bce(logits, target, disks)
    assert loss[0] < 1e-6 and loss[2] == 0.0  # no clicks: no term
    assert disk_bce(-logits, target, disks)[0] > 10.0  # wrong at the click


def test_with_the_decoder_frozen_only_the_click_parts_train(train_tree_dir: Path, tmp_path: Path):
    """train_decoder=false: the mask decoder and the box path stay exactly the starting model's (a box alone
    gives the same mask), while the point embeddings and the click map's layers learn."""
    from qmedsam.model.litemedsam import load_pretrained_litemedsam

    out = tmp_path / "run"
    argv = ["train", "--config", str(CONFIG), "--set", f"data_root={train_tree_dir}", f"out_dir={out}", *SMALL]
    assert main([*argv, "quantized_training=false", "train_decoder=false", "max_clicks=3", "steps=2"]) == 0
    trained = torch.load(out / "last.pt", weights_only=True)["train_state"]
    start = load_pretrained_litemedsam().state_dict()
    changed = {name for name, value in start.items() if not torch.equal(value, trained[name])}
    assert changed and all(name.startswith("prompt_encoder.") for name in changed), sorted(changed)[:5]
    assert any("mask_downscaling" in name for name in changed)
    assert not any(
        name.startswith(("prompt_encoder.point_embeddings.2", "prompt_encoder.point_embeddings.3")) for name in changed
    )  # the box corners

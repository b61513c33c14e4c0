"""`qmedsam train` on the real training tree: config validation, the loss, DDP under torchrun, exact resume.

The runs are real (Brevitas fake-quant LiteMedSAM, the fp32 teacher, real slices) but a few steps long:
each stage of the chain under a 2-process gloo torchrun, and a single-process stage killed mid-epoch and
resumed. They run in subprocesses with one thread each, so the test process keeps its own settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qmedsam.cli import main as qmedsam_main
from qmedsam.train import memory
from qmedsam.train.config import ConfigError, TrainConfig, load_config
from qmedsam.train.loop import CHECKPOINT_FORMAT, TrainingError, load_resume_checkpoint, lr_factor
from qmedsam.train.losses import mask_iou, qmedsam_loss, segmentation_loss
from qmedsam.train.progress import read_metrics

REPO = Path(__file__).parent.parent
STAGES = REPO / "configs" / "train"
SMALL = ["batch_size=1", "num_workers=0", "threads=1", "calib_slices=2", "val_max_slices=1"]
"""Real runs kept short: one sample per step, two calibration slices, one validation slice per validation."""
SINGLE_PROCESS = [*SMALL[:2], "threads=2", *SMALL[3:]]
"""A single-process run uses both cores (a 2-rank torchrun gets one thread per rank)."""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _qmedsam(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qmedsam", *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO
    )


# --- config ---------------------------------------------------------------------------------------------


def test_stage_files_load_and_follow_the_seed_protocol():
    configs = {n: load_config(STAGES / f) for n, f in enumerate(sorted(p.name for p in STAGES.glob("stage*.yaml")), 1)}
    one, two, three = configs[1], configs[2], configs[3]
    assert (one.quantize_encoder, one.quantize_decoder, one.train_encoder, one.train_decoder, one.teacher) == (
        True, False, True, False, True,
    )  # fmt: skip
    assert (two.quantize_decoder, two.train_encoder, two.train_decoder, two.teacher) == (True, False, True, False)
    assert (three.train_encoder, three.train_decoder, three.teacher) == (True, True, True)
    assert not any(c.train_prompt_encoder for c in configs.values())
    assert (one.lr, one.momentum, one.warmup_epochs, one.cosine_epochs, one.extra_epochs) == (0.01, 0.9, 5, 10, 1)
    assert Path(one.data_root).is_absolute() and Path(one.quant_spec).is_file()
    overridden = load_config(STAGES / "stage1_quant_encoder.yaml", ["max_steps=5", "teacher=false", "out_dir=x"])
    assert overridden.max_steps == 5 and overridden.teacher is False
    # YAML 1.1 reads `1e-4` (no dot) as a string; a number field takes it as the number it spells.
    assert load_config(STAGES / "stage1_quant_encoder.yaml", ["lr=1e-4", "max_steps=2"]).lr == 1e-4
    assert overridden.out_dir == str(Path.cwd() / "x")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["bbox_shfit=5"], "unknown key(s) 'bbox_shfit' (did you mean 'bbox_shift'?)"),
        (["lr=fast"], "key 'lr' must be a number, got 'fast'"),
        (["sampler_strategy=Half"], "key 'sampler_strategy' must be one of ['Min', 'OneTenth', 'All'] or an integer"),
        (["max_steps"], "expected key=value"),
        (["train_encoder=false", "train_decoder=false"], "nothing to train"),
        (["reconstruct_encoder=true", "reconstruct_images=32"], "reconstruct_images (32) must be <= calib_slices"),
        (["reconstruct_steps=0"], "reconstruct_steps must be >= 1"),
        (["reconstruct_decoder=true"], "reconstruct_decoder needs quantize_decoder: true"),
        (["reconstruct_decoder_samples=0"], "reconstruct_decoder_samples must be >= 1"),
    ],
)
def test_bad_config_is_refused_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(STAGES / "stage1_quant_encoder.yaml", overrides)
    assert expected in str(info.value)


def test_cpu_recipe_is_calibration_plus_block_reconstruction():
    cpu = load_config(STAGES / "cpu_recipe.yaml")
    assert (cpu.quantize_encoder, cpu.quantize_decoder, cpu.reconstruct_encoder) == (True, True, True)
    assert (cpu.train_encoder, cpu.train_decoder, cpu.teacher, cpu.init_checkpoint) == (False, True, True, None)
    assert cpu.max_steps == 0 and cpu.reconstruct_images <= cpu.calib_slices


def test_decoder_distillation_recipe_continues_the_mixed_run():
    """The shipped model's second step: decoder distillation on top of runs/cpu-mixed/last.pt, nothing else."""
    distill = load_config(STAGES / "cpu_decoder_distill.yaml")
    assert distill.reconstruct_decoder and not distill.reconstruct_encoder and distill.max_steps == 0
    assert distill.init_checkpoint == str((STAGES / "../../runs/cpu-mixed/last.pt").resolve())
    assert Path(distill.quant_spec).name == "w8a8_mixed.yaml" and Path(distill.out_dir).name == "cpu-mixed-distilled"
    assert (distill.quantize_encoder, distill.quantize_decoder, distill.train_encoder) == (True, True, False)


def test_cpu_recipe_with_no_steps_writes_the_reconstructed_model(train_tree_dir: Path, tmp_path: Path):
    out = tmp_path / "cpu"
    sets = [f"data_root={train_tree_dir}", f"out_dir={out}", "max_steps=0", *SINGLE_PROCESS]
    sets += ["reconstruct_images=1", "reconstruct_steps=1", "reconstruct_batch_size=1"]
    sets += ["reconstruct_decoder=true", "reconstruct_decoder_samples=2", "reconstruct_decoder_steps=1"]
    result = _qmedsam("train", "--config", str(STAGES / "cpu_recipe.yaml"), "--set", *sets)
    assert result.returncode == 0, result.stderr[-3000:]
    init = torch.load(out / "init.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    report = init["init"]["reconstruction"]
    assert report["units"] == 17 and report["images"] == 1 and report["steps_per_unit"] == 1
    assert report["relative_error_after"] < report["relative_error_before"]
    decoder = init["init"]["decoder_reconstruction"]
    assert (decoder["samples"], decoder["held_out"], decoder["steps"]) == (2, 0, 1)
    assert 0 < decoder["agreement_after"] <= 1
    assert last["run"]["step"] == 0 and init["model"].keys() == last["model"].keys()
    assert all(torch.equal(init["model"][k], last["model"][k]) for k in init["model"])


def test_a_missing_training_tree_is_named_before_any_work(tmp_path, capsys):
    missing = tmp_path / "no-tree"
    code = qmedsam_main(
        ["train", "--config", str(STAGES / "stage2_quant_decoder.yaml"), "--set", f"data_root={missing}"]
    )
    assert code == 2
    assert f"data_root {missing}: no such folder" in capsys.readouterr().err


def test_cli_names_a_misspelt_key(tmp_path):
    bad = tmp_path / "stage.yaml"
    bad.write_text((STAGES / "stage2_quant_decoder.yaml").read_text() + "warmup_epoch: 3\n")
    result = _qmedsam("train", "--config", str(bad), timeout=120)
    assert result.returncode == 2
    assert f"{bad}: unknown key(s) 'warmup_epoch' (did you mean 'warmup_epochs'?)" in result.stderr


def test_lr_schedule_is_the_seeds():
    config = TrainConfig()
    factors = [lr_factor(e, config) for e in range(config.epochs)]
    assert len(factors) == 16 and factors[0] == pytest.approx(0.01) and factors[5] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(factors[5:15], factors[6:15], strict=False))
    assert factors[15] == pytest.approx(0.001)


# --- refused before anything is built -------------------------------------------------------------------


def _train_in_process(
    tmp_path: Path, capsys, *extra: str, config: str = "stage2_quant_decoder.yaml"
) -> tuple[int, str]:
    """`qmedsam train` in this process on a data_root that does not exist: a refusal must come before the
    dataset (or anything else) is built, and out_dir must not be created."""
    out = tmp_path / "run"
    sets = [f"data_root={tmp_path / 'no-tree'}", f"out_dir={out}", "device=cpu", "batch_size=1", "num_workers=0"]
    code = qmedsam_main(["train", "--config", str(STAGES / config), "--set", *sets, *extra])
    assert not out.exists()
    return code, capsys.readouterr().err


def test_resume_refuses_a_stages_starting_model(tmp_path: Path, capsys):
    init = tmp_path / "runs" / "x" / "init.pt"
    init.parent.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "model": {"w": torch.zeros(2)}, "init": {"init": "pretrained"}}, init)
    code, err = _train_in_process(tmp_path, capsys, "--resume", str(init))
    assert code == 2 and "Traceback" not in err
    assert (
        f"{init} is a stage's starting model (init.pt), not a run checkpoint: there is no {init.parent / 'last.pt'}"
        in err
    )
    assert f"or start a new run from these weights with --set init_checkpoint={init}" in err
    torch.save({"format": CHECKPOINT_FORMAT}, init.parent / "last.pt")  # the run got as far as a checkpoint
    code, err = _train_in_process(tmp_path, capsys, "--resume", str(init))
    assert code == 2 and f"not a run checkpoint: resume from {init.parent / 'last.pt'}, or start a new run" in err


@pytest.mark.parametrize("wrapped", [False, True], ids=["state-dict", "model-key"])
def test_resume_refuses_a_weights_file_naming_init_checkpoint(tmp_path: Path, capsys, wrapped: bool):
    weights = tmp_path / "weights.pth"
    state = {"image_encoder.w": torch.zeros(2), "mask_decoder.b": torch.ones(1)}
    torch.save({"model": state} if wrapped else state, weights)
    code, err = _train_in_process(tmp_path, capsys, "--resume", str(weights))
    assert code == 2 and "Traceback" not in err
    assert f"{weights} holds model weights (a state dict), not a run checkpoint" in err
    assert f"--set init_checkpoint={weights}" in err


def test_resume_accepts_a_run_checkpoint_and_names_what_else_is_missing(tmp_path: Path):
    run = {"epoch": 0, "batch_in_epoch": 1, "step": 1, "best_dsc": -1.0}
    last = tmp_path / "last.pt"
    payload = {"format": CHECKPOINT_FORMAT, "model": {}, "optimizer": {}, "scheduler": {}, "run": run, "config": {}}
    torch.save(payload | {"rng": {"torch": torch.get_rng_state()}}, last)
    assert load_resume_checkpoint(last)["run"] == run
    torch.save(payload, last)
    with pytest.raises(TrainingError, match=r"without the run state --resume needs \(missing \['rng'\]\)"):
        load_resume_checkpoint(last)
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="not a readable checkpoint"):
        load_resume_checkpoint(last)


def test_memory_estimate_grows_with_batch_teacher_and_trained_encoder():
    decoder = TrainConfig(train_encoder=False, train_decoder=True, teacher=False, batch_size=1, num_workers=0)
    peak = lambda **changes: memory.estimate(dataclasses.replace(decoder, **changes)).peak  # noqa: E731
    assert peak() < peak(batch_size=2) < peak(batch_size=4)
    assert peak() < peak(teacher=True) < peak(teacher=True, train_encoder=True)
    assert peak(batch_size=4) - peak(batch_size=2) < peak(train_encoder=True, batch_size=4) - peak(
        train_encoder=True, batch_size=2
    )  # a trained encoder's activations cost more per sample than the decoder's
    assert peak() < peak(num_workers=2)
    assert memory.estimate(dataclasses.replace(decoder, max_steps=0, batch_size=64)).peak == peak(max_steps=0)


def test_memory_refusal_names_the_batch_size_that_fits():
    stage1 = load_config(STAGES / "stage1_quant_encoder.yaml", ["batch_size=4", "num_workers=0"])
    one_rank = memory.estimate(dataclasses.replace(stage1, batch_size=1)).peak
    available = memory.Available(3 * one_rank, "test")
    assert memory.refusal_message(dataclasses.replace(stage1, batch_size=1), 3, available) is None
    message = memory.refusal_message(stage1, 2, available)
    largest = int(message.split("--set batch_size=")[1].split()[0])
    fits = [
        memory.estimate(dataclasses.replace(stage1, batch_size=b)).peak * 2 <= available.bytes for b in (1, 2, 3, 4)
    ]
    assert largest >= 1 and fits[:largest] == [True] * largest and not fits[largest]
    assert "x 2 processes on this node" in message and "QMEDSAM_SKIP_MEMORY_CHECK=1" in message
    refused = memory.refusal_message(dataclasses.replace(stage1, batch_size=1), 8, available)
    assert "torchrun --nproc-per-node 3" in refused and "--set batch_size" not in refused  # batch 1 is too much


def test_available_memory_is_the_lower_of_meminfo_and_the_cgroup(tmp_path: Path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683568 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert memory.available_memory(meminfo, cgroup) == memory.Available(20000000 * 1024, f"MemAvailable in {meminfo}")
    (cgroup / "memory.max").write_text("max\n")  # cgroup v2 without a limit
    (cgroup / "memory.current").write_text("1000\n")
    assert memory.available_memory(meminfo, cgroup).bytes == 20000000 * 1024
    (cgroup / "memory.max").write_text(f"{8 * memory.GIB}\n")
    (cgroup / "memory.current").write_text(f"{3 * memory.GIB}\n")
    (cgroup / "memory.stat").write_text(f"anon 1\ninactive_file {memory.GIB}\n")
    assert memory.available_memory(meminfo, cgroup).bytes == 6 * memory.GIB
    assert memory.available_memory(tmp_path / "absent", tmp_path / "absent") is None


def test_a_run_that_cannot_fit_is_refused_before_any_work(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    started = time.monotonic()
    code, err = _train_in_process(tmp_path, capsys, "batch_size=10000", config="stage1_quant_encoder.yaml")
    assert code == 2 and "Traceback" not in err
    assert "not enough memory for this run" in err and "batch_size 10000" in err and "--set batch_size=" in err
    assert f"{memory.SKIP_ENV}=1" in err
    assert time.monotonic() - started < 60


def test_the_memory_check_can_be_skipped(monkeypatch):
    huge = TrainConfig(batch_size=10000)
    monkeypatch.delenv(memory.SKIP_ENV, raising=False)
    assert memory.available_memory() is None or memory.refusal(huge) is not None
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert memory.refusal(huge) is None


# --- loss -----------------------------------------------------------------------------------------------


def test_loss_is_the_seeds_per_sample_with_per_sample_distillation():
    from monai.losses import DiceLoss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 32, 32, generator=gen)
    masks = (torch.rand(3, 1, 32, 32, generator=gen) > 0.6).to(torch.uint8)
    seed_batch = DiceLoss(sigmoid=True, squared_pred=True)(logits, masks.float())
    seed_batch = seed_batch + torch.nn.BCEWithLogitsLoss()(logits, masks.float())
    assert segmentation_loss(logits, masks).mean().item() == pytest.approx(seed_batch.item(), rel=1e-6)

    labelled = torch.tensor([True, True, False])
    student, teacher = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    teacher_logits = torch.randn(3, 1, 32, 32, generator=gen)
    parts = qmedsam_loss(logits, masks, labelled, student, teacher, teacher_logits)
    iou = mask_iou(teacher_logits > 0, masks)
    mse = (student - teacher).pow(2).mean(1)
    assert torch.allclose(parts.distillation[:2], iou[:2] * mse[:2])  # weighted by each sample's own IoU
    assert parts.distillation[2] == pytest.approx(mse[2].item())  # unlabelled: the teacher is the target
    unlabelled_target = segmentation_loss(logits[2:], (teacher_logits[2:] > 0).to(torch.uint8))
    assert parts.segmentation[2] == pytest.approx(unlabelled_target.item())
    no_teacher = qmedsam_loss(logits, masks, labelled)
    assert no_teacher.total.item() == pytest.approx(segmentation_loss(logits[:2], masks[:2]).mean().item())


# --- real runs ------------------------------------------------------------------------------------------


def _torchrun(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qmedsam"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)


def _check_chain(out: Path, result: subprocess.CompletedProcess, stages: dict[int, list[str]], first_init) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    for stage, calibrated in stages.items():
        folder = out / f"stage{stage}"
        init = torch.load(folder / "init.pt", map_location="cpu", weights_only=True)["init"]
        assert init["calibrated_parts"] == calibrated, init
        if stage - 1 in stages:
            assert init["init"] == str(out / f"stage{stage - 1}" / "last.pt")
        else:
            assert first_init(init["init"]), init
        steps, _ = read_metrics(folder / "metrics.jsonl")
        assert sorted(steps) == [1] and np.isfinite(steps[1]["loss"])
        sync = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][-1]
        assert sync["type"] == "sync" and len(sync["rank_digests"]) == 2
        assert len(set(sync["rank_digests"])) == 1  # both ranks hold identical parameters after the step
        checkpoint = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
        assert checkpoint["run"]["step"] == 1 and checkpoint["sampler"]["world_size"] == 2
    # The chain's output exports directly (stage 3 quantizes encoder and decoder, the default spec).
    assert "stage 3: best checkpoint" in result.stdout


def test_stages_under_torchrun_keep_ranks_in_sync(train_tree_dir: Path, tmp_path: Path):
    """Stages 2 -> 3 for one step each on two gloo ranks: decoder QAT from the pretrained weights (both parts
    calibrated), then both parts trained with the teacher from stage 2's checkpoint. (Stage 1's encoder QAT is
    stage 3's training path with the decoder frozen; the whole 1 -> 2 -> 3 chain runs in `make test-slow`.)"""
    out = tmp_path / "chain"
    sets = [f"data_root={train_tree_dir}", f"out_dir={out}", "max_steps=1", "init_checkpoint=null", *SMALL]
    result = _torchrun("train", "--stages", "2,3", "--set", *sets)
    _check_chain(out, result, {2: ["image_encoder", "mask_decoder"], 3: []}, lambda init: init.endswith(".pth"))


@pytest.mark.slow
def test_three_stages_under_torchrun_keep_ranks_in_sync(train_tree_dir: Path, tmp_path: Path):
    """The chain 1 -> 2 -> 3 for one step each on two gloo ranks; every stage starts from the previous one."""
    out = tmp_path / "chain"
    sets = [f"data_root={train_tree_dir}", f"out_dir={out}", "max_steps=1", *SMALL]
    result = _torchrun("train", "--stages", "1,2,3", "--set", *sets)
    _check_chain(out, result, {1: ["image_encoder"], 2: ["mask_decoder"], 3: []}, lambda init: init.endswith(".pth"))


def test_killed_run_resumes_on_the_uninterrupted_trajectory(train_tree_dir: Path, tmp_path: Path):
    """Stage 2 (decoder QAT, 2 epochs of 2 steps, validated each epoch): run straight through, then run again
    from the straight run's starting model (its init.pt: the same start without calibrating again), SIGKILL it
    after its step-2 checkpoint (mid-epoch or at the epoch end), resume, and compare."""
    sets = [
        f"data_root={train_tree_dir}",
        "init_checkpoint=null",
        "sampler_strategy=2",
        "warmup_epochs=1",
        "cosine_epochs=1",
        "extra_epochs=0",
        "checkpoint_every_steps=1",
        *SINGLE_PROCESS,
    ]
    config = str(STAGES / "stage2_quant_decoder.yaml")
    straight = tmp_path / "straight"
    result = _qmedsam("train", "--config", config, "--set", *sets, f"out_dir={straight}")
    assert result.returncode == 0, result.stderr[-4000:]
    reference_steps, reference_epochs = read_metrics(straight / "metrics.jsonl")
    assert sorted(reference_steps) == [1, 2, 3, 4] and len(reference_epochs) == 2
    assert all(0.0 <= e["dsc"] <= 1.0 for e in reference_epochs) and (straight / "best.pt").is_file()

    killed = tmp_path / "killed"
    sets[1] = f"init_checkpoint={straight / 'init.pt'}"
    cmd = [sys.executable, "-m", "qmedsam", "train", "--config", config, "--set", *sets, f"out_dir={killed}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            last = killed / "last.pt"
            if last.is_file() and torch.load(last, map_location="cpu", weights_only=True)["run"]["step"] >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    stopped_at = torch.load(killed / "last.pt", map_location="cpu", weights_only=True)["run"]
    assert 2 <= stopped_at["step"] < 4
    result = _qmedsam("train", "--config", config, "--set", *sets, f"out_dir={killed}", "--resume", str(last))
    assert result.returncode == 0, result.stderr[-4000:]
    steps, epochs = read_metrics(killed / "metrics.jsonl")
    assert sorted(steps) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert steps[step]["loss"] == pytest.approx(reference_steps[step]["loss"], rel=1e-5, abs=1e-7), step
        assert steps[step]["lr"] == pytest.approx(reference_steps[step]["lr"])
    assert [round(e["dsc"], 6) for e in epochs[-2:]] == [round(e["dsc"], 6) for e in reference_epochs]

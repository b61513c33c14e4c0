"""One training stage as data: `configs/train/*.yaml` (flat keys) + `--set key=value`, validated.

Every value the QMedSAM seed hard-coded in its training script is a key here, with the seed's value as
the stage files' default; nothing is edited in source to run a stage. Unknown or misspelt keys are
refused with the closest known name; wrong types name the key and what was expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qmedsam.errors import UserFacingError
from qmedsam.typed_config import from_mapping, read_yaml_mapping

SamplerStrategy = Literal["Min", "OneTenth", "All"]


class ConfigError(UserFacingError):
    """A training config with an unknown, missing or wrong-typed key."""


@dataclass(frozen=True)
class TrainConfig:
    """Keys of one stage. Paths are resolved against the config file's folder when relative."""

    quant_spec: str | None = None
    """QuantSpec YAML (null: QuantSpec's defaults, = configs/quant/w8a8_per_channel.yaml);
    `quantize_encoder` / `quantize_decoder` switch its parts on or off."""
    quantize_encoder: bool = True
    quantize_decoder: bool = False
    train_encoder: bool = True
    train_decoder: bool = False
    train_prompt_encoder: bool = False
    """The seed kept the prompt encoder frozen in every stage."""
    init_checkpoint: str | None = None
    """Weights to start from: null = the pretrained fp32 LiteMedSAM (calibrated on `calib_slices`
    training slices when a part is quantized); else a qmedsam checkpoint or state dict (a previous stage)."""
    calib_slices: int = 16
    reconstruct_encoder: bool = False
    """After calibrating a newly quantized encoder, train it block by block to reproduce the float encoder
    on cached block inputs (`qmedsam.train.reconstruct`): the CPU recipe's warm start. The images are
    `reconstruct_images` of the calibration slices."""
    reconstruct_images: int = 8
    reconstruct_steps: int = 40
    """Adam steps per encoder unit (17 units)."""
    reconstruct_batch_size: int = 2
    reconstruct_lr: float = 1e-5
    """Learning rate of weights, biases and norms (cosine-decayed per unit)."""
    reconstruct_scale_lr: float = 1e-4
    """Learning rate of the calibrated activation scales."""
    reconstruct_decoder: bool = False
    """With a quantized decoder: distil it from the float model on cached embeddings after the encoder is
    settled (`qmedsam.train.reconstruct.reconstruct_decoder`): student = quantized encoder + decoder, target
    = the float model's mask logits, so the decoder absorbs the int8 encoder's error too. Runs also when
    `init_checkpoint` is an already quantized (e.g. encoder-reconstructed) model. Same learning rates as
    the encoder reconstruction."""
    reconstruct_decoder_samples: int = 96
    """(slice, box) samples drawn from the training split (every 8th held out to report generalisation)."""
    reconstruct_decoder_steps: int = 300
    reconstruct_decoder_batch_size: int = 8
    teacher: bool = True
    """Distillation from the fp32 LiteMedSAM: IoU(teacher mask, GT) x MSE(student, teacher embedding) per
    sample; unlabelled samples train on the teacher's mask and embedding alone."""
    distill_weight: float = 1.0
    teacher_cache: str | None = None
    """Folder for the teacher's fp16 image embeddings per slice and flip (default: <data_root>/.teacher-cache)."""
    data_root: str = "data/train"
    train_split: str = "train"
    val_split: str = "validation"
    sampler_strategy: SamplerStrategy | int = "OneTenth"
    image_size: int = 256
    bbox_shift: int = 10
    augment: bool = True
    batch_size: int = 4
    num_workers: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: int = 5
    warmup_start_factor: float = 0.01
    cosine_epochs: int = 10
    extra_epochs: int = 1
    """The seed ran warmup + cosine + 1 epochs (the last at the final learning rate)."""
    min_lr_factor: float = 0.001
    seed: int = 0
    out_dir: str = "runs/stage1"
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (smoke tests); the run still checkpoints. 0: no step at all,
    last.pt is the starting model (calibrated, and reconstructed with `reconstruct_encoder`)."""
    checkpoint_every_steps: int = 50
    """Also checkpoint mid-epoch every this many steps, so a killed run resumes close to where it stopped."""
    val_every_epochs: int = 1
    val_max_slices: int | None = 64
    """Validation scores at most this many labelled slices (spread over the split's volumes; null = all)."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N; under torchrun each rank uses its LOCAL_RANK GPU."""
    threads: int | None = None
    """torch intra-op threads per process (null: torch's default)."""

    def __post_init__(self) -> None:
        if not (self.train_encoder or self.train_decoder or self.train_prompt_encoder):
            raise ConfigError("nothing to train: set train_encoder, train_decoder or train_prompt_encoder")
        positive = (
            "batch_size",
            "image_size",
            "calib_slices",
            "checkpoint_every_steps",
            "reconstruct_images",
            "reconstruct_steps",
            "reconstruct_batch_size",
            "reconstruct_decoder_samples",
            "reconstruct_decoder_steps",
            "reconstruct_decoder_batch_size",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "warmup_epochs", "cosine_epochs", "extra_epochs", "bbox_shift", "seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.warmup_epochs + self.cosine_epochs + self.extra_epochs < 1:
            raise ConfigError("warmup_epochs + cosine_epochs + extra_epochs must be at least 1")
        if self.lr <= 0 or not 0 < self.warmup_start_factor <= 1 or not 0 < self.min_lr_factor <= 1:
            raise ConfigError("lr must be > 0 and warmup_start_factor, min_lr_factor in (0, 1]")
        if self.reconstruct_lr <= 0 or self.reconstruct_scale_lr < 0:
            raise ConfigError("reconstruct_lr must be > 0 and reconstruct_scale_lr >= 0")
        if self.reconstruct_encoder and self.reconstruct_images > self.calib_slices:
            raise ConfigError(
                f"reconstruct_images ({self.reconstruct_images}) must be <= calib_slices ({self.calib_slices}): "
                "the reconstruction images are calibration slices"
            )
        if self.reconstruct_decoder and not self.quantize_decoder:
            raise ConfigError("reconstruct_decoder needs quantize_decoder: true (there is no quantized decoder)")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 or null, got {self.max_steps}")
        if isinstance(self.sampler_strategy, int) and self.sampler_strategy < 1:
            raise ConfigError(f"sampler_strategy must be Min, OneTenth, All or >= 1, not {self.sampler_strategy}")

    @property
    def epochs(self) -> int:
        return self.warmup_epochs + self.cosine_epochs + self.extra_epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPE = "clicks"


@dataclass(frozen=True)
class ClickConfig:
    """Keys of the click recipe (`configs/train/clicks.yaml`). Paths are resolved against the config file's folder."""

    recipe: Literal["clicks"] = RECIPE
    data_root: str = "data/train"
    train_split: str = "train"
    val_split: str = "validation"
    encoder_model: str | None = None
    """Model folder whose int8 encoder makes the embeddings the decoder learns on, and which the exported model
    keeps (null: the shipped int8 model)."""
    quant_spec: str | None = None
    """QuantSpec YAML for the decoder (its mask_decoder part; null: the spec recorded in the encoder model's
    meta.json, which the shipped decoder was quantized with)."""
    init_checkpoint: str | None = None
    """Weights to start from (null: the pretrained LiteMedSAM; else a float state dict or a click run's
    checkpoint, whose calibrated quantizers are kept)."""
    quantized_training: bool = False
    """False (the shipped model's run): the decoder trains in float (about 2x faster a step on a CPU) and is
    calibrated to int8 on the training views for every checkpoint (what export takes); validation during the
    run scores the float decoder, a last one the int8 decoder. True: the int8 (fake-quant) decoder trains, as
    it will run."""
    train_decoder: bool = True
    """False: the mask decoder stays frozen and only the prompt encoder's click parts train (point embeddings,
    the click map's layers), so a box alone gives exactly the starting model's mask (the box path uses none of
    them); no box-only loss is needed."""
    slice_stride: int = 2
    """Every this-many-th labelled slice of a volume (neighbours are near copies)."""
    views_per_slice: int = 2
    """The unflipped slice and this many minus one random flips of it."""
    max_clicks: int = 5
    centre_probability: float = 0.5
    """A training click is the protocol's (centre of the largest error) with this probability, else a point of
    that error drawn nearer its border."""
    bbox_shift: int = 10
    """Each side of a training box is widened by a random 0..bbox_shift px in the 256² frame."""
    teacher_weight: float = 1.0
    """Weight of the box-only step's soft-label BCE against the float teacher's mask."""
    box_gt_weight: float = 0.0
    """Weight of the box-only step's Dice + BCE against the ground truth (0: boxes learn from the teacher only,
    which is what keeps box-only masks where the shipped model has them)."""
    click_disk_weight: float = 0.0
    """Weight of a click step's extra BCE against the ground truth on the pixels within `click_disk_radius` of
    its clicks (averaged over those pixels), a dense signal that the clicked area follows its click. Off by
    default: it teaches the clicked pixel (right after one click on 83% of validation objects at step 200 with
    weight 3, radius 4, point_lr 1e-3; 18% without it), but exclude clicks learn to erase the small objects
    they touch, and Dice per click fell (benchmarks/README.md, "Clicks")."""
    click_disk_radius: int = 4
    """Radius in pixels of the 256² frame of the disk around each click that `click_disk_weight` weighs."""
    batch_size: int = 8
    steps: int = 1500
    lr: float = 1.0e-4
    """Adam learning rate of the decoder's weights (warm-up, then cosine)."""
    point_lr: float = 1.0e-3
    """Learning rate of the prompt encoder's click parameters, on the same schedule: the point embeddings
    (include, exclude, padding: three 256-vectors the box-trained model never used) and the mask-prompt layers
    that embed the click map (SAM's, trained on mask logits, never on clicks)."""
    scale_lr: float = 1.0e-4
    """Learning rate of the decoder's learned activation scales."""
    warmup_steps: int = 50
    calib_views: int = 32
    val_max_views: int = 48
    val_max_objects: int = 128
    """Validation scores at most this many objects of those views (spread evenly): box + max_clicks decoder
    passes each."""
    val_every_steps: int = 100
    checkpoint_every_steps: int = 100
    max_steps: int | None = None
    """Stop after this many steps (smoke tests); the run still checkpoints and validates."""
    seed: int = 0
    threads: int | None = None
    out_dir: str = "runs/clicks"

    def __post_init__(self) -> None:
        positive = (
            "slice_stride",
            "views_per_slice",
            "batch_size",
            "steps",
            "calib_views",
            "val_max_views",
            "val_max_objects",
        )
        for key in (*positive, "val_every_steps", "checkpoint_every_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 1 <= self.views_per_slice <= 4:
            raise ConfigError(f"views_per_slice must be 1..4 (unflipped + up to 3 flips), got {self.views_per_slice}")
        if not 0 <= self.max_clicks <= 20:
            raise ConfigError(f"max_clicks must be 0..20, got {self.max_clicks}")
        if not 0.0 <= self.centre_probability <= 1.0:
            raise ConfigError(f"centre_probability must be in [0, 1], got {self.centre_probability}")
        if self.lr <= 0 or self.point_lr <= 0:
            raise ConfigError(f"lr and point_lr must be > 0, got {self.lr} and {self.point_lr}")
        if min(self.scale_lr, self.teacher_weight, self.box_gt_weight, self.click_disk_weight) < 0:
            raise ConfigError("scale_lr, teacher_weight, box_gt_weight and click_disk_weight must be >= 0")
        if self.click_disk_radius < 0:
            raise ConfigError(f"click_disk_radius must be >= 0, got {self.click_disk_radius}")
        if self.teacher_weight == 0 and self.box_gt_weight == 0:
            raise ConfigError("teacher_weight and box_gt_weight are both 0: the box-only step would learn nothing")
        for key in ("bbox_shift", "warmup_steps", "seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 or null, got {self.max_steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CLICK_PATH_KEYS = ("data_root", "encoder_model", "quant_spec", "init_checkpoint", "out_dir")


PATH_KEYS = ("quant_spec", "init_checkpoint", "teacher_cache", "data_root", "out_dir", "encoder_model")


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML scalars (`max_steps=5` is an int, `teacher=false` a bool)."""
    import yaml

    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not a YAML scalar ({exc})") from None
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None):
    """The stage file (if any) with `--set` overrides applied; relative paths made absolute. A file with
    `recipe: clicks` is the click recipe's (`qmedsam.train.config.ClickConfig`), any other a QAT stage's
    (`TrainConfig`).

    Paths in the file are relative to the file's folder; paths given with `--set` to the working folder.
    """

    data: dict[str, Any] = {}
    base = Path.cwd()
    source = "--set"
    if path is not None:
        path = Path(path)
        data = read_yaml_mapping(path, "training config", ConfigError)
        base = path.resolve().parent
        source = str(path)
        data = {k: _resolve(k, v, base) for k, v in data.items()}
    sets = parse_set(overrides)
    data.update({k: _resolve(k, v, Path.cwd()) for k, v in sets.items()})
    kind = ClickConfig if data.get("recipe") == "clicks" else TrainConfig
    return from_mapping(kind, data, source + (" with --set" if sets and path else ""), ConfigError)


def _resolve(key: str, value: Any, base: Path) -> Any:
    if key in PATH_KEYS and isinstance(value, str):
        candidate = Path(value).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())
    return value

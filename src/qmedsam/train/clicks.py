"""Teach the decoder clicks, on a CPU: simulated interaction on cached embeddings of the model's own int8 encoder.

LiteMedSAM was trained with boxes only, so clicks make its masks worse. This recipe trains what must learn
(the int8 mask decoder with its activation scales, and the prompt encoder's click parts: the point embeddings
and the mask-prompt layers that embed the click map, `PromptEncoder.click_map`) while the
encoder stays the shipped one: every training view is encoded once by that encoder (exactly as int8 CPUs run
it) and by the float teacher, cached (`qmedsam.train.click_data`), so a step costs decoder passes only.

A sample is one object on one view (a slice of a labelled training file, maybe flipped) with a jittered box.
Its interaction: the box alone, then up to K corrective clicks (K drawn per sample, 0..`max_clicks`), each
placed on the largest error of the current mask (`qmedsam.evaluate.interaction.sample_click`: the protocol's
centre point or, as real users do, nearer the border), every click so far given with the box; the current mask
after a click is the one inference shows (the decoder's new mask taken only around the click,
`qmedsam.inference.click_reach.local_edit`), so clicks land where they would in use. The loss is
taken at every step: the box-only step learns the float teacher's mask (soft-label BCE, as the shipped
decoder was distilled, so boxes alone lose nothing), the click steps learn the ground truth (Dice + BCE;
with `click_disk_weight` also a BCE on disks around the clicks, a dense signal that the clicked area follows
its click).
Validation runs the protocol's deterministic rule (`next_click`) on the validation split: Dice per click.

`qmedsam train --config configs/train/clicks.yaml` runs it; `qmedsam export --checkpoint OUT/best.pt` turns
the result into a model folder (the encoder copied from `encoder_model`, the decoder exported and checked).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qmedsam.data.preprocess import mask_box
from qmedsam.errors import UserFacingError
from qmedsam.evaluate.interaction import next_click, sample_click
from qmedsam.evaluate.metrics import mask_dice
from qmedsam.export.int8_parity import ir_to_check
from qmedsam.files import atomic_write_bytes, sha256_file
from qmedsam.inference.click_reach import local_edit
from qmedsam.inference.model_dir import encoder_sha256, is_model_dir, read_model_meta, shipped_int8_model_dir
from qmedsam.inference.ov_core import shared_core
from qmedsam.inference.runtime import OpenVINOEngine
from qmedsam.model.litemedsam import load_pretrained_litemedsam
from qmedsam.model.weights import pretrained_weights_path
from qmedsam.train.click_data import Encode, ViewSet, build_views
from qmedsam.train.config import RECIPE, ClickConfig, ConfigError
from qmedsam.train.loop import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    check_data_root,
    load_checkpoint,
    load_student,
    read_torch_file,
)
from qmedsam.train.losses import segmentation_loss

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The encoders whose embeddings are cached


def exact_int8_encoder(model_dir: Path, scratch: Path):
    """Encode as CPUs with exact int8 dot products (VNNI / AMX) run this folder's encoder: the IR itself there,
    its FakeQuantize-in-f32 copy elsewhere (so the cache does not depend on the training machine's CPU)."""

    engine = OpenVINOEngine(ir_to_check(model_dir, scratch), precision="f32")
    return engine.encode


def built_on_first_call(build: Callable[[], Encode]) -> Encode:
    """An encoder made only if a view is not in the cache yet: a resumed run (every view cached) skips the
    teacher's conversion to OpenVINO (8.5 s on an AVX-512 EPYC) and the int8 encoder's compilation."""
    made = functools.cache(build)
    return lambda image: made()(image)


def float_teacher_encoder(model: nn.Module):
    """The float teacher's encoder, converted to OpenVINO f32 in memory (several times faster than PyTorch eager
    on a CPU; the fp32 export's parity with PyTorch is >= 0.995 mask Dice)."""
    import openvino as ov

    with torch.no_grad():
        converted = ov.convert_model(
            model.image_encoder, example_input=torch.zeros(1, 3, 256, 256), input=[[1, 3, 256, 256]]
        )
    compiled = shared_core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def encode(image: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: np.ascontiguousarray(image, np.float32)})[0])

    return encode


# --------------------------------------------------------------------------------------------------
# The student


def decoder_spec(config: ClickConfig, encoder_dir: Path):
    """The quant spec with only the decoder quantized (the encoder is the IR's, never run in PyTorch here): the
    `quant_spec` file if given, else the spec recorded in the encoder model's meta.json (the shipped model's
    decoder was quantized with it), else QuantSpec's defaults. Returns (spec, where it came from)."""
    from qmedsam.model.quant import QuantSpec

    if config.quant_spec is not None:
        spec, origin = QuantSpec.from_yaml(config.quant_spec), config.quant_spec
    else:
        recorded = read_model_meta(encoder_dir).get("quantization", {}).get("spec")
        origin = f"{encoder_dir}/meta.json" if isinstance(recorded, dict) else "QuantSpec defaults"
        spec = QuantSpec.from_dict(recorded, origin) if isinstance(recorded, dict) else QuantSpec()
    if not spec.mask_decoder:
        raise ConfigError(f"{origin}: mask_decoder is false; the click recipe trains an int8 decoder")
    decoder_float_layers = tuple(name for name in spec.float_layers if name.startswith("mask_decoder."))
    return (
        dataclasses.replace(spec, image_encoder=False, mask_decoder=True, float_layers=decoder_float_layers),
        origin,
    )


@dataclass(frozen=True)
class Trainable:
    """What the recipe trains: the whole mask decoder (weights, learned activation scales) and the prompt
    encoder's click parameters (`points`: the point embeddings include, exclude, padding, and the mask-prompt
    layers that embed the click map); the box corner embeddings, the no-mask embedding and the encoder stay
    frozen, so a box alone is decoded from the same prompts as before."""

    weights: list[nn.Parameter]
    scales: list[nn.Parameter]
    points: list[nn.Parameter]


def trainable_parameters(model: nn.Module, train_decoder: bool = True) -> Trainable:
    """The click parts always; the mask decoder's weights and scales only with `train_decoder`."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    prompt = model.prompt_encoder
    points = [prompt.point_embeddings[0].weight, prompt.point_embeddings[1].weight, prompt.not_a_point_embed.weight]
    points += list(prompt.mask_downscaling.parameters())
    decoder = list(model.mask_decoder.named_parameters()) if train_decoder else []
    scales = [p for n, p in decoder if "quant" in n]
    scale_ids = {id(p) for p in scales}
    weights = [p for _, p in decoder if id(p) not in scale_ids]
    for parameter in weights + scales + points:
        parameter.requires_grad_(True)
    return Trainable(weights, scales, points)


# --------------------------------------------------------------------------------------------------
# One interaction


def _to_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _valid(mask: np.ndarray, resized: np.ndarray) -> np.ndarray:
    """The mask inside the image's part of the 256² frame (padding is never an error to click on)."""
    out = np.zeros_like(mask)
    out[: resized[0], : resized[1]] = mask[: resized[0], : resized[1]]
    return out


def boxes_around(truths: np.ndarray, resized: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """(B, 4) boxes of the ground-truth masks in the 256² frame, sides widened by `margins` (B, 4), clipped."""
    boxes = []
    for truth, (height, width), m in zip(truths, resized, margins, strict=True):
        x0, y0, x1, y1 = mask_box(truth).tolist()
        boxes.append([max(0, x0 - m[0]), max(0, y0 - m[1]), min(width - 1, x1 + m[2]), min(height - 1, y1 + m[3])])
    return np.array(boxes, np.float32)


def training_boxes(truths: np.ndarray, resized: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Boxes with each side widened by a random 0..shift px."""
    return boxes_around(truths, resized, rng.integers(0, shift + 1, size=(len(truths), 4)))


def click_disks(points: list[list[tuple[float, float]]], radius: int, size: int = 256) -> torch.Tensor:
    """(B, size, size) 1.0 within `radius` px of any of each object's clicks (x, y), else 0."""
    ys, xs = np.mgrid[0:size, 0:size]
    out = np.zeros((len(points), size, size), np.float32)
    for row, clicks in enumerate(points):
        for x, y in clicks:
            out[row] = np.maximum(out[row], (xs - x) ** 2 + (ys - y) ** 2 <= radius**2)
    return torch.from_numpy(out)


def disk_bce(logits: torch.Tensor, target: torch.Tensor, disks: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE of (B, 1, H, W) logits against the target, averaged over each sample's click disks."""
    loss = F.binary_cross_entropy_with_logits(logits[:, 0], target[:, 0], reduction="none")
    return (loss * disks).flatten(1).sum(dim=1) / disks.flatten(1).sum(dim=1).clamp(min=1.0)


def soft_bce(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample binary cross-entropy against the teacher's probabilities (every pixel counts)."""
    loss = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher_logits), reduction="none")
    return loss.flatten(1).mean(dim=1)


@dataclass
class Interaction:
    """Clicks so far of a batch of objects; objects drop out once their clicks are spent or nothing is left
    to correct."""

    points: list[list[tuple[float, float]]]
    labels: list[list[float]]
    budget: np.ndarray
    active: list[int]

    @classmethod
    def start(cls, budget: np.ndarray) -> Interaction:
        n = len(budget)
        return cls([[] for _ in range(n)], [[] for _ in range(n)], budget, list(range(n)))

    def add_clicks(self, step: int, predictions: np.ndarray, truths: np.ndarray, resized: np.ndarray, place) -> None:
        """One more click per active object (placed by `place(prediction, truth)`), for those with budget left."""
        still = []
        for row, i in enumerate(self.active):
            if self.budget[i] < step:
                continue
            click = place(_valid(predictions[row], resized[i]), truths[i])
            if click is None:
                continue
            y, x = click.position
            self.points[i].append((float(x), float(y)))
            self.labels[i].append(float(click.label))
            still.append(i)
        self.active = still

    def apply(self, masks: np.ndarray, decoded: np.ndarray, resized: np.ndarray) -> None:
        """Each active object's mask after its last click, as inference makes it: the decoder's new mask
        (`decoded`, one row per active object) taken only around the click (`local_edit`)."""
        for row, i in enumerate(self.active):
            x, y = self.points[i][-1]
            masks[i] = local_edit(masks[i], _valid(decoded[row], resized[i]), (int(y), int(x)), int(self.labels[i][-1]))

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.tensor([self.points[i] for i in self.active], dtype=torch.float32),
            torch.tensor([self.labels[i] for i in self.active], dtype=torch.float32),
        )


def interaction_loss(
    model: nn.Module,
    teacher: nn.Module,
    views: ViewSet,
    objects: np.ndarray,
    config: ClickConfig,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over every step of every object's simulated interaction (box, then its clicks)."""
    view_ids = objects[:, 0].tolist()
    truths = np.stack([views.labels[v] == label for v, label in objects])
    resized = views.resized[objects[:, 0]]
    boxes = _to_torch(training_boxes(truths, resized, config.bbox_shift, rng))
    embeddings = _to_torch(views.student(view_ids))
    target = _to_torch(truths[:, None].astype(np.float32))
    with torch.set_grad_enabled(config.train_decoder):  # frozen: the box's mask only places the first click
        logits = model.decode(embeddings, boxes)[0]
    box_loss = torch.zeros(len(objects))
    if config.train_decoder and config.teacher_weight:
        with torch.no_grad():
            teacher_logits = teacher.decode(_to_torch(views.teacher(view_ids)), boxes)[0]
        box_loss = box_loss + config.teacher_weight * soft_bce(logits, teacher_logits)
    if config.train_decoder and config.box_gt_weight:
        box_loss = box_loss + config.box_gt_weight * segmentation_loss(logits, target)
    losses = [box_loss.mean()] if config.train_decoder else []
    weights = [float(len(objects))] if config.train_decoder else []
    interaction = Interaction.start(rng.integers(0, config.max_clicks + 1, size=len(objects)))
    current = _valid_stack((logits.detach()[:, 0] > 0).numpy(), resized)

    def place(prediction, truth):
        return sample_click(prediction, truth, rng, config.centre_probability)

    for step in range(1, config.max_clicks + 1):
        interaction.add_clicks(step, current[interaction.active], truths, resized, place)
        active = interaction.active
        if not active:
            break
        points, labels = interaction.prompts()
        logits = model.decode(embeddings[active], boxes[active], False, points, labels)[0]
        interaction.apply(current, (logits.detach()[:, 0] > 0).numpy(), resized)
        click_loss = segmentation_loss(logits, target[active])
        if config.click_disk_weight:
            disks = click_disks([interaction.points[i] for i in active], config.click_disk_radius)
            click_loss = click_loss + config.click_disk_weight * disk_bce(logits, target[active], disks)
        losses.append(click_loss.mean())
        weights.append(float(len(active)))
    click_steps = weights[1:] if config.train_decoder else weights
    if not losses:  # no object got a click: a zero loss that still reaches the trainable parameters
        return 0.0 * sum(p.sum() for p in model.prompt_encoder.mask_downscaling.parameters()), {
            "box_loss": 0.0,
            "click_steps": 0.0,
        }
    total = sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)
    box_loss = float(losses[0].detach()) if config.train_decoder else 0.0
    return total, {"box_loss": box_loss, "click_steps": float(sum(click_steps))}


# --------------------------------------------------------------------------------------------------
# Validation: the protocol's rule


@torch.no_grad()
def dice_per_click(
    model: nn.Module, views: ViewSet, max_clicks: int, margin: int, max_objects: int | None = None, chunk: int = 16
) -> list[float]:
    """Mean Dice (256² frame) over the objects of `views` (at most `max_objects`, spread evenly) after the box and
    after each of `max_clicks` clicks placed by the protocol's rule; an object with nothing left to correct keeps
    its mask."""
    chosen = views.objects
    if max_objects is not None and max_objects < len(chosen):
        chosen = chosen[np.unique(np.linspace(0, len(chosen) - 1, max_objects).round().astype(int))]
    per_click = np.zeros((max_clicks + 1, len(chosen)))
    for start in range(0, len(chosen), chunk):
        objects = chosen[start : start + chunk]
        truths = np.stack([views.labels[v] == label for v, label in objects])
        resized = views.resized[objects[:, 0]]
        boxes_t = _to_torch(boxes_around(truths, resized, np.full((len(objects), 4), margin)))
        embeddings = _to_torch(views.student(objects[:, 0].tolist()))
        masks = _valid_stack((model.decode(embeddings, boxes_t)[0][:, 0] > 0).numpy(), resized)
        rows = slice(start, start + len(objects))
        per_click[0, rows] = [mask_dice(m, t) for m, t in zip(masks, truths, strict=True)]
        interaction = Interaction.start(np.full(len(objects), max_clicks))
        for step in range(1, max_clicks + 1):
            interaction.add_clicks(step, masks[interaction.active], truths, resized, next_click)
            if interaction.active:
                points, labels = interaction.prompts()
                active = interaction.active
                logits = model.decode(embeddings[active], boxes_t[active], False, points, labels)[0][:, 0]
                interaction.apply(masks, (logits > 0).numpy(), resized)
            per_click[step, rows] = [mask_dice(m, t) for m, t in zip(masks, truths, strict=True)]
    return per_click.mean(axis=1).tolist()


def _valid_stack(masks: np.ndarray, resized: np.ndarray) -> np.ndarray:
    return np.stack([_valid(m, r) for m, r in zip(masks, resized, strict=True)])


def curve_area(dice: list[float]) -> float:
    """Area under the Dice-per-click curve (trapezoid over clicks 0..K), divided by K: in [0, 1]."""
    if len(dice) < 2:
        return float(dice[0]) if dice else math.nan
    return float(np.trapezoid(dice) / (len(dice) - 1))


# --------------------------------------------------------------------------------------------------
# The run


def _calibrate_decoder(model: nn.Module, views: ViewSet, count: int, rng: np.random.Generator) -> dict[str, int]:
    """Activation scales of the decoder from `count` objects' boxes, alone and with two clicks (one inside the
    object, one outside it in the box), so the scales see click tokens too."""
    from qmedsam.model import quant

    picks = views.objects[np.linspace(0, len(views) - 1, min(count, len(views))).round().astype(int)]
    model.eval()
    with torch.no_grad(), quant.calibration_mode(model.mask_decoder):
        for start in range(0, len(picks), 8):
            objects = picks[start : start + 8]
            truths = np.stack([views.labels[v] == label for v, label in objects])
            boxes = _to_torch(training_boxes(truths, views.resized[objects[:, 0]], 0, rng))
            embeddings = _to_torch(views.student(objects[:, 0].tolist()))
            model.decode(embeddings, boxes)
            points, labels = [], []
            for truth, box in zip(truths, boxes.numpy(), strict=True):
                ys, xs = np.nonzero(truth)
                inside = int(rng.integers(len(xs)))
                x0, y0, x1, y1 = box.astype(int)
                outside = np.argwhere(~truth[y0 : y1 + 1, x0 : x1 + 1])
                oy, ox = (outside[int(rng.integers(len(outside)))] + (y0, x0)) if len(outside) else (y0, x0)
                points.append([[xs[inside], ys[inside]], [ox, oy]])
                labels.append([1.0, 0.0])
            model.decode(embeddings, boxes, False, torch.tensor(points, dtype=torch.float32), torch.tensor(labels))
    missing = quant.uncalibrated_quantizers(model.mask_decoder)
    if missing:
        raise RuntimeError(f"decoder activation quantizers saw no calibration data: {missing[:5]}")
    return {"calibration_objects": len(picks)}


def _learning_rate_factor(step: int, config: ClickConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def float_start(source: Path) -> nn.Module:
    """The float model a float run starts from: a float click run's weights (its `train_state`), else a float
    state dict (the pretrained LiteMedSAM's by default). A quantized click run holds no float weights to go on
    from in float."""
    state = read_torch_file(source)
    if isinstance(state, dict) and state.get("recipe") == RECIPE:
        if "train_state" not in state:
            raise UserFacingError(
                f"{source}: a click run trained with quantized_training: true; start from it with the same setting"
            )
        model = load_pretrained_litemedsam()
        model.load_state_dict(state["train_state"])
        return model.eval()
    return load_pretrained_litemedsam(source)


class ClickTrainer:
    """One click-training run: cached views, the student, Adam, checkpoints (`last.pt`, `best.pt` by the area
    under the validation Dice-per-click curve), `metrics.jsonl` and `summary.json` in `out_dir`."""

    def __init__(self, config: ClickConfig, resume: Path | None = None) -> None:
        self.config = config
        self.resume = resume
        self.out_dir = Path(config.out_dir)
        self.encoder_dir = Path(config.encoder_model) if config.encoder_model else shipped_int8_model_dir()
        self.rng = np.random.default_rng(config.seed)
        self.step_index = 0
        self.best_area = -math.inf
        self.history: list[dict[str, Any]] = []
        self._int8: tuple[int, nn.Module] | None = None  # (step, the int8 decoder calibrated from the float one)

    def set_up(self) -> None:

        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        if not is_model_dir(self.encoder_dir):
            raise UserFacingError(
                f"encoder_model {self.encoder_dir}: not a qmedsam model folder (meta.json, encoder.xml)"
            )
        self.spec, self.spec_path = decoder_spec(config, self.encoder_dir)
        self.teacher = load_pretrained_litemedsam().eval()
        self.encoder_identity = identity = encoder_sha256(self.encoder_dir)
        teacher_identity = sha256_file(pretrained_weights_path())
        root = check_data_root(config.data_root)
        resumed = self.checked_resume(self.resume) if self.resume is not None else None  # before minutes of views
        with tempfile.TemporaryDirectory() as scratch:
            student = (identity, built_on_first_call(lambda: exact_int8_encoder(self.encoder_dir, Path(scratch))))
            teacher = (teacher_identity, built_on_first_call(lambda: float_teacher_encoder(self.teacher)))
            self.train_views = build_views(
                root,
                config.train_split,
                student,
                teacher,
                config.slice_stride,
                config.views_per_slice,
                seed=config.seed,
            )
            self.val_views = build_views(
                root, config.val_split, student, None, 1, 1, max_views=config.val_max_views, seed=config.seed
            )
        log.info(
            "click training: %d objects on %d training views, %d objects on %d validation views",
            len(self.train_views),
            len(self.train_views.labels),
            len(self.val_views),
            len(self.val_views.labels),
        )
        source = Path(config.init_checkpoint) if config.init_checkpoint else pretrained_weights_path()
        self.summary: dict[str, Any] = {"init": str(source), "encoder_model": str(self.encoder_dir)}
        if config.quantized_training:
            self.model, _, parts = load_student(self.spec, source)
            if "mask_decoder" in parts:
                self.summary |= _calibrate_decoder(self.model, self.train_views, config.calib_views, self.rng)
        else:
            self.model = float_start(source)
        trainable = trainable_parameters(self.model, config.train_decoder)
        groups = [{"params": trainable.points, "lr": config.point_lr}]
        if trainable.weights:
            groups.insert(0, {"params": trainable.weights, "lr": config.lr})
        if trainable.scales:
            groups.append({"params": trainable.scales, "lr": config.scale_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resumed is not None:
            self.restore(resumed, self.resume)

    def int8_model(self) -> nn.Module:
        """The decoder as export takes it: the model itself, or (float training) a quantized copy of it calibrated
        on the training views with a fixed seed (the same float weights give the same int8 model)."""
        if self.config.quantized_training:
            return self.model
        if self._int8 is not None and self._int8[0] == self.step_index:  # last.pt, best.pt and the end share it
            return self._int8[1]
        from qmedsam.model import quant

        model = quant.build_quantized(self.spec)
        quant.load_float_state_dict(model, self.model.state_dict(), "the float decoder in training")
        rng = np.random.default_rng(self.config.seed)
        _calibrate_decoder(model, self.train_views, self.config.calib_views, rng)
        self._int8 = (self.step_index, model.eval())
        return self._int8[1]

    def payload(self) -> dict[str, Any]:
        float_state = {} if self.config.quantized_training else {"train_state": self.model.state_dict()}
        return {
            "format": CHECKPOINT_FORMAT,
            "recipe": RECIPE,
            **float_state,
            "model": self.int8_model().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_index,
            "best_area": self.best_area,
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "config": self.config.to_dict(),
            "encoder_model": str(self.encoder_dir),
            "encoder_sha256": self.encoder_identity,
            "quant_spec": self.spec.to_dict(),
            "quant_spec_file": self.spec_path,
        }

    def checkpoint(self, name: str) -> Path:
        path = self.out_dir / name
        atomic_torch_save(self.payload(), path)
        return path

    def checked_resume(self, path: Path) -> dict[str, Any]:
        """The checkpoint to resume from, refused unless it is a click-training run's on this run's encoder."""
        state = load_checkpoint(path)
        if state.get("recipe") != RECIPE or "optimizer" not in state:
            raise UserFacingError(
                f"{path}: not a click-training run checkpoint (last.pt of `qmedsam train --config clicks.yaml`)"
            )
        if state.get("encoder_sha256") != self.encoder_identity:
            raise UserFacingError(
                f"{path}: trained on another encoder than {self.encoder_dir}'s; resume with the same encoder_model"
            )
        return state

    def restore(self, state: dict[str, Any], path: Path) -> None:
        self.model.load_state_dict(state["model" if self.config.quantized_training else "train_state"])
        groups, expected = len(state["optimizer"]["param_groups"]), len(self.optimizer.param_groups)
        if groups != expected:  # an older qmedsam trained the point embeddings in the weights' group
            raise UserFacingError(
                f"{path}: its optimizer has {groups} parameter groups, this recipe {expected} (written by an older "
                f"qmedsam); start a new run from its weights with --set init_checkpoint={path}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = int(state["step"])
        self.best_area = float(state["best_area"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed %s at step %d", path, self.step_index)

    def validate(self) -> dict[str, Any]:
        self.model.eval()
        config = self.config
        dice = dice_per_click(
            self.model, self.val_views, config.max_clicks, config.bbox_shift // 2, max_objects=config.val_max_objects
        )
        return {"val_dice_per_click": dice, "val_curve_area": curve_area(dice)}

    def log_row(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def run(self) -> Path:
        config = self.config
        self.set_up()
        steps = config.steps if config.max_steps is None else min(config.steps, config.max_steps)
        if self.step_index == 0:
            start = {"step": 0, **self.validate()}
            self.log_row(start)
            self.summary["before"] = start
            log.info("before training: Dice per click %s", np.round(start["val_dice_per_click"], 4).tolist())
        started, samples = time.perf_counter(), 0
        while self.step_index < steps:
            self.model.eval()  # Brevitas quantizers keep their calibrated statistics; dropout-free decoder
            factor = _learning_rate_factor(self.step_index, config)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = base * factor
            picks = self.rng.integers(0, len(self.train_views), size=config.batch_size)
            loss, parts = interaction_loss(
                self.model, self.teacher, self.train_views, self.train_views.objects[picks], config, self.rng
            )
            if not torch.isfinite(loss):
                raise RuntimeError(f"click training: non-finite loss at step {self.step_index}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step_index += 1
            samples += config.batch_size
            row: dict[str, Any] = {"step": self.step_index, "loss": float(loss.detach()), **parts}
            done = self.step_index == steps
            if self.step_index % config.val_every_steps == 0 or done:
                row |= self.validate()
                row["samples_per_s"] = samples / (time.perf_counter() - started)
                if row["val_curve_area"] > self.best_area:
                    self.best_area = row["val_curve_area"]
                    self.checkpoint("best.pt")
                log.info(
                    "step %d/%d: loss %.4f, validation Dice per click %s (area %.4f), %.1f samples/s",
                    self.step_index,
                    steps,
                    row["loss"],
                    np.round(row["val_dice_per_click"], 4).tolist(),
                    row["val_curve_area"],
                    row["samples_per_s"],
                )
            self.log_row(row)
            if self.step_index % config.checkpoint_every_steps == 0 or done:
                self.checkpoint("last.pt")
        if steps == 0 or not (self.out_dir / "best.pt").exists():
            self.checkpoint("last.pt")
            self.checkpoint("best.pt")
        if not config.quantized_training:  # what the exported decoder will do
            dice = dice_per_click(
                self.int8_model(), self.val_views, config.max_clicks, config.bbox_shift // 2, config.val_max_objects
            )
            self.summary["int8_validation"] = {"val_dice_per_click": dice, "val_curve_area": curve_area(dice)}
            log.info("int8 decoder: validation Dice per click %s", np.round(dice, 4).tolist())
        self.summary["seconds"] = time.perf_counter() - started
        self.summary["steps"] = self.step_index
        self.summary["after"] = self.history[-1] if self.history else None
        atomic_write_bytes(self.out_dir / "summary.json", (json.dumps(self.summary, indent=2) + "\n").encode())
        return self.out_dir / "best.pt"


def train_clicks(config: ClickConfig, resume: Path | None = None) -> Path:
    return ClickTrainer(config, resume).run()

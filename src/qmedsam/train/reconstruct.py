"""Block-wise reconstruction of the quantized image encoder against its float twin (the CPU warm start).

End-to-end QAT of the encoder costs a full fake-quant forward + backward per sample (~10 s on 2 cores).
Here each encoder unit (patch embedding, every MBConv / TinyViT block, every patch merging, the neck) is
trained alone to reproduce the float unit's output: inputs are the quantized model's own outputs of the
previous unit (so later units learn to correct earlier errors), targets the float model's outputs on the
float path, both cached in memory for a few real slices (~1-4 MB per slice per unit). The sum of all
units' cost per step is one encoder pass, but each unit converges in a few hundred cheap steps over a
small cache, which is what makes it affordable. Trained: weights, biases, norms and the learned
activation scales Brevitas gives calibrated quantizers (straight-through estimator, BRECQ-style without
the learned rounding).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qmedsam.evaluate.metrics import mean_mask_dice

log = logging.getLogger(__name__)

Unit = tuple[str, Callable[[torch.Tensor], torch.Tensor], nn.Module]


def encoder_units(encoder: nn.Module) -> list[Unit]:
    """(name, forward, module) of each TinyViT unit in execution order; chaining them is `encoder.forward`."""
    units: list[Unit] = [("patch_embed", encoder.patch_embed, encoder.patch_embed)]
    for i, stage in enumerate(encoder.layers):
        for j, block in enumerate(stage.blocks):
            units.append((f"layers.{i}.blocks.{j}", block, block))
        if stage.downsample is not None:
            units.append((f"layers.{i}.downsample", stage.downsample, stage.downsample))

    def neck(x: torch.Tensor) -> torch.Tensor:
        batch, _, channels = x.shape
        side = encoder.final_resolution
        return encoder.neck(x.view(batch, side, side, channels).permute(0, 3, 1, 2))

    units.append(("neck", neck, encoder.neck))
    return units


@dataclass(frozen=True)
class ReconstructionReport:
    units: int
    images: int
    steps_per_unit: int
    seconds: float
    relative_error_before: float
    """||q(x) - f(x)||² / ||f(x)||² of the encoder output on the reconstruction images, before and after."""
    relative_error_after: float

    def to_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def _relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-12))


def _adam_with_scale_group(module: nn.Module, lr: float, scale_lr: float) -> tuple[torch.optim.Adam, list[float]]:
    """Adam over `module`'s parameters (made trainable) and each group's base lr: weights, biases and norms
    at `lr`, the learned activation scales of its quantizers (parameters inside `*quant*`) at `scale_lr`."""
    scale_params = [p for n, p in module.named_parameters() if "quant" in n]
    scale_ids = {id(p) for p in scale_params}
    weight_params = [p for p in module.parameters() if id(p) not in scale_ids]
    for p in module.parameters():
        p.requires_grad_(True)
    groups = [{"params": weight_params, "lr": lr}]
    if scale_params:
        groups.append({"params": scale_params, "lr": scale_lr})
    optimizer = torch.optim.Adam(groups)
    return optimizer, [g["lr"] for g in optimizer.param_groups]


def _set_cosine_lr(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], step: int, steps: int) -> None:
    factor = 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor


def reconstruct_encoder(
    student: nn.Module,
    float_model: nn.Module,
    images: torch.Tensor,
    steps: int = 100,
    batch_size: int = 4,
    lr: float = 1e-5,
    scale_lr: float = 1e-4,
    seed: int = 0,
) -> ReconstructionReport:
    """Train each unit of `student.image_encoder` (calibrated Brevitas) to match `float_model.image_encoder`.

    `images` (N, 3, 256, 256) are preprocessed real slices. Adam per unit, cosine-decayed over `steps`;
    learned activation scales (parameters named `*.value` inside quantizers) get `scale_lr`. The loss is
    the unit's output MSE normalised by the float output's mean square, so every unit weighs the same.
    """
    generator = torch.Generator().manual_seed(seed)
    q_units = encoder_units(student.image_encoder)
    f_units = encoder_units(float_model.image_encoder)
    student.eval()
    float_model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        before = _relative_error(
            _batched(student.image_encoder, images, batch_size), _batched(float_model.image_encoder, images, batch_size)
        )
    x_q = images
    x_f = images
    for (name, q_forward, q_module), (_, f_forward, _) in zip(q_units, f_units, strict=True):
        with torch.no_grad():
            y_f = _batched(f_forward, x_f, batch_size)
        optimizer, base_lrs = _adam_with_scale_group(q_module, lr, scale_lr)
        norm = y_f.pow(2).mean().clamp(min=1e-12)
        unit_start = time.perf_counter()
        first = math.nan
        for step in range(steps):
            _set_cosine_lr(optimizer, base_lrs, step, steps)
            pick = torch.randperm(len(x_q), generator=generator)[:batch_size]
            loss = (q_forward(x_q[pick]) - y_f[pick]).pow(2).mean() / norm
            if not torch.isfinite(loss):
                raise RuntimeError(f"block reconstruction of encoder unit {name}: non-finite loss at step {step}")
            if step == 0:
                first = float(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for p in q_module.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            x_q = _batched(q_forward, x_q, batch_size)
            last = float(x_q.sub(y_f).pow(2).mean() / norm)
        log.info(
            "reconstructed %-22s rel. MSE first batch %.5f, after (all) %.5f (%.1f s)",
            name,
            first,
            last,
            time.perf_counter() - unit_start,
        )
        x_f = y_f
    after = _relative_error(x_q, x_f)
    report = ReconstructionReport(len(q_units), len(images), steps, time.perf_counter() - start, before, after)
    log.info("encoder reconstruction: relative error %.5f -> %.5f in %.0f s", before, after, report.seconds)
    return report


@dataclass(frozen=True)
class DecoderReconstructionReport:
    samples: int
    held_out: int
    steps: int
    seconds: float
    agreement_before: float
    """Mean mask Dice of the student (quantized encoder + decoder) against the float model on the training
    samples, before and after; `held_out_*` the same on samples the steps never saw."""
    agreement_after: float
    held_out_before: float
    held_out_after: float
    loss_before: float
    """The soft-label BCE on the training samples (what the steps minimise), before and after."""
    loss_after: float

    def to_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class DistillationSet:
    """What decoder distillation trains on, computed once: the boxes, the student's (quantized encoder's)
    embeddings and the float model's mask logits on its own embeddings. A step then costs a decoder forward and
    backward only."""

    boxes: torch.Tensor
    student_embeddings: torch.Tensor
    targets: torch.Tensor
    batch_size: int

    @classmethod
    def build(
        cls,
        student: nn.Module,
        float_model: nn.Module,
        samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
    ) -> DistillationSet:
        boxes = torch.cat([box.reshape(1, 4) for _, box in samples])
        with torch.no_grad():
            q_embeddings = torch.cat([student.encode(image) for image, _ in samples])
            f_embeddings = torch.cat([float_model.encode(image) for image, _ in samples])
        partial = cls(boxes, q_embeddings, torch.empty(0), batch_size)
        targets = partial.decode(float_model, f_embeddings, range(len(samples)))
        return cls(boxes, q_embeddings, targets, batch_size)

    def decode(self, model: nn.Module, embeddings: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """Mask logits of (embedding, box) pairs `indices`, in chunks of `batch_size`, without gradients."""
        indices = list(indices)
        with torch.no_grad():
            chunks = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
            return torch.cat([model.decode(embeddings[c], self.boxes[c])[0] for c in chunks])

    def loss(self, logits: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """Binary cross-entropy against the float model's probabilities (soft labels: every pixel counts)."""
        return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(self.targets[list(indices)]))

    def scores(self, student: nn.Module, indices: Sequence[int]) -> tuple[float, float]:
        """(mask agreement with the float model, soft-label BCE) of the student on `indices`."""
        if not indices:
            return math.nan, math.nan
        logits = self.decode(student, self.student_embeddings, indices)
        agreement = mean_mask_dice((logits > 0).numpy(), (self.targets[list(indices)] > 0).numpy())
        return agreement, float(self.loss(logits, indices))


def held_out_split(count: int, hold_out_every: int) -> tuple[list[int], list[int]]:
    """(trained, held out) sample indices: every `hold_out_every`-th sample is held out (none when 0)."""
    everything = list(range(count))
    held = everything[hold_out_every - 1 :: hold_out_every] if hold_out_every else []
    return sorted(set(everything) - set(held)), held


def _distil_steps(
    student: nn.Module,
    data: DistillationSet,
    trained: Sequence[int],
    steps: int,
    lr: float,
    scale_lr: float,
    generator: torch.Generator,
) -> None:
    """Adam steps on the decoder alone (weights at `lr`, learned activation scales at `scale_lr`, cosine decay);
    the encoder and prompt encoder stay frozen and gather no gradients."""
    for p in student.parameters():
        p.requires_grad_(False)
    decoder = student.mask_decoder
    optimizer, base_lrs = _adam_with_scale_group(decoder, lr, scale_lr)
    order = torch.tensor(trained)
    for step in range(steps):
        _set_cosine_lr(optimizer, base_lrs, step, steps)
        pick = order[torch.randperm(len(order), generator=generator)[: data.batch_size]].tolist()
        loss = data.loss(student.decode(data.student_embeddings[pick], data.boxes[pick])[0], pick)
        if not torch.isfinite(loss):
            raise RuntimeError(f"decoder reconstruction: non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            log.info("decoder reconstruction step %d/%d: soft-label BCE %.5f", step + 1, steps, float(loss.detach()))
    for p in decoder.parameters():
        p.requires_grad_(False)


def reconstruct_decoder(
    student: nn.Module,
    float_model: nn.Module,
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 1e-5,
    scale_lr: float = 1e-4,
    hold_out_every: int = 8,
    seed: int = 0,
) -> DecoderReconstructionReport:
    """Distil the quantized mask decoder from the float model, end to end on cached embeddings.

    Each sample is (image (1, 3, 256, 256), box (1, 4)). The student decoder sees the QUANTIZED encoder's
    embedding, the target is the FLOAT model's mask logits on the FLOAT embedding, so the decoder also learns
    to absorb what the int8 encoder got wrong (`DistillationSet`). Trained: the decoder's weights, biases, norms
    (`lr`) and its learned activation scales (`scale_lr`). Every `hold_out_every`-th sample is kept out of the
    steps to report whether the agreement generalises.
    """
    generator = torch.Generator().manual_seed(seed)
    student.eval()
    float_model.eval()
    start = time.perf_counter()
    data = DistillationSet.build(student, float_model, samples, batch_size)
    trained, held = held_out_split(len(samples), hold_out_every)
    if not trained:
        raise ValueError("decoder reconstruction needs at least one training sample")
    (before, loss_before), (held_before, _) = data.scores(student, trained), data.scores(student, held)
    _distil_steps(student, data, trained, steps, lr, scale_lr, generator)
    (after, loss_after), (held_after, _) = data.scores(student, trained), data.scores(student, held)
    report = DecoderReconstructionReport(
        samples=len(trained),
        held_out=len(held),
        steps=steps,
        seconds=time.perf_counter() - start,
        agreement_before=before,
        agreement_after=after,
        held_out_before=held_before,
        held_out_after=held_after,
        loss_before=loss_before,
        loss_after=loss_after,
    )
    log.info(
        "decoder reconstruction: mask agreement with float %.4f -> %.4f (held out %.4f -> %.4f) in %.0f s",
        report.agreement_before,
        report.agreement_after,
        report.held_out_before,
        report.held_out_after,
        report.seconds,
    )
    return report

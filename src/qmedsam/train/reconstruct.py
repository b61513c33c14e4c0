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
from torch import nn

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
        scale_params = [p for n, p in q_module.named_parameters() if "quant" in n]
        scale_ids = {id(p) for p in scale_params}
        weight_params = [p for p in q_module.parameters() if id(p) not in scale_ids]
        for p in q_module.parameters():
            p.requires_grad_(True)
        groups = [{"params": weight_params, "lr": lr}]
        if scale_params:
            groups.append({"params": scale_params, "lr": scale_lr})
        optimizer = torch.optim.Adam(groups)
        base_lrs = [g["lr"] for g in optimizer.param_groups]
        norm = y_f.pow(2).mean().clamp(min=1e-12)
        unit_start = time.perf_counter()
        first = math.nan
        for step in range(steps):
            factor = 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
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


def relative_encoder_error(student: nn.Module, float_model: nn.Module, images: Sequence[torch.Tensor]) -> float:
    """Mean relative squared error of the student's embeddings against the float model's (a cheap proxy)."""
    with torch.no_grad():
        errors = [_relative_error(student.encode(x), float_model.encode(x)) for x in images]
    return float(sum(errors) / len(errors))

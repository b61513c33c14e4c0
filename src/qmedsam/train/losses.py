"""The QMedSAM training loss, per sample: segmentation (MONAI Dice + BCE) and distillation.

Labelled sample: `Dice(sigmoid, squared_pred) + BCE-with-logits` against its mask, plus (teacher on)
`IoU(teacher mask, GT) x MSE(student embedding, teacher embedding)` -- the teacher's embedding is trusted as
much as its mask is right for that sample (the seed averaged the IoU over the batch instead). Unlabelled
sample: the teacher's thresholded mask is the target and its embedding is matched with weight 1.
Everything is per sample so a batch may mix labelled and unlabelled samples; the batch loss is the mean.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    """Per-sample terms (B,) and the batch loss; kept apart for logging."""

    total: torch.Tensor  # scalar
    segmentation: torch.Tensor  # (B,)
    distillation: torch.Tensor  # (B,), zeros without a teacher
    teacher_iou: torch.Tensor  # (B,), ones for unlabelled samples, zeros without a teacher


@functools.cache
def _monai_dice() -> torch.nn.Module:
    from monai.losses import DiceLoss  # imported on first use: monai is slow to import

    return DiceLoss(sigmoid=True, squared_pred=True, reduction="none")


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI `DiceLoss(sigmoid=True, squared_pred=True)` per sample: (B, 1, S, S) -> (B,)."""
    return _monai_dice()(logits, target).reshape(logits.shape[0], -1).mean(dim=1)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + BCE-with-logits per sample, (B, 1, S, S) logits and {0, 1} target -> (B,)."""
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(dim=1)
    return dice_loss(logits, target) + bce


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of two boolean masks per sample (B, ...) -> (B,); two empty masks agree perfectly (1)."""
    a, b = a.flatten(1).bool(), b.flatten(1).bool()
    inter = (a & b).sum(dim=1).float()
    union = (a | b).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def qmedsam_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    labelled: torch.Tensor,
    student_embedding: torch.Tensor | None = None,
    teacher_embedding: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    distill_weight: float = 1.0,
) -> LossParts:
    """The batch loss. `labelled` (B,) bool; teacher tensors None when distillation is off.

    Unlabelled samples need the teacher (their target is its mask); without one they contribute nothing.
    """
    batch = logits.shape[0]
    labelled = labelled.to(device=logits.device, dtype=torch.bool).reshape(batch)
    zeros = logits.new_zeros(batch)
    if teacher_logits is None:
        target = masks
        weight = labelled.to(logits.dtype)
        seg = segmentation_loss(logits, target) * weight
        total = seg.sum() / weight.sum().clamp(min=1)
        return LossParts(total, seg, zeros, zeros)
    teacher_masks = teacher_logits.detach() > 0
    target = torch.where(labelled.view(-1, 1, 1, 1), masks.bool(), teacher_masks)
    seg = segmentation_loss(logits, target)
    iou = torch.where(labelled, mask_iou(teacher_masks, masks), torch.ones_like(zeros))
    distill = zeros
    if student_embedding is not None and teacher_embedding is not None:
        mse = (student_embedding - teacher_embedding.detach().to(student_embedding.dtype)).pow(2).flatten(1).mean(1)
        distill = distill_weight * iou * mse
    total = (seg + distill).mean()
    return LossParts(total, seg, distill, iou)

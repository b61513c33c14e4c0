"""Post-training calibration of a Brevitas LiteMedSAM from real slices, before (or instead of) QAT.

Order matters: per-channel input smoothing first (it changes what the activation quantizers see),
then activation statistics in Brevitas calibration mode (quantization off, so every quantizer sees
float inputs), then optional bias correction. Both encoder and decoder quantizers are calibrated:
the decoder needs boxes, so a calibration sample is (image, boxes), not an image alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from qmedsam.data.preprocess import preprocess_image, scale_boxes
from qmedsam.model import quant

log = logging.getLogger(__name__)

MAX_BOXES_PER_SAMPLE = 16
"""Decoder activations grow with the number of boxes (~40 MB each); more boxes add little new range."""


class PromptedImage(Protocol):
    """An image in original pixels and its boxes (N, 4) [x0, y0, x1, y1] (e.g. `ParitySample`)."""

    image: np.ndarray
    boxes: np.ndarray


Batch = tuple[torch.Tensor, torch.Tensor]
"""A preprocessed image (1, 3, 256, 256) and its boxes in model space (B, 4)."""


def model_inputs(samples: Iterable[PromptedImage], max_boxes: int = MAX_BOXES_PER_SAMPLE) -> list[Batch]:
    """Preprocess samples exactly as inference does; at most `max_boxes` boxes each (evenly picked)."""
    batches = []
    for sample in samples:
        tensor, geometry = preprocess_image(sample.image)
        boxes = np.asarray(sample.boxes).reshape(-1, 4)
        if len(boxes) > max_boxes:
            boxes = boxes[np.linspace(0, len(boxes) - 1, max_boxes).round().astype(int)]
        batches.append((torch.from_numpy(tensor), torch.from_numpy(scale_boxes(boxes, geometry))))
    return batches


def smoothed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantized encoder convs that scale their input per channel before quantizing it."""
    return {name: m for name, m in model.named_modules() if hasattr(m, quant.SMOOTHING_BUFFER)}


def _input_channel_layout(conv: nn.Module) -> tuple[tuple[int, ...], int]:
    """(view shape of a per-input-channel factor on the weight, weight dim of the input channel): channel c
    of a depthwise conv is its output channel c (dim 0); a regular conv's input channel is weight dim 1."""
    return ((-1, 1, 1, 1), 0) if conv.groups > 1 else ((1, -1, 1, 1), 1)


@torch.no_grad()
def smooth_inputs(model: nn.Module, batches: Sequence[Batch]) -> int:
    """Set the per-channel input scales of the smoothed convs from real encoder inputs (SmoothQuant).

    With s_c = a_c^alpha / w_c^(1-alpha) (a: input abs-max, w: weight abs-max of input channel c), the
    input is divided and the weight multiplied by s, leaving the float function unchanged. Repeated
    calls re-derive s from the raw input, so calibrating twice does not compound. Returns the count.
    """
    layers = smoothed_layers(model)
    if not layers:
        return 0
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            amax = args[0].detach().abs().amax(dim=(0, 2, 3))
            maxima[name] = amax if name not in maxima else torch.maximum(maxima[name], amax)

        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    try:
        with quant.quantization_disabled(model):
            for image, _ in batches:
                model.encode(image)
    finally:
        for hook in hooks:
            hook.remove()
    for name, layer in layers.items():
        if name not in maxima:
            raise RuntimeError(f"smoothed layer {name} saw no calibration input")
        shape, weight_dim = _input_channel_layout(layer)
        old = layer.input_smoothing.clone()
        weight = layer.weight * old.view(shape)  # the float weight, whatever was folded before
        alpha = layer.smoothing_alpha
        act = maxima[name].clamp(min=1e-5)
        wmax = weight.abs().transpose(0, weight_dim).flatten(1).amax(dim=1).clamp(min=1e-5)
        scale = act.pow(alpha) / wmax.pow(1.0 - alpha)
        layer.input_smoothing.copy_(1.0 / scale)
        layer.weight.copy_(weight * scale.view(shape))
    return len(layers)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Batch],
    n: int | None = None,
    bias_correction: bool = False,
    parts: Sequence[str] = ("image_encoder", "mask_decoder"),
) -> dict[str, int]:
    """Set activation quantizer scales of a Brevitas LiteMedSAM from the first `n` real batches.

    Runs input smoothing (if the spec has it), Brevitas calibration mode over `parts` (both by default;
    a later QAT stage that newly quantizes the decoder calibrates only that, keeping the trained encoder's
    scales), then optional Brevitas bias correction. Raises if some quantizer saw no data.
    """
    batches = list(batches)[:n] if n is not None else list(batches)
    if not batches:
        raise ValueError("calibration needs at least one (image, boxes) batch")
    model.eval()
    smoothed = smooth_inputs(model, batches) if "image_encoder" in parts else 0
    with contextlib.ExitStack() as stack:
        for part in parts:
            stack.enter_context(quant.calibration_mode(getattr(model, part)))
        for image, boxes in batches:
            model.decode(model.encode(image), boxes)
    if bias_correction:
        with quant.bias_correction_mode(model):
            for image, boxes in batches:
                model.decode(model.encode(image), boxes)
    model.eval()
    missing = quant.uncalibrated_quantizers(model)
    if missing:
        raise RuntimeError(f"activation quantizers saw no calibration data: {missing[:5]}")
    summary = {"samples": len(batches), "boxes": sum(len(b) for _, b in batches), "smoothed_convs": smoothed}
    log.info("calibrated %(samples)d slices, %(boxes)d boxes (%(smoothed_convs)d conv inputs smoothed)", summary)
    return summary

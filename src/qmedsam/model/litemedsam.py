"""LiteMedSAM assembly (TinyViT encoder + SAM prompt encoder + mask decoder) and weight loading.

Defined once, with its layers built through layer factories (`qmedsam.model.layers`). This module
knows nothing about quantization: `qmedsam.model.quant` builds the quantized model on top of it by
handing Brevitas layer factories to the same `LiteMedSAM` (`build_quantized`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qmedsam.errors import UserFacingError
from qmedsam.model.layers import FLOAT_LAYERS, LayerFactory
from qmedsam.model.sam_decoder import MaskDecoder, PromptEncoder
from qmedsam.model.tiny_vit import TinyViT
from qmedsam.model.weights import pretrained_weights_path

IMAGE_SIZE = 256
EMBEDDING_SHAPE = (256, 64, 64)


class LiteMedSAM(nn.Module):
    """Box-prompted segmentation refined by clicks: `encode` an image once, `decode` any number of boxes (each
    with the same number of clicks, padded with label -1) against it."""

    def __init__(self, encoder_layers: LayerFactory = FLOAT_LAYERS, decoder_layers: LayerFactory = FLOAT_LAYERS):
        super().__init__()
        self.image_encoder = TinyViT(img_size=IMAGE_SIZE, layers=encoder_layers)
        self.prompt_encoder = PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(IMAGE_SIZE, IMAGE_SIZE)
        )
        self.mask_decoder = MaskDecoder(transformer_dim=256, layers=decoder_layers)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64)."""
        return self.image_encoder(image)

    def decode(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor,
        multimask_output: bool = False,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding (1 or B, 256, 64, 64) + boxes (B, 4) in 256-space [+ clicks (B, N, 2) in 256-space with
        labels (B, N): 1 include, 0 exclude, -1 padding] -> logits (B, M, 256, 256), IoU (B, M)."""
        sparse, dense = self.prompt_encoder(boxes.reshape(-1, 4), points, point_labels)
        return self.mask_decoder(embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Training path: one box per image, (B, 3, 256, 256) + (B, 4) -> logits (B, 1, 256, 256)."""
        return self.decode(self.encode(image), boxes)[0]


class DecoderForExport(nn.Module):
    """Prompt encoder + mask decoder with a fixed I/O contract for OpenVINO: `image_embedding` (1, 256, 64, 64),
    `boxes` (B, 1, 4), `points` (B, N, 2), `point_labels` (B, N) -> `low_res_masks` (B, 256, 256); N may be 0
    (a box alone: the same tokens, and the same cost, as a box-only decoder)."""

    def __init__(self, model: LiteMedSAM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image_embedding: torch.Tensor, boxes: torch.Tensor, points: torch.Tensor, point_labels: torch.Tensor
    ) -> torch.Tensor:
        return self.model.decode(image_embedding, boxes.reshape(-1, 4), False, points, point_labels)[0][:, 0]


DECODER_INPUTS = ("image_embedding", "boxes", "points", "point_labels")
"""The decoder IR's inputs, in order (a model folder exported before clicks has the first two)."""


def build_litemedsam() -> LiteMedSAM:
    """An untrained float model (the quantized one: `qmedsam.model.quant.build_quantized`)."""
    return LiteMedSAM()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict (or a qmedsam checkpoint holding one under `model`) safely."""
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise UserFacingError(f"{path}: not a readable weights-only PyTorch checkpoint ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserFacingError(f"{path}: expected a state dict of tensors (or a dict with key 'model' holding one)")
    return state


def load_pretrained_litemedsam(weights: str | Path | None = None) -> LiteMedSAM:
    """The float LiteMedSAM with the published weights (strict load), in eval mode."""
    path = Path(weights) if weights is not None else pretrained_weights_path()
    model = LiteMedSAM()
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserFacingError(f"{path}: does not match the LiteMedSAM architecture: {exc}") from None
    return model.eval()

"""Engines: the narrow protocol everything above it uses (`encode`, `decode`), two implementations.

`TorchEngine` is the reference (float or fake-quant PyTorch); `OpenVINOEngine` runs an exported model
directory (encoder.xml, decoder.xml, meta.json). Both take and return numpy arrays so 2D/3D logic,
propagation and the CLI are engine-agnostic and parity tests compare engines on the same inputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from qmedsam.errors import UserFacingError
from qmedsam.files import default_cache_root
from qmedsam.inference.decoder_io import checked_clicks, decoder_feed, takes_clicks
from qmedsam.inference.model_dir import click_decoder_path, read_model_meta
from qmedsam.inference.ov_core import shared_core
from qmedsam.inference.precision import PRECISION_CHOICES, choose_precision, compile_config

log = logging.getLogger(__name__)


class Engine(Protocol):
    """Encode a preprocessed image once, decode any number of boxes (with clicks) against its embedding."""

    name: str

    def encode(self, image: np.ndarray) -> np.ndarray:
        """(1, 3, 256, 256) float32 in [0, 1] -> (1, 256, 64, 64) float32."""
        ...

    def decode(
        self,
        embedding: np.ndarray,
        boxes: np.ndarray,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """Embedding (1, 256, 64, 64) + boxes (B, 4) in 256-space [+ clicks (B, N, 2) in 256-space, labels (B, N):
        1 include, 0 exclude, -1 padding] -> logits (B, 256, 256) float32."""
        ...


class TorchEngine:
    """PyTorch reference engine; the model may be float or Brevitas fake-quant, in float32 or (for a
    precision reference) float64: `dtype` is the model's, inputs are cast to it, outputs are float32."""

    def __init__(self, model, num_threads: int | None = None, name: str = "torch", dtype=np.float32) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = model.eval()
        self.name = name
        self.dtype = np.dtype(dtype)
        self._torch = torch

    @classmethod
    def pretrained(cls, num_threads: int | None = None) -> TorchEngine:
        from qmedsam.model.litemedsam import load_pretrained_litemedsam

        return cls(load_pretrained_litemedsam(), num_threads)

    def _tensor(self, array: np.ndarray):
        tensor = self._torch.from_numpy(np.ascontiguousarray(array, self.dtype))
        device = next(self.model.parameters()).device  # a model being trained may live on a GPU
        return tensor if device.type == "cpu" else tensor.to(device)

    def encode(self, image: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model.encode(self._tensor(image)).cpu().numpy().astype(np.float32, copy=False)

    def decode(
        self,
        embedding: np.ndarray,
        boxes: np.ndarray,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> np.ndarray:
        points, point_labels = checked_clicks(boxes, points, point_labels)
        clicks = (self._tensor(points), self._tensor(point_labels)) if points.shape[1] else (None, None)
        with self._torch.inference_mode():
            logits, _ = self.model.decode(self._tensor(embedding), self._tensor(boxes).reshape(-1, 4), False, *clicks)
        return logits[:, 0].cpu().numpy().astype(np.float32, copy=False)


class OpenVINOEngine:
    """OpenVINO engine over an exported model directory.

    The CPU plugin's default inference precision is bf16 where the CPU supports it, so the hint is
    always set explicitly: f32, bf16, or `auto` (per part, measured once on this CPU with an accuracy gate,
    then cached; f32 on a CPU without native bf16). Compiled blobs are cached (`CACHE_DIR`) so later
    processes start fast.
    Inputs are never shared with OpenVINO (`share_inputs=False`): a later call must not see, or
    overwrite, an array the caller still holds.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        precision: str = "f32",
        num_threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if precision not in PRECISION_CHOICES:
            raise UserFacingError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")
        self.model_dir = Path(model_dir)
        self.meta = read_model_meta(self.model_dir)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_root() / "ov_cache"
        cache.mkdir(parents=True, exist_ok=True)
        if precision == "auto":
            choice = choose_precision(self.model_dir, cache, num_threads)
            self.hints = {"encoder": choice.encoder, "decoder": choice.decoder}
        else:
            self.hints = {"encoder": precision, "decoder": precision}
        same = self.hints["encoder"] == self.hints["decoder"]
        self.precision = self.hints["encoder"] if same else f"{self.hints['encoder']}/{self.hints['decoder']}"
        self.name = f"openvino-{self.meta.get('precision', 'fp32')}-{self.precision}"
        core = shared_core()
        encoder_config = compile_config(self.hints["encoder"], cache, num_threads)
        decoder_config = compile_config(self.hints["decoder"], cache, num_threads)
        self.encoder = core.compile_model(str(self.model_dir / "encoder.xml"), "CPU", encoder_config)
        self.decoder = core.compile_model(str(self.model_dir / "decoder.xml"), "CPU", decoder_config)
        self._encode_request = self.encoder.create_infer_request()
        self._decode_request = self.decoder.create_infer_request()
        self._decoder_config = decoder_config
        self._click_decoder_xml = click_decoder_path(self.model_dir)
        self._click_request = None  # compiled on the first click: boxes alone never pay for it
        self.takes_clicks = self._click_decoder_xml is not None or takes_clicks(self.decoder)

    def encode(self, image: np.ndarray) -> np.ndarray:
        result = self._encode_request.infer(
            {"image": np.ascontiguousarray(image, np.float32)}, share_inputs=False, share_outputs=False
        )
        return np.array(result[self.encoder.output(0)])

    def decode(
        self,
        embedding: np.ndarray,
        boxes: np.ndarray,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """Boxes alone go to `decoder.xml`; boxes with clicks to `click_decoder.xml` where the folder has one,
        else to `decoder.xml`. A decoder exported before clicks (inputs `image_embedding` and `boxes` only)
        still serves boxes; asking it for clicks is refused by name."""
        if self._click_decoder_xml is not None and points is not None and np.asarray(points).size:
            request = self._click_decoder()
            decoder = request.get_compiled_model()
        else:
            request, decoder = self._decode_request, self.decoder
        feed = decoder_feed(decoder, embedding, boxes, points, point_labels, self.model_dir)
        result = request.infer(feed, share_inputs=False, share_outputs=False)
        return np.array(result[decoder.output(0)])

    def _click_decoder(self):
        if self._click_request is None:
            compiled = shared_core().compile_model(str(self._click_decoder_xml), "CPU", self._decoder_config)
            if not takes_clicks(compiled):
                raise UserFacingError(f"{self._click_decoder_xml}: has no click inputs (points, point_labels)")
            self._click_request = compiled.create_infer_request()
        return self._click_request

    def runtime_precisions(self) -> dict[str, dict[str, int]]:
        """Count of Convolution/FullyConnected/MatMul-like layers per runtime precision, per part."""
        precisions = {"encoder": layer_precisions(self.encoder), "decoder": layer_precisions(self.decoder)}
        if self._click_decoder_xml is not None:
            precisions["click_decoder"] = layer_precisions(self._click_decoder().get_compiled_model())
        return precisions


HEAVY_LAYER_TYPES = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


def layer_precisions(compiled, origin: Callable[[list[str]], bool] | None = None) -> dict[str, int]:
    """Read what the CPU plugin really runs: `runtimePrecision` of each heavy layer (never assume); with
    `origin`, only the layers whose original op names (`originalLayersNames`) it accepts."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if layer_type not in HEAVY_LAYER_TYPES:
            continue
        if origin is not None:
            names = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else []
            if not origin([name for name in names if name]):
                continue
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "unknown"
        key = f"{layer_type}:{precision}"
        counts[key] = counts.get(key, 0) + 1
    return counts

"""Export a click-trained int8 decoder beside the int8 encoder it was trained on, and check it.

The click recipe (`qmedsam.train.clicks`) trains the decoder on embeddings of an existing int8 model's
encoder; that encoder never exists in PyTorch here, so the new model folder copies its IR (byte for byte,
SHA-256 checked against the checkpoint) and exports only the decoder, through the same Brevitas QCDQ path as
every int8 export. The checks: the IR decoder against the PyTorch fake-quant decoder on the same embedding
(the encoder's exact int8 embedding), boxes alone and boxes with clicks, each against the reference
decoder's own float64 agreement (`qmedsam.export.int8_parity`'s rule); the encoder's block-by-block parity
was measured when it was exported and is carried over from its meta.json.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qmedsam.data.preprocess import postprocess_logits, preprocess_image, scale_boxes
from qmedsam.errors import UserFacingError
from qmedsam.export.fp32 import base_meta, name_io, write_meta
from qmedsam.export.int8 import check_coverage, export_decoder_onnx
from qmedsam.export.int8_parity import ParityThresholds, _required, ir_to_check
from qmedsam.export.parity import MaskAgreement, ParitySample
from qmedsam.export.staging import staged_directory
from qmedsam.inference.model_dir import encoder_sha256, read_model_meta
from qmedsam.inference.ov_core import shared_core
from qmedsam.inference.runtime import OpenVINOEngine, TorchEngine

log = logging.getLogger(__name__)


def convert_decoder_qcdq(model, out_dir: Path) -> None:
    """The Brevitas fake-quant decoder -> QCDQ ONNX (as every int8 export writes it) -> `out_dir/decoder.xml`."""
    import openvino as ov

    from qmedsam.model.litemedsam import DECODER_INPUTS

    onnx_path = out_dir / "decoder.onnx"
    export_decoder_onnx(model, onnx_path)
    decoder = shared_core().read_model(str(onnx_path))
    name_io(decoder, list(DECODER_INPUTS), "low_res_masks")
    ov.save_model(decoder, str(out_dir / "decoder.xml"), compress_to_fp16=False)
    del decoder
    onnx_path.unlink()


class EncoderIRDecoderTorch:
    """The reference of a click-trained model: the int8 encoder IR (exactly as int8 CPUs run it) feeding the
    PyTorch fake-quant decoder."""

    def __init__(self, encoder: OpenVINOEngine, decoder: TorchEngine) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.name = f"{encoder.name}-encoder+{decoder.name}-decoder"

    def encode(self, image: np.ndarray) -> np.ndarray:
        return self.encoder.encode(image)

    def decode(self, embedding, boxes, points=None, point_labels=None) -> np.ndarray:
        return self.decoder.decode(embedding, boxes, points, point_labels)


def parity_clicks(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two clicks per model-space box for the parity check: include at its centre, exclude a quarter in from
    its top-left corner (where a box's corner usually holds background)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    centre = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    corner = np.stack([boxes[:, 0] + (boxes[:, 2] - boxes[:, 0]) / 4, boxes[:, 1] + (boxes[:, 3] - boxes[:, 1]) / 4], 1)
    points = np.stack([centre, corner], axis=1).round().astype(np.float32)
    return points, np.tile(np.array([[1.0, 0.0]], np.float32), (len(boxes), 1))


def decoder_agreement(reference, candidate, samples: Sequence[ParitySample], with_clicks: bool) -> dict:
    """`MaskAgreement` of `candidate`'s decoder with `reference`'s on the reference's embedding."""
    agreement = MaskAgreement()
    for sample in samples:
        tensor, geometry = preprocess_image(sample.image)
        boxes = scale_boxes(sample.boxes, geometry)
        clicks = parity_clicks(boxes) if with_clicks else (None, None)
        embedding = reference.encode(tensor)
        ref = postprocess_logits(reference.decode(embedding, boxes, *clicks), geometry)
        cand = postprocess_logits(candidate.decode(embedding, boxes, *clicks), geometry)
        agreement.add(ref, cand)
    return agreement.summary()


def export_click_decoder(
    model,
    spec,
    encoder_dir: Path,
    expected_encoder_sha256: str | None,
    out_dir: str | Path,
    source: dict,
    parity_samples: Sequence[ParitySample],
    samples_from: str,
    thresholds: ParityThresholds | None = None,
    *,
    force: bool = False,
) -> dict:
    """A model folder: `encoder_dir`'s encoder IR + the click-trained decoder of `model` (Brevitas, calibrated).
    Fails, leaving `out_dir` untouched, if the encoder is not the one the decoder was trained on, if the decoder
    runs too little in int8, or if the IR decoder disagrees with PyTorch (boxes alone or with clicks)."""
    from qmedsam.model.quant import uncalibrated_quantizers

    thresholds = thresholds or ParityThresholds()
    encoder_dir = Path(encoder_dir)
    encoder_meta = read_model_meta(encoder_dir)
    if encoder_meta.get("precision") != "int8":
        raise UserFacingError(f"{encoder_dir}: expected an int8 model folder to take the encoder from")
    identity = encoder_sha256(encoder_dir)
    if expected_encoder_sha256 is not None and identity != expected_encoder_sha256:
        raise UserFacingError(
            f"{encoder_dir}: its encoder is not the one this decoder was trained on (SHA-256 {identity[:12]} vs "
            f"{expected_encoder_sha256[:12]} in the checkpoint); give the same encoder model"
        )
    missing = uncalibrated_quantizers(model.mask_decoder)
    if missing:
        raise UserFacingError(f"{len(missing)} decoder activation quantizers are not calibrated (e.g. {missing[0]})")
    if not parity_samples:
        raise ValueError("the export needs real slices for its parity check")
    with staged_directory(out_dir, force) as staging:
        for name in ("encoder.xml", "encoder.bin"):
            shutil.copyfile(encoder_dir / name, staging / name)
        convert_decoder_qcdq(model, staging)
        meta = base_meta("int8", source)
        meta["quantization"] = {
            "tool": "brevitas",
            "format": "qcdq-onnx",
            "spec": spec.to_dict(),
            "encoder_units": encoder_meta.get("quantization", {}).get("encoder_units", []),
            "encoder_from": {
                "model": encoder_meta.get("source", {}),
                "encoder_sha256": identity,
                "spec": encoder_meta.get("quantization", {}).get("spec"),
            },
        }
        write_meta(staging, meta)
        check_coverage(staging, meta, {"decoder": spec.min_int8_fraction})
        parity, failures = _click_decoder_parity(staging, model, parity_samples, thresholds)
        parity["samples_from"] = samples_from
        parity["samples"] = len(parity_samples)
        encoder_parity = encoder_meta.get("parity_vs_torch", {}).get("f32", {})
        parity["encoder_units_at_its_export"] = {
            "units": encoder_parity.get("units"),
            "worst_unit": encoder_parity.get("worst_unit"),
        }
        meta["parity_vs_torch"] = {"f32": parity}
        write_meta(staging, meta)
        if failures:
            raise RuntimeError(
                "int8 decoder IR is not faithful to the PyTorch fake-quant decoder: " + "; ".join(failures)
            )
    log.info(
        "exported the click-trained decoder beside %s's encoder to %s (decoder Dice vs PyTorch: boxes %.4f, "
        "clicks %.4f)",
        encoder_dir,
        out_dir,
        parity["decoder_teacher_forced"]["mask_dice_mean"],
        parity["decoder_with_clicks"]["mask_dice_mean"],
    )
    return meta


def _click_decoder_parity(
    model_dir: Path, model, samples: Sequence[ParitySample], thresholds: ParityThresholds
) -> tuple[dict, list[str]]:
    with tempfile.TemporaryDirectory() as scratch:
        checked = ir_to_check(model_dir, Path(scratch))
        exact = checked == model_dir
        candidate = OpenVINOEngine(checked, precision="f32", cache_dir=Path(scratch) / "cache")
        reference = EncoderIRDecoderTorch(candidate, TorchEngine(model, name="torch-brevitas-fakequant"))
        twin = EncoderIRDecoderTorch(candidate, TorchEngine(copy.deepcopy(model).double(), dtype=np.float64))
        record: dict = {
            "reference": reference.name,
            "int8_kernels": "exact (VNNI/AMX)"
            if exact
            else "saturating (no VNNI/AMX): checks ran the IR's graph in f32",
            "thresholds": {"decoder_slack": thresholds.decoder_slack, "min_decoder_dice": thresholds.min_decoder_dice},
        }
        failures = []
        for key, with_clicks in (("decoder_teacher_forced", False), ("decoder_with_clicks", True)):
            agreement = decoder_agreement(reference, candidate, samples, with_clicks)
            floor = decoder_agreement(reference, twin, samples, with_clicks)["mask_dice_mean"]
            needed = _required(
                floor, thresholds.decoder_slack, thresholds.min_decoder_dice_floor, thresholds.min_decoder_dice
            )
            record[key] = {**agreement, "reference_float64_agreement": floor, "required": needed}
            if agreement["mask_dice_mean"] < needed:
                what = "boxes with clicks" if with_clicks else "boxes alone"
                failures.append(
                    f"decoder ({what}): mask Dice {agreement['mask_dice_mean']:.4f} < {needed:.4f} (the reference "
                    f"decoder agrees with its own float64 twin at {floor:.4f})"
                )
        del candidate
    record["end_to_end"] = {
        "what": "the encoder IR is the reference's own, so end to end is the decoder check above",
        "mask_dice_mean": record["decoder_teacher_forced"]["mask_dice_mean"],
    }
    return record, failures

"""Export a Brevitas LiteMedSAM to an OpenVINO IR that really runs in INT8, and prove it did.

Path: Brevitas QCDQ ONNX (QuantizeLinear/DequantizeLinear around every quantized input and weight)
-> `Core.read_model` -> IR. Measured on OpenVINO 2026.4: `ov.convert_model` of a per-channel QCDQ
graph runs in fp32, while `read_model` of the same .onnx runs Conv/FullyConnected in int8.

The export never assumes: it compiles the IR, reads the runtime precision of every
Convolution/FullyConnected/MatMul from `get_runtime_model()` and fails if fewer than the spec's
`min_int8_fraction` run in i8/u8, then measures mask agreement with the PyTorch fake-quant model on
real slices (block by block, decoder, end to end: see `qmedsam.export.int8_parity`). Both go into
meta.json, next to the quant spec and the calibration summary.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qmedsam.data.cases import CaseError, load_npz, read_case
from qmedsam.data.preprocess import mask_box
from qmedsam.errors import UserFacingError
from qmedsam.export.fp32 import base_meta, example_decoder_inputs, name_io, write_meta
from qmedsam.export.int8_parity import ParityThresholds, encoder_units, int8_parity
from qmedsam.export.parity import ParitySample, compare_engines
from qmedsam.export.staging import staged_directory
from qmedsam.inference.ov_core import shared_core
from qmedsam.inference.runtime import OpenVINOEngine, layer_precisions

log = logging.getLogger(__name__)

INT8_PRECISIONS = ("i8", "u8")
ONNX_OPSET = 17


# --- real slices for calibration and parity -------------------------------------------------------------


def _spread_order(n: int) -> list[int]:
    """Indices 0..n-1 middle first, then quarters, eighths...: any prefix is spread over the range."""
    order: list[int] = []
    seen: set[int] = set()
    denominator = 2
    while len(order) < n and denominator <= 4 * n:
        for k in range(1, denominator, 2):
            index = min(n - 1, k * n // denominator)
            if index not in seen:
                seen.add(index)
                order.append(index)
        denominator *= 2
    return order + [i for i in range(n) if i not in seen]


def _label_boxes(labels: np.ndarray, min_pixels: int = 4) -> np.ndarray:
    """Tight [x0, y0, x1, y1] of each label in a 2D label slice (tiny specks skipped)."""
    boxes = []
    for label in np.unique(labels):
        mask = labels == label
        if label == 0 or mask.sum() < min_pixels:
            continue
        boxes.append(mask_box(mask))
    return np.array(boxes, dtype=np.float32).reshape(-1, 4)


def _pick_boxes(boxes: np.ndarray, max_boxes: int) -> np.ndarray:
    if len(boxes) <= max_boxes:
        return boxes
    return boxes[np.linspace(0, len(boxes) - 1, max_boxes).round().astype(int)]


def _file_slices(path: Path, max_boxes: int) -> Iterator[ParitySample]:
    """Slices of one case file (`imgs` + `boxes`) or training file (`imgs` + `gts`), spread order."""
    data = load_npz(path)
    if "imgs" not in data:
        return
    if "boxes" in data:
        try:
            case = read_case(path)
        except CaseError as exc:
            log.warning("skipping %s: %s", path, exc)
            return
        if case.dimension == 2:
            yield ParitySample(case.name, case.image, _pick_boxes(case.boxes.astype(np.float32), max_boxes))
            return
        zs = [z for z in range(case.image.shape[0]) if np.any((case.boxes[:, 2] <= z) & (case.boxes[:, 5] >= z))]
        for i in _spread_order(len(zs)):
            z = zs[i]
            covering = case.boxes[(case.boxes[:, 2] <= z) & (case.boxes[:, 5] >= z)][:, [0, 1, 3, 4]]
            yield ParitySample(
                f"{case.name}[z={z}]", case.image[z], _pick_boxes(covering.astype(np.float32), max_boxes)
            )
    elif "gts" in data:
        image, labels = data["imgs"], data["gts"]
        if labels.shape == image.shape[:2]:  # 2D (H, W[, C])
            boxes = _label_boxes(labels)
            if len(boxes):
                yield ParitySample(path.name, image, _pick_boxes(boxes, max_boxes))
            return
        if labels.ndim != 3 or labels.shape != image.shape:
            log.warning("skipping %s: imgs %s and gts %s do not match", path, image.shape, labels.shape)
            return
        zs = [z for z in range(labels.shape[0]) if labels[z].any()]
        for i in _spread_order(len(zs)):
            boxes = _label_boxes(labels[zs[i]])
            if len(boxes):
                yield ParitySample(f"{path.name}[z={zs[i]}]", image[zs[i]], _pick_boxes(boxes, max_boxes))
    else:  # an unlabelled training file: its image alone
        yield from _unlabelled_slices(path, data["imgs"])


UNLABELLED_BOX_FRACTIONS = (0.25, 0.5, 0.75)
"""Centred boxes (fraction of each side) prompting an unlabelled slice: the encoder, which holds most of
the quantizers, does not use the box; the decoder sees small, middle and large objects."""


def _unlabelled_slices(path: Path, imgs: np.ndarray) -> Iterator[ParitySample]:
    """Slices of an unlabelled training file with centred boxes, so calibration sees every modality of a
    training tree, not only the labelled ones."""
    from qmedsam.datasets.modality import image_stack

    try:
        _, stack = image_stack(path.name, imgs)
    except ValueError as exc:
        log.warning("skipping %s: %s", path, exc)
        return
    height, width = stack.shape[1:3]
    boxes = np.array(
        [
            [(1 - f) / 2 * width, (1 - f) / 2 * height, (1 + f) / 2 * width - 1, (1 + f) / 2 * height - 1]
            for f in UNLABELLED_BOX_FRACTIONS
        ],
        dtype=np.float32,
    ).round()
    flat = stack.reshape(stack.shape[0], -1)
    zs = np.flatnonzero(flat.max(axis=1) > flat.min(axis=1))
    for i in _spread_order(len(zs)):
        z = int(zs[i])
        name = path.name if stack.shape[0] == 1 else f"{path.name}[z={z}]"
        yield ParitySample(name, stack[z], boxes)


def real_slices(folder: str | Path, limit: int = 8, max_boxes: int = 16) -> list[ParitySample]:
    """Up to `limit` 2D slices with boxes from a folder of case files or a training tree (recursive).

    Files take turns (one slice each, round-robin) so every file and modality is represented; 3D
    volumes contribute slices spread over their labelled extent. Case files give their own boxes,
    training files (`imgs` + `gts`) the tight box of each label in the slice, unlabelled training files
    (`imgs` only) centred boxes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserFacingError(f"{folder}: not a folder of .npz case or training files")
    files = sorted(p for p in folder.rglob("*.npz") if not p.name.startswith("."))
    iterators = [_file_slices(path, max_boxes) for path in files]
    samples: list[ParitySample] = []
    while iterators and len(samples) < limit:
        for iterator in list(iterators):
            sample = next(iterator, None)
            if sample is None:
                iterators.remove(iterator)
            elif len(samples) < limit:
                samples.append(sample)
    if not samples:
        raise UserFacingError(f"{folder}: no readable slices with objects (.npz with imgs + boxes, or imgs + gts)")
    return samples


# --- IR checks shared with the NNCF comparison point --------------------------------------------------


def int8_fraction(counts: dict[str, int]) -> float:
    """Share of heavy layers (counts keyed `Type:precision`) whose runtime precision is i8 or u8."""
    total = sum(counts.values())
    int8 = sum(n for key, n in counts.items() if key.rsplit(":", 1)[-1].lower() in INT8_PRECISIONS)
    return int8 / total if total else 0.0


def attention_subgraphs(compiled, original) -> dict[str, int]:
    """Runtime precision of the CPU plugin's fused attention `Subgraph`s (MatMul-Softmax-MatMul).

    The plugin folds each attention's two MatMuls into one Snippets subgraph, so they never show up
    as MatMul layers; a subgraph counts as attention when it absorbed an original MatMul.
    """
    matmuls = {op.get_friendly_name() for op in original.get_ops() if op.get_type_name() == "MatMul"}
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" not in info or info["layerType"].astype(str) != "Subgraph":
            continue
        names = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else []
        if matmuls.intersection(names):
            key = f"Subgraph(attention):{info['runtimePrecision'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
    return counts


FLOAT_BY_DESIGN = re.compile(r"(^|[./])prompt_encoder[./]")
"""Layers of the decoder IR that come from the prompt encoder alone (the click map's mask-prompt convolutions,
the clicks' Fourier features) stay float by design (`qmedsam.model.sam_decoder`); coverage counts the mask
decoder's layers. Their original names: `/prompt_encoder/...` from ONNX, `__module.model.prompt_encoder.` from
PyTorch."""


def prompt_encoder_layers(compiled) -> dict[str, int]:
    """Heavy runtime layers whose original PyTorch ops all belong to the prompt encoder, `Type:precision`."""
    return layer_precisions(compiled, lambda names: bool(names) and all(FLOAT_BY_DESIGN.search(n) for n in names))


def int8_coverage(model_dir: Path) -> dict[str, dict]:
    """Per part: runtime precision of each Convolution/FullyConnected/MatMul(-like) layer and of the fused
    attention subgraphs, read back from the CPU plugin with the f32 hint (so a layer left unquantized
    shows up as f32, not as bf16), and the share of them that runs in i8/u8. The decoder's prompt-encoder
    layers (float by design) are listed apart and not counted."""
    core = shared_core()
    coverage = {}
    for part in ("encoder", "decoder"):
        original = core.read_model(str(Path(model_dir) / f"{part}.xml"))
        compiled = core.compile_model(
            original, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        )
        counts = {**layer_precisions(compiled), **attention_subgraphs(compiled, original)}
        prompt = prompt_encoder_layers(compiled) if part == "decoder" else {}
        for key, n in prompt.items():
            counts[key] -= n
        counts = {key: n for key, n in counts.items() if n}
        coverage[part] = {"layers": dict(sorted(counts.items())), "int8_fraction": round(int8_fraction(counts), 4)}
        if prompt:
            coverage[part]["float_prompt_encoder_layers"] = dict(sorted(prompt.items()))
    return coverage


def check_coverage(model_dir: Path, meta: dict, min_int8: dict[str, float]) -> dict:
    """Record int8 coverage in meta.json; raise if a part runs fewer heavy layers in int8 than asked."""
    coverage = int8_coverage(model_dir)
    meta["int8_coverage"] = coverage
    write_meta(model_dir, meta)
    short = {
        part: coverage[part]["int8_fraction"]
        for part, need in min_int8.items()
        if coverage[part]["int8_fraction"] < need
    }
    if short:
        raise RuntimeError(
            f"int8 coverage below the required minimum {min_int8}: {short}; runtime layers: "
            f"{ {part: coverage[part]['layers'] for part in short} }"
        )
    return coverage


def verify_ir(
    model_dir: Path,
    meta: dict,
    reference,
    samples: Sequence[ParitySample],
    samples_from: str,
    min_int8: dict[str, float],
    min_mask_dice: float,
) -> dict:
    """Coverage first (cheap: a model that runs in fp32 needs no parity), then end-to-end mask agreement
    with `reference` (an Engine), both in meta.json; raise as soon as either falls short."""
    check_coverage(model_dir, meta, min_int8)
    with tempfile.TemporaryDirectory() as cache:
        parity = compare_engines(reference, OpenVINOEngine(model_dir, precision="f32", cache_dir=cache), list(samples))
    parity["samples_from"] = samples_from
    parity["reference"] = reference.name
    meta["parity_vs_torch"] = {"f32": parity}
    write_meta(model_dir, meta)
    if not parity["mask_dice_mean"] >= min_mask_dice:
        raise RuntimeError(
            f"int8 IR disagrees with {reference.name}: mean mask Dice {parity['mask_dice_mean']:.4f} < {min_mask_dice}"
        )
    return meta


# --- Brevitas -> QCDQ ONNX -> IR -------------------------------------------------------------------------


def export_decoder_onnx(model, path: Path) -> None:
    """The Brevitas fake-quant decoder (prompt encoder + mask decoder, with the click inputs) as QCDQ ONNX:
    B boxes and N clicks per box dynamic."""
    from qmedsam.model.litemedsam import DECODER_INPUTS, DecoderForExport
    from qmedsam.model.quant import export_onnx_qcdq

    export_onnx_qcdq(
        DecoderForExport(model.eval()),
        example_decoder_inputs(),
        path,
        input_names=list(DECODER_INPUTS),
        output_names=["low_res_masks"],
        dynamic_axes={
            "boxes": {0: "boxes"},
            "points": {0: "boxes", 1: "clicks"},
            "point_labels": {0: "boxes", 1: "clicks"},
            "low_res_masks": {0: "boxes"},
        },
        opset_version=ONNX_OPSET,
    )


def _convert_qcdq(model, out_dir: Path) -> list[dict[str, str]]:
    """Brevitas QCDQ ONNX of encoder and decoder, read by OpenVINO's ONNX frontend, saved as IR.

    Returns the encoder's blocks (module, input and output tensor names) for the block-by-block parity
    check, found in the ONNX graph before it is deleted (OpenVINO keeps the tensor names, not the scopes).
    """
    import openvino as ov
    import torch

    from qmedsam.model.litemedsam import DECODER_INPUTS
    from qmedsam.model.quant import export_onnx_qcdq

    model = model.eval()
    onnx_dir = out_dir / "onnx"
    onnx_dir.mkdir()
    export_onnx_qcdq(
        model.image_encoder,
        (torch.zeros(1, 3, 256, 256),),
        onnx_dir / "encoder.onnx",
        input_names=["image"],
        output_names=["image_embedding"],
        opset_version=ONNX_OPSET,
    )
    export_decoder_onnx(model, onnx_dir / "decoder.onnx")
    units = encoder_units(onnx_dir / "encoder.onnx")
    core = shared_core()
    for part, inputs, output in (
        ("encoder", ["image"], "image_embedding"),
        ("decoder", list(DECODER_INPUTS), "low_res_masks"),
    ):
        ov_model = core.read_model(str(onnx_dir / f"{part}.onnx"))
        name_io(ov_model, inputs, output)
        ov.save_model(ov_model, str(out_dir / f"{part}.xml"), compress_to_fp16=False)
        del ov_model
    for path in onnx_dir.iterdir():
        path.unlink()
    onnx_dir.rmdir()
    return units


def export_int8(
    model,
    spec,
    out_dir: str | Path,
    source: dict,
    parity_samples: Sequence[ParitySample],
    samples_from: str = "cases",
    calibration: dict | None = None,
    thresholds: ParityThresholds | None = None,
    *,
    force: bool = False,
) -> dict:
    """Export a calibrated (or QAT-trained) Brevitas LiteMedSAM built from `spec` to an int8 IR directory.

    Fails, leaving `out_dir` untouched, if some activation quantizer is uncalibrated, if a quantized
    part runs less than `spec.min_int8_fraction` of its heavy layers in int8, or if the IR is not
    faithful to the PyTorch fake-quant model by the three checks of `qmedsam.export.int8_parity`
    (every encoder block on PyTorch's input, the decoder on PyTorch's embedding, the whole pipeline
    against the reference's own float64/float32 agreement).
    """
    from qmedsam.model.quant import uncalibrated_quantizers

    thresholds = thresholds or ParityThresholds()
    missing = uncalibrated_quantizers(model)
    if missing:
        raise UserFacingError(
            f"{len(missing)} activation quantizers are not calibrated (e.g. {missing[0]}); run calibration first"
        )
    if not parity_samples:
        raise ValueError("the int8 export needs real slices for its parity check")
    min_int8 = {
        part: spec.min_int8_fraction
        for part, on in (("encoder", spec.image_encoder), ("decoder", spec.mask_decoder))
        if on
    }
    with staged_directory(out_dir, force) as staging:
        units = _convert_qcdq(model, staging)
        meta = base_meta("int8", source)
        meta["quantization"] = {
            "tool": "brevitas",
            "format": "qcdq-onnx",
            "spec": spec.to_dict(),
            "encoder_units": units,
        }
        if calibration is not None:
            meta["quantization"]["calibration"] = calibration
        write_meta(staging, meta)
        check_coverage(staging, meta, min_int8)
        with tempfile.TemporaryDirectory() as cache:
            parity, failures = int8_parity(staging, model, units, parity_samples, thresholds, cache_dir=cache)
        parity["samples_from"] = samples_from
        parity["samples"] = len(parity_samples)
        meta["parity_vs_torch"] = {"f32": parity}
        write_meta(staging, meta)
        if failures:
            raise RuntimeError("int8 IR is not faithful to the PyTorch fake-quant model: " + "; ".join(failures))
    log.info(
        "exported Brevitas int8 IR to %s (int8 layers: encoder %.2f, decoder %.2f; worst block 1-cos %.1e, "
        "decoder mask Dice %.4f, end to end %.4f vs reference floor %.4f)",
        out_dir,
        meta["int8_coverage"]["encoder"]["int8_fraction"],
        meta["int8_coverage"]["decoder"]["int8_fraction"],
        parity["units"][parity["worst_unit"]]["one_minus_cos"],
        parity["decoder_teacher_forced"]["mask_dice_mean"],
        parity["end_to_end"]["mask_dice_mean"],
        parity["reference_floor"]["mask_dice_mean"],
    )
    return meta
